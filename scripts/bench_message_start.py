#!/usr/bin/env python3
"""Per-message cost of a deployed node: a ClientApp process per message (Flower's default) or the warm worker.

1. In fresh Python processes on this machine, what a ClientApp process pays before it can answer:
     light  - a secure-aggregation stage (shares / mask / unmask): import + policy gate only
     node   - describe: import + every start check (policy, residency, data, tokenizer)
     model  - train/evaluate: the above + the base model with LoRA attached, ready to train
   and the same work repeated inside one warm process (what simulation's Ray actors pay).
2. Through a SuperNode's Runtime API (Flower's own, served in this process on loopback; no SuperLink): each
   describe and evaluate message timed from the task the SuperNode creates to the reply it can send on,
   answered by Flower's SuperExec starting a `flwr-clientapp` per message, or by the node's warm worker
   (client/worker.py, what fedsov deploys). The warm worker's first message, which starts the node or loads
   the model, is shown apart.

    .venv/bin/python scripts/bench_message_start.py [--repeats 3] [--out bench/message-start] [overrides...]
    .venv/bin/python scripts/bench_message_start.py --quick    # smoke: micro model, small data

Uses the embedded default model (built on first use) and the default synthetic data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MICRO, device_name, write_results  # noqa: E402  (scripts/ is on sys.path when run)

STAGE_NAMES = {
    "light": "secure-aggregation stage",
    "node": "describe (start checks)",
    "model": "train/evaluate (model ready)",
}

STAGE_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
stage, overrides, node_config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
import client.app  # what flwr-clientapp loads for every message
from client.settings import PolicyGate, deployment_settings
from common.config import load_config
settings = deployment_settings(load_config(overrides), node_config)
def once():
    PolicyGate(settings)
    if stage == "light":
        return
    from client.node import RegionNode, cached_peft_model
    node = RegionNode(settings)
    if stage == "model":
        from common.config import LoraSettings
        lora = settings.model.lora
        cached_peft_model(node._model_path, settings.model, LoraSettings(rank=lora.rank, alpha=lora.alpha,
                          dropout=lora.dropout, target_modules=lora.target_modules), 0)
once()
cold = time.perf_counter() - t0
t1 = time.perf_counter()
once()
print(json.dumps({"cold_s": cold, "warm_s": time.perf_counter() - t1}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="micro model, small data, one repeat: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "message-start")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
        args.overrides = [*MICRO, "data.users_per_region=40", *args.overrides]

    from common.config import load_config
    from common.data.prepare import ensure_synthetic_data
    from common.model.loading import resolve_model_path

    cfg = load_config(args.overrides)
    ensure_synthetic_data(cfg, log=print)
    resolve_model_path(cfg.model, log=print)
    scratch = Path(tempfile.mkdtemp(prefix="fedsov-bench-node-"))
    node_config = {
        "region": "eu",
        "data-path": str(Path(cfg.data.root) / "eu"),
        "state-dir": str(scratch / "state"),
        "synthetic-data": True,
        "model-cache": cfg.model.cache_dir,
        "threads": 1,
        "coordinator-jurisdiction": cfg.federation.coordinator_jurisdiction,
    }
    results = {}
    for stage in ("light", "node", "model"):
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", STAGE_CODE, stage, json.dumps(args.overrides), json.dumps(node_config)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - started
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            runs.append({"process_wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])})
        results[stage] = {
            "process_wall_s": statistics.median(r["process_wall_s"] for r in runs),
            "cold_s": statistics.median(r["cold_s"] for r in runs),
            "warm_s": statistics.median(r["warm_s"] for r in runs),
        }
    runtime = through_runtime_api(cfg, node_config, scratch, args.repeats)
    record = {
        "benchmark": "message-start",
        "quick": args.quick,
        "device": device_name(),
        "python": sys.version.split()[0],
        "model": cfg.model.name_or_path,
        "repeats": args.repeats,
        "stages": results,
        "runtime_api": runtime,
    }
    lines = [
        f"Per-message start cost of a deployed ClientApp ({'quick' if args.quick else 'full'}; {device_name()}; "
        f"median of {args.repeats})",
        "",
        "| message kind | new process (wall) | of which fedsov work | same work in a warm process | cold/warm |",
        "|---|---|---|---|---|",
    ]
    for stage, r in results.items():
        ratio = r["cold_s"] / max(r["warm_s"], 1e-3)
        lines.append(
            f"| {STAGE_NAMES[stage]} | {r['process_wall_s']:.2f} s | {r['cold_s']:.2f} s | "
            f"{r['warm_s']:.3f} s | {ratio:.0f}x |"
        )
    lines += [
        "",
        "Through a SuperNode's Runtime API, from the task to its reply (median of "
        f"{args.repeats}; the warm worker's first message apart):",
        "",
        "| message | a flwr-clientapp process per message | warm worker, first message | warm worker | x |",
        "|---|---|---|---|---|",
    ]
    for kind, r in runtime.items():
        lines.append(
            f"| {kind} | {r['process_s']:.2f} s | {r['warm_first_s']:.2f} s | {r['warm_s']:.3f} s | "
            f"{r['process_s'] / max(r['warm_s'], 1e-3):.0f}x |"
        )
    write_results(args.out, "message-start", record, lines, plot=lambda fig: plot_stages(fig, results, runtime))
    return 0


NODE_ID = 1
RUN_ID = 1


class RuntimeApi:
    """Flower's SuperNode Runtime API and node state, served in this process on loopback: tasks in, replies out."""

    def __init__(self, secret: bytes | None):
        import threading

        import uvicorn
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supernode.main import create_app
        from flwr.supernode.nodestate import NodeStateFactory

        from common.flowerproc import free_port

        logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-request debug lines, in this process
        factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.port = free_port()
        app = create_app(state_factory=factory, superexec_auth_secret=secret)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.state = factory.state()
        self.state.set_node_id(NODE_ID)
        self.fab_hash = ""

    def open_run(self, cfg, node_config: dict) -> None:
        """The run a SuperNode would store on its first message: fedsov's app bundle, the config, the context."""
        import hashlib

        import tomli_w
        from flwr.app import Context, RecordDict
        from flwr.cli.build import build_fab_from_files
        from flwr.common.config import get_fused_config_from_fab
        from flwr.supercore.fab import Fab
        from flwr.supercore.run import Run

        from common.config import config_to_dict
        from common.runconfig import APP_PYPROJECT, CONFIG_KEY

        fab = build_fab_from_files({"pyproject.toml": tomli_w.dumps(APP_PYPROJECT).encode()})[0]
        self.fab_hash = hashlib.sha256(fab).hexdigest()
        run = Run.create_empty(RUN_ID)
        run.fab_id, run.fab_version, run.fab_hash = "fedsov/fedsov", "0.1.0", self.fab_hash
        run.override_config = {CONFIG_KEY: json.dumps(config_to_dict(cfg))}
        self.state.store_run(run)
        self.state.store_fab(Fab(self.fab_hash, fab, {}))
        self.state.set_run_series_context(
            run.series_id,
            Context(
                run_id=RUN_ID,
                node_id=NODE_ID,
                node_config=node_config,
                state=RecordDict(),
                run_config=get_fused_config_from_fab(fab, run),
                series_id=run.series_id,
            ),
        )

    def ask(self, message) -> float:
        """Seconds from storing `message` with its task, as the SuperNode does, to the reply being there."""
        from flwr.supercore.constant import TaskType
        from flwr.supernode.start_client_internal import _insert_message

        started = time.perf_counter()
        _insert_message(message, self.state, self.state.object_store)
        self.state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=self.fab_hash)
        while not (replies := self.state.get_messages_legacy(is_reply=True)):
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        reply = replies[0]
        self.state.delete_messages(message_ids=[reply.metadata.message_id, reply.metadata.reply_to_message_id])
        if reply.has_error():
            raise RuntimeError(f"{message.metadata.message_type} was answered with an error: {reply.error.reason}")
        return seconds

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def messages(cfg, repeats: int):
    """Describe and round-0 evaluate messages as the coordinator sends them; each in a run of its own (a node
    evaluates round 0 once per run)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.wire import DESCRIBE, EVALUATE, GLOBAL_ADAPTER, PLAN, REQUEST, state_to_record
    from server.coordinator import ServerModel, round_plan

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    model = ServerModel(cfg)
    adapter = state_to_record(model.initial_state())
    jurisdiction = cfg.federation.coordinator_jurisdiction
    for i in range(repeats + 1):
        session = f"bench-{i}"
        request = ConfigRecord({"run-id": session, "coordinator-jurisdiction": jurisdiction})
        yield (
            "describe",
            Message(RecordDict({REQUEST: request}), dst_node_id=NODE_ID, message_type=DESCRIBE, group_id="0"),
        )
        plan = round_plan(cfg, session, 0, model.fingerprint, cohort_size=3)  # what a coordinator sends
        yield (
            "evaluate",
            Message(
                RecordDict({PLAN: plan.to_record(), GLOBAL_ADAPTER: adapter}),
                dst_node_id=NODE_ID,
                message_type=EVALUATE,
                group_id="0",
            ),
        )


def through_runtime_api(cfg, node_config: dict, scratch: Path, repeats: int) -> dict:
    """Median seconds per message kind: `process_s` (Flower's SuperExec, a flwr-clientapp per message),
    `warm_first_s` and `warm_s` (the warm worker: its first message, and the median of the rest)."""
    import os

    from client.supernode import write_secret
    from client.worker import WorkerProcess
    from common.flowerproc import flower_bin, flower_environment, stop_process_group

    seconds: dict[str, dict[str, list[float]]] = {"process": {}, "warm": {}}
    for path in ("process", "warm"):
        home = scratch / path
        config = {**node_config, "state-dir": str(home / "state")}
        env = flower_environment(home / "flower-home")
        secret = write_secret(home / "superexec.secret") if path == "warm" else None
        api = RuntimeApi(secret.read_bytes() if secret else None)
        if secret:
            answerer = WorkerProcess(f"127.0.0.1:{api.port}", secret, home / "state", home / "worker.log", env)
            answerer.start()
        else:
            answerer = subprocess.Popen(
                [
                    flower_bin("flower-superexec"),
                    "--insecure",
                    "--runtime-api-address",
                    f"127.0.0.1:{api.port}",
                    "--parent-pid",
                    str(os.getpid()),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            api.open_run(cfg, config)
            # The warm worker's first message is reported apart, so it gets one message more of each kind than
            # a process per message, whose every message is a first (and takes seconds).
            sent = 2 * (repeats + 1 if path == "warm" else repeats)  # a describe and an evaluate per repeat
            for kind, message in itertools.islice(messages(cfg, repeats), sent):
                seconds[path].setdefault(kind, []).append(api.ask(message))
        finally:
            if isinstance(answerer, WorkerProcess):
                answerer.stop()
            else:
                stop_process_group(answerer)
            api.close()
    return {
        kind: {
            "process_s": statistics.median(seconds["process"][kind]),
            "warm_first_s": seconds["warm"][kind][0],
            "warm_s": statistics.median(seconds["warm"][kind][1:]),
        }
        for kind in seconds["warm"]
    }


def plot_stages(figure, results: dict, runtime: dict) -> None:
    """Seconds per message: a fresh process (what Flower's default pays) against a warm one."""
    panels = (
        ("fedsov's work per message", {STAGE_NAMES[s]: (r["process_wall_s"], r["warm_s"]) for s, r in results.items()}),
        ("through a SuperNode, task to reply", {k: (r["process_s"], r["warm_s"]) for k, r in runtime.items()}),
    )
    for i, (title, bars) in enumerate(panels):
        ax = figure.add_subplot(1, 2, i + 1)
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [v[0] for v in bars.values()], width=0.4, label="new process")
        ax.bar([x + 0.2 for x in xs], [v[1] for v in bars.values()], width=0.4, label="warm")
        ax.set_xticks(list(xs), list(bars), fontsize=7)
        ax.set_ylabel("seconds per message")
        ax.set_title(title)
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
