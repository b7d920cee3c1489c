"""The warm worker (client/worker.py): one process per node answers every message of a deployment.

The Flower internals it relies on, the SuperNode's Runtime API secret, the node caches it keeps warm
(policy edits, logs rolled back under it), and end to end on loopback: a worker killed mid-round.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import edit_policy
from tests.test_deployment import deployment_overrides, flower_processes


def test_the_flower_internals_the_worker_uses_are_there():
    """Pinned to flwr 1.42: a Flower upgrade that moves these fails here, by name, before any deployment."""
    import flwr
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supernode.runtime import run_clientapp
    from flwr.supernode.start_client_internal import start_client_internal

    assert flwr.__version__.startswith("1.42."), flwr.__version__
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client",
        "context",
        "sub_status",
        "details",
    ]
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert TaskType.CLIENT_APP == "flwr-clientapp"
    # Process isolation starts no SuperExec and keeps the secret (subprocess isolation drops it).
    source = inspect.getsource(start_client_internal)
    assert "if isolation == ISOLATION_MODE_SUBPROCESS:" in source and "superexec_auth_secret = None" in source


def test_a_reply_left_from_a_stopped_run_does_not_hold_back_the_next_messages_reply(monkeypatch):
    """Around a coordinator restart a node can hold a reply to the stopped run's last message. Flower's push stage
    sends every reply it holds once, and that stale one went out in place of the resumed run's describe reply,
    ready 0.1 s later: the node then waited for a next message that the coordinator, waiting for that reply,
    never sent (a hang seen in the restart test). The push stage now goes on until the pulled message is answered.
    """
    from types import SimpleNamespace

    from flwr.supernode import start_client_internal as loop

    from client.supernode_loop import patch_supernode_loop

    # Flower's own push stage does what the fake below does: wait for any reply, send all, delete each and the
    # message it answers.
    source = inspect.getsource(loop._push_messages)
    assert "get_messages_legacy(is_reply=True)" in source and "reply_to_message_id," in source

    def message(message_id: str, reply_to: str = ""):
        return SimpleNamespace(metadata=SimpleNamespace(message_id=message_id, reply_to_message_id=reply_to))

    class NodeState:
        def __init__(self):
            self.held: dict[str, str] = {}  # message id -> the message it replies to ("" for an instruction)

        def store_message(self, msg):
            self.held[msg.metadata.message_id] = msg.metadata.reply_to_message_id
            return msg.metadata.message_id

        def delete_messages(self, *, message_ids=None):
            for message_id in message_ids or list(self.held):
                self.held.pop(message_id, None)

        def create_task(self, **kwargs):
            return None

    state, sent = NodeState(), []
    state.store_message(message("stale-reply", reply_to="stopped-run-message"))

    def pull(*, state, **_):
        state.store_message(message("describe"))
        threading.Timer(0.2, state.store_message, [message("describe-reply", reply_to="describe")]).start()
        return 8

    def push(*, state, **_):
        while not (replies := [m for m, to in state.held.items() if to]):
            time.sleep(0.02)
        for reply in replies:
            sent.append(reply)
            state.delete_messages(message_ids=[reply, state.held[reply]])

    monkeypatch.setattr(loop, "_pull_and_store_message", pull)
    monkeypatch.setattr(loop, "_push_messages", push)
    monkeypatch.setattr(loop, "time", time)
    patch_supernode_loop()
    assert loop._pull_and_store_message(state=state) == 8
    loop._push_messages(state=state)
    assert sent == ["stale-reply", "describe-reply"] and state.held == {}


def test_the_waits_fedsov_shortens_are_flowers(monkeypatch):
    """client.supernode_loop and common.flowerproc replace these Flower waits by name: check they are still there."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.runtime import run_clientapp

    from client.supernode_loop import LoopClock
    from common.flowerproc import ActivityPoll

    main_loop = inspect.getsource(loop.start_client_internal)
    assert "time.sleep(3)" in main_loop and "run_id = _pull_and_store_message(" in main_loop
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)
    assert "pull_objects(" in inspect.getsource(loop._pull_and_store_message)
    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(run_clientapp.pull_task_input)
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)
    for pull in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert {"initial_backoff", "backoff_cap"} <= set(inspect.signature(pull).parameters)
    # The heartbeat a node announces and keeps: Flower's constant, read by name in these two modules.
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL, HEARTBEAT_PATIENCE
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    from client.supernode_loop import HEARTBEAT_S

    assert "heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL" in inspect.getsource(fleet_http_connection)
    assert "next_interval: float = HEARTBEAT_DEFAULT_INTERVAL" in inspect.getsource(heartbeat)
    assert HEARTBEAT_MIN_INTERVAL <= HEARTBEAT_S and HEARTBEAT_PATIENCE == 2  # the SuperLink would refuse less

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    poll = ActivityPoll(fast=0.2, idle=3, window=60)
    clock = LoopClock(poll)
    clock.sleep(3)  # idle: Flower's pace
    poll.active()
    clock.sleep(3)  # a message came: look again soon
    clock.sleep(0.5)  # waiting for the worker's reply
    clock.sleep(1)  # any other wait is Flower's own
    assert slept == [3, 0.2, 0.05, 1] and clock.monotonic is time.monotonic


