"""The warm worker (client/worker.py): one process per node answers every message of a deployment.

The Flower internals it relies on, the SuperNode's Runtime API secret and the node caches it keeps warm
(policy edits, logs rolled back under it). A worker killed mid-round, end to end on loopback, is played in
tests/test_deployment.py, in the same deployment as a node's death and the wire recording.
"""

from __future__ import annotations

import inspect
import json
import threading
import time

import pytest

from tests.conftest import edit_policy
from tests.test_deployment import flower_processes


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
        assert {"initial_backoff", "backoff_cap", "max_time"} <= set(inspect.signature(pull).parameters)
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


class ReplyWithoutContent:
    """A grid on which one node's reply is announced but its content never uploaded (the node died while
    sending it), the others' replies come: pulled the way Flower's HttpGrid pulls them, through the module
    function the ServerApp makes retry sooner."""

    def __init__(self, lost_node: int):
        self.lost_node = lost_node
        self.pushed: dict[str, int] = {}

    def push_messages(self, messages):
        for i, msg in enumerate(messages):
            self.pushed[f"m{i}"] = msg.metadata.dst_node_id
        return list(self.pushed)

    def pull_messages(self, message_ids):
        from flwr.app import ConfigRecord, Error, Metadata, RecordDict
        from flwr.app.message import make_message
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError
        from flwr.superlink.grid import http_grid

        def never_uploaded(object_id: str) -> bytes:
            raise ObjectUnavailableError(object_id)

        replies = []
        for mid in message_ids:
            node = self.pushed[mid]
            meta = Metadata(
                run_id=1,
                message_id="",
                src_node_id=node,
                dst_node_id=1,
                reply_to_message_id=mid,
                group_id="1",
                created_at=time.time(),
                ttl=60.0,
                message_type="train",
            )
            if node != self.lost_node:
                replies.append(make_message(meta, content=RecordDict({"ok": ConfigRecord({"node": node})})))
                continue
            try:
                http_grid.pull_objects(["content"], never_uploaded)
            except ObjectPullError as err:  # HttpGrid answers the reply with this error
                replies.append(make_message(meta, error=Error(3, f"Reply message objects are unavailable. {err}")))
        return replies


def test_a_reply_whose_content_never_comes_is_given_up_at_the_exchanges_deadline(tmp_path, monkeypatch):
    """Without a deadline, Flower retries a missing object 500 times: 125 s at fedsov's retry pace, whatever
    the stage's timeout (seen as a deployed round stalling ~2 minutes after a node died mid-reply)."""
    from flwr.app import RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid import http_grid

    from common.config import load_config
    from common.flowerproc import retry_objects_sooner
    from server.coordinator import Coordinator
    from server.rundir import RunDirectory

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # Flower's own again after the test
    retry_objects_sooner(http_grid)  # as the ServerApp does
    for name in ("_run_id", "_node_id", "_task_id"):  # messages take their ids from it, as in a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1)
    cfg = load_config([f"workdir={tmp_path}"])
    run = RunDirectory(str(tmp_path / "run"))
    run.create()
    coordinator = Coordinator(cfg, ReplyWithoutContent(lost_node=2), run, pull_interval=0.01)
    started = time.monotonic()
    replies = coordinator._exchange([1, 2, 3], "train", lambda _: RecordDict(), 1, timeout=1.0)
    took = time.monotonic() - started
    assert took < 10, f"the exchange waited {took:.0f} s for content past its 1 s deadline"
    by_node = {r.node_id: r for r in replies}
    assert by_node[1].ok and by_node[3].ok
    assert not by_node[2].ok and "objects are unavailable" in by_node[2].reason


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