def test_a_message_whose_run_stopped_while_received_leaves_no_task_open(monkeypatch):
    """Flower creates the task, then meets a stopped run and returns None with the task open; fedsov finishes it
    (failed, token revoked), so the warm worker is not left waiting for content that never comes."""
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from client.supernode_loop import patch_supernode_loop

    # The Flower path this repairs: the RunNotRunningException handler returns None without finish_task.
    source = inspect.getsource(loop._pull_and_store_message)
    handler = source[source.index("except RunNotRunningException:") :]
    assert "task_id = state.create_task(" in source and "finish_task" not in handler and "return None" in handler

    state = InMemoryNodeState(ObjectStoreFactory().store())
    created: list[int] = []

    def stopped_run(state, **_):  # what Flower does when the run stops mid-receive
        created.append(state.create_task(task_type=TaskType.CLIENT_APP, run_id=7, fab_hash="f"))
        return None

    def received(state, **_):
        created.append(state.create_task(task_type=TaskType.CLIENT_APP, run_id=8, fab_hash="f"))
        return 8

    for fake in (stopped_run, received):
        monkeypatch.setattr(loop, "_pull_and_store_message", fake)
        monkeypatch.setattr(loop, "time", time)
        patch_supernode_loop()
        assert loop._pull_and_store_message(state=state, receive=None) in (None, 8)
        assert "create_task" not in vars(state)  # Flower's own method again after the call
    tasks = {t.task_id: t for t in state.get_tasks(task_ids=created)}
    orphan, live = tasks[created[0]], tasks[created[1]]
    assert orphan.status.status == Status.FINISHED and orphan.status.sub_status == SubStatus.FAILED
    assert live.status.status != Status.FINISHED  # a received message's task is the worker's to answer


def test_only_fedsovs_own_clientapp_runs(tmp_path):
    """A run whose app bundle names another ClientApp gets a refusal; nothing of the bundle is loaded."""
    import io
    import zipfile

    import tomli_w
    from flwr.supercore.fab import Fab

    from client.worker import Worker
    from common.runconfig import APP_PYPROJECT

    def bundle(clientapp: str) -> Fab:
        project = json.loads(json.dumps(APP_PYPROJECT))
        project["tool"]["flwr"]["app"]["components"]["clientapp"] = clientapp
        data = io.BytesIO()
        with zipfile.ZipFile(data, "w") as z:
            z.writestr("pyproject.toml", tomli_w.dumps(project))
            z.writestr("client/app.py", "raise SystemExit('bundle code ran')\n")
        return Fab(hash_str=clientapp, content=data.getvalue(), verifications={})

    worker = Worker("127.0.0.1:9", b"secret", tmp_path)
    assert worker._app_refusal(bundle("client.app:app")) is None
    refusal = worker._app_refusal(bundle("client.evil:app"))
    assert "only fedsov's installed ClientApp (client.app:app)" in refusal and "'client.evil:app'" in refusal


def test_the_runtime_api_is_on_loopback_and_claims_need_the_secret(tmp_path):
    """Only a process holding the node's secret (a 0600 file in its state folder) can claim its tasks."""
    import httpx
    import psutil
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    from client.supernode import SUPEREXEC_SECRET_FILE, SuperNodeProcess
    from client.worker import ACQUIRE_TASK, runtime_client

    state = tmp_path / "state"
    # No coordinator listens there: the SuperNode keeps retrying while its Runtime API serves.
    node = SuperNodeProcess("127.0.0.1:9", {"region": "eu", "state-dir": str(state)}, tmp_path / "supernode.log")
    try:
        node.start(tmp_path / "flower-home")
        secret_file = state / SUPEREXEC_SECRET_FILE
        assert secret_file.stat().st_mode & 0o777 == 0o600 and len(secret_file.read_bytes()) == 32
        request = AcquireTaskRequest(supported_task_types=["flwr-clientapp"])
        signed = runtime_client(
            f"127.0.0.1:{node.port}",
            SuperExecAuthHttpInterceptor(master_secret=secret_file.read_bytes(), protected_methods={ACQUIRE_TASK}),
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                assert not signed.AcquireTask(request).HasField("task")  # the secret is accepted: no task yet
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, node.log_since_start()
                time.sleep(0.3)
        guess = SuperExecAuthHttpInterceptor(master_secret=b"guess", protected_methods={ACQUIRE_TASK})
        for interceptors in ((), (guess,)):
            with pytest.raises(httpx.HTTPStatusError) as refused:
                runtime_client(f"127.0.0.1:{node.port}", *interceptors).AcquireTask(request)
            assert refused.value.response.status_code == 401
        listening = [
            c.laddr
            for c in psutil.Process(node.process.pid).net_connections()
            if c.status == psutil.CONN_LISTEN and c.laddr.port == node.port
        ]
        assert listening and all(address.ip == "127.0.0.1" for address in listening)
        assert node.worker.alive()
    finally:
        node.stop(grace=5)
    assert not flower_processes(tmp_path)


@pytest.fixture
def fresh_node_caches(monkeypatch):
    """The ClientApp's module caches, empty for this test (as in a newly started worker)."""
    from client import app as client_app

    for name in ("_NODES", "_GATES", "_SETTINGS"):
        monkeypatch.setattr(client_app, name, {})
    return client_app


def test_a_warm_node_follows_policy_edits_and_refuses_logs_rolled_back_under_it(
    small_overrides, config_dir, tmp_path, fresh_node_caches
):
    from flwr.app import Context, RecordDict

    from client.node import STARTS
    from common.audit import TamperedLog
    from common.config import config_to_dict, load_config
    from common.data.prepare import ensure_synthetic_data
    from common.runconfig import CONFIG_KEY
    from server.deployment import local_node_config

    client_app = fresh_node_caches
    cfg = load_config(small_overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    context = Context(
        run_id=1,
        node_id=1,
        node_config=local_node_config(cfg, "eu", 0, 1, tmp_path / "node", "eu-1"),
        state=RecordDict(),
        run_config={CONFIG_KEY: json.dumps(config_to_dict(cfg))},
    )
    node = client_app.region_node(context)
    starts = STARTS["node"]
    assert client_app.region_node(context) is node and STARTS["node"] == starts  # warm: started once

    edit_policy(config_dir, "eu", "privacy.min_noise_multiplier", 1.25)
    edited = client_app.region_node(context)
    assert edited is not node and STARTS["node"] == starts + 1
    assert edited.policy.privacy.min_noise_multiplier == 1.25
    assert list(client_app._NODES.values()) == [edited]  # the older version is gone, not kept in memory

    # An older copy of the audit log put back under the running node: the next version refuses to start on it.
    log, head = edited.audit.path, edited.audit.chain.head_path
    saved = log.read_text(), head.read_text()
    edited.audit.record("plan", "accepted", reason="an entry the rollback removes")
    log.write_text(saved[0])
    head.write_text(saved[1])
    edit_policy(config_dir, "eu", "privacy.min_noise_multiplier", 1.5)
    with pytest.raises(TamperedLog, match="changed under this process"):
        client_app.region_node(context)
    assert STARTS["node"] == starts + 1


def _entries(path: Path) -> list[dict]:
    """A log's entries as written so far (a line being appended is skipped)."""
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return entries


def _wait_for(condition, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


@pytest.mark.heavy(seconds=75)
def test_a_worker_killed_mid_round_is_restarted_and_the_ledger_stays_exact(small_overrides, tmp_path, config_dir):
    """eu's worker dies in its round-1 training; round 1 aggregates us and sg, eu is back for round 2.

    Deterministic: after eu's node described itself, the test holds eu's ledger lock, which the node next
    needs inside round-1 training, before it could charge anything; it kills the worker there. Meanwhile sg's
    policy gets a higher noise floor: sg's next message must run under it, with its model still loaded once.
    """
    from common.audit import EvidenceKey
    from common.privacy.ledger import PrivacyLedger
    from common.wire import DESCRIBE
    from server.deployment import LocalDeployment

    overrides = [
        *deployment_overrides(small_overrides, tmp_path),
        "audit.enabled=false",
        "federation.round_timeout_s=120",
        "secure_aggregation.stage_timeout_s=60",
    ]
    lines: list[str] = []
    done: list[str] = []
    failures: list[BaseException] = []

    with LocalDeployment(overrides, lines.append, insecure=True) as deployment:
        root = deployment.root
        eu = deployment.nodes["eu-1"]

        def crash_eu_in_round_1() -> None:
            try:
                audit, worker_log = root / "nodes" / "eu-1" / "state" / "audit.jsonl", eu.worker.log_path
                _wait_for(
                    lambda: any(e["action"] == "egress" and e.get("message_type") == DESCRIBE for e in _entries(audit)),
                    "eu-1 to describe itself",
                )
                with open(root / "ledgers" / "eu" / "privacy-ledger.jsonl.lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    assert "task started: train" not in worker_log.read_text(), "the test took the lock too late"
                    _wait_for(
                        lambda: "task started: train (round 1)" in worker_log.read_text(),
                        "eu-1 to start round-1 training",
                    )
                    # Inside train_round the worker now waits for the ledger: it cannot have charged anything.
                    killed = eu.worker.process
                    os.kill(killed.pid, signal.SIGKILL)
                    killed.wait()
                done.append("killed")
                edit_policy(config_dir, "sg", "privacy.min_noise_multiplier", 5.0)
                done.append("sg policy edited")
            except BaseException as err:  # noqa: BLE001 - reported by the test below
                failures.append(err)

        crash = threading.Thread(target=crash_eu_in_round_1, daemon=True)
        crash.start()
        code = deployment.run()
        crash.join(timeout=60)
        run_dir = deployment.run_dir
        restarts = {name: node.worker.restarts for name, node in deployment.nodes.items()}
    assert not failures, failures
    assert code == 0, "\n".join(lines[-40:])
    assert done == ["killed", "sg policy edited"] and restarts == {"eu-1": 1, "us-1": 0, "sg-1": 0}
    assert not flower_processes(tmp_path)

    # Round 1 failed cleanly for eu only (answered by the restarted worker, or by Flower's timeout) and went on
    # without it; in round 2 eu trained again.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["aggregated"] and rows[1]["clients_trained"] == 2 and rows[1]["clients_failed"] == ["eu-1"]
    assert rows[2]["aggregated"] and rows[2]["clients_trained"] == 3
    worker_logs = {
        name: (root / "logs" / f"supernode-{name}.worker.log").read_text() for name in ("eu-1", "us-1", "sg-1")
    }
    assert (
        "answered the unfinished train (round 1) with an error" in worker_logs["eu-1"]
        or "left the unfinished train (round 1) to Flower's heartbeat timeout" in worker_logs["eu-1"]
    )

    # eu's ledger: round 2 charged once, round 1 never (the worker died before charging); the epsilon the run
    # reports for eu is exactly what its ledger holds.
    summary = json.loads((run_dir / "summary.json").read_text())

    def charges(region: str):
        policy = deployment.cfg.regions[region].policy.privacy
        key = EvidenceKey.load(root / "keys" / f"ledger-{region}")
        ledger = PrivacyLedger(
            root / "ledgers" / region / "privacy-ledger.jsonl", delta=policy.delta, unit=policy.unit, key=key
        )
        return ledger.charges()

    eu_charges = charges("eu")
    assert [(c.node, c.round) for c in eu_charges] == [("eu-1", 2)]
    assert summary["regions"]["eu"]["epsilon"] == pytest.approx(eu_charges[-1].epsilon_after, rel=1e-9)
    for region in ("us", "sg"):
        assert [c.round for c in charges(region)] == [1, 2]

    # Each worker started its node and loaded its model once per run (eu's restarted worker: once since then);
    # sg started its node again for the edited policy, and the next plan it ran used the new noise floor.
    def last_task(name: str) -> dict:
        tasks = [json.loads(line.split("task ", 1)[1]) for line in worker_logs[name].splitlines() if " task {" in line]
        return tasks[-1]

    assert (last_task("us-1")["node_starts"], last_task("us-1")["model_loads"]) == (1, 1)
    assert (last_task("eu-1")["node_starts"], last_task("eu-1")["model_loads"]) == (1, 1)
    assert (last_task("sg-1")["node_starts"], last_task("sg-1")["model_loads"]) == (2, 1)
    sg_audit = _entries(root / "nodes" / "sg-1" / "state" / "audit.jsonl")
    starts = [e for e in sg_audit if e["action"] == "start" and e["decision"] == "accepted"]
    assert len(starts) == 2 and starts[0]["policy_hash"] != starts[1]["policy_hash"]
    plans = [e for e in sg_audit if e["action"] == "plan" and e["policy_hash"] == starts[1]["policy_hash"]]
    assert plans and all(e["decision"] == "adjusted" and e["noise_multiplier"] == 5.0 for e in plans)
