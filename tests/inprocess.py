"""A Flower Grid that delivers messages to the real ClientApp in this process.

Tests run the real ServerApp coordinator and ClientApp handlers without Ray or a SuperLink;
every message still goes through Flower Message objects. Recorded traffic lets tests check
exactly what each node sent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import FedsovConfig, config_to_dict
from common.runconfig import CONFIG_KEY


@dataclass
class InProcessGrid:
    client_app: object
    contexts: dict[int, Context]
    replies: dict[str, Message] = field(default_factory=dict)
    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    # (node id, message type, round) of messages lost on the way: that node never replies to them.
    lose: set = field(default_factory=set)
    # Called with (message, context) after a node handled a message (tests read node state here).
    after_delivery: Callable[[Message, Context], None] | None = None

    @classmethod
    def for_config(cls, cfg: FedsovConfig, client_app=None) -> InProcessGrid:
        if client_app is None:
            from client.app import app as client_app
        # Messages take their run id from the process's task identity, as under Flower.
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0
        run_config = {CONFIG_KEY: json.dumps(config_to_dict(cfg))}
        n = sum(r.clients for r in cfg.regions.values())
        contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(n)
        }
        return cls(client_app, contexts)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            meta = msg.metadata
            if (meta.dst_node_id, meta.message_type, meta.group_id) in self.lose:
                continue
            context = self.contexts[meta.dst_node_id]
            reply = self.client_app(msg, context)
            if self.after_delivery:
                self.after_delivery(msg, context)
            self.received.append(reply)
            self.replies[meta.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]


def run_federation(overrides, run_name="run", prepare_grid=None):
    """Run the real coordinator against real ClientApps in this process; return (cfg, run, summary, grid)."""
    from common.config import config_to_yaml
    from common.data.prepare import ensure_synthetic_data
    from server.coordinator import Coordinator
    from server.rundir import RunDirectory
    from server.simulation import resolve_run_config

    cfg = resolve_run_config(overrides)
    if not cfg.resume:
        cfg.run_dir = f"{cfg.workdir}/runs/{run_name}"
    ensure_synthetic_data(cfg, log=lambda m: None)
    run = RunDirectory(cfg.run_dir)
    run.create()
    run.config_path.write_text(config_to_yaml(cfg))
    grid = InProcessGrid.for_config(cfg)
    if prepare_grid:
        prepare_grid(grid)
    summary = Coordinator(cfg, grid, run, pull_interval=0).execute()
    return cfg, run, summary, grid


def node_audit_entries(cfg, node: str) -> list[dict]:
    """A node's audit log, verified with the node's own evidence key (as `fedsov audit verify` would)."""
    from common.audit import AuditLog, EvidenceKey

    key = EvidenceKey.load(Path(cfg.workdir) / "keys" / node)
    return AuditLog(Path(cfg.workdir) / "nodes" / node / "audit.jsonl", "test", key).entries()


def region_ledger(cfg, region: str):
    """The privacy ledger the simulated nodes of `region` share."""
    from client.node import LEDGER_FILE
    from common.audit import EvidenceKey
    from common.privacy.ledger import PrivacyLedger

    p = cfg.regions[region].policy.privacy
    key = EvidenceKey.load(Path(cfg.workdir) / "keys" / f"ledger-{region}")
    return PrivacyLedger(Path(cfg.workdir) / "ledgers" / region / LEDGER_FILE, delta=p.delta, unit=p.unit, key=key)


def ledger_epsilons(cfg) -> dict[str, list[float]]:
    """Each node's charges in its region's ledger: the epsilon after every charged round, oldest first."""
    out = {}
    for node_dir in sorted((Path(cfg.workdir) / "nodes").iterdir()):
        ledger = region_ledger(cfg, node_dir.name.rsplit("-", 1)[0])
        out[node_dir.name] = [c.epsilon_after for c in ledger.charges() if c.node == node_dir.name]
    return out


class Federation:
    """The pieces a (hostile) coordinator needs to talk to real nodes, without running rounds."""

    def __init__(self, overrides):
        from common.data.prepare import ensure_synthetic_data
        from server.coordinator import Coordinator, ServerModel
        from server.rundir import RunDirectory
        from server.simulation import resolve_run_config

        self.cfg = resolve_run_config(overrides)
        self.cfg.run_dir = f"{self.cfg.workdir}/runs/hostile"
        ensure_synthetic_data(self.cfg, log=lambda m: None)
        self.run = RunDirectory(self.cfg.run_dir)
        self.run.create()
        self.grid = InProcessGrid.for_config(self.cfg)
        self.model = ServerModel(self.cfg)
        self.coordinator = Coordinator(self.cfg, self.grid, self.run, pull_interval=0)
        self.coordinator._discover(self.model.fingerprint)
        self.by_name = {n.name: n.node_id for n in self.coordinator.nodes.values()}
        self.plan = self.coordinator._plan(1, self.model.fingerprint)

    def send(self, node: str, message_type: str, content: RecordDict, round_number: int = 1) -> Message:
        msg = Message(content, dst_node_id=self.by_name[node], message_type=message_type, group_id=str(round_number))
        self.grid.push_messages([msg])
        return self.grid.replies.pop(msg.metadata.message_id)

    def train(self, node: str, **changes) -> Message:
        plan = dataclasses.replace(self.plan, **changes)
        return self.train_raw(node, plan.to_record())

    def train_raw(self, node: str, plan_record, state=None, round_number: int = 1, **extra) -> Message:
        """Send a train message with any plan record at all, as a deviating coordinator would."""
        from common.wire import GLOBAL_ADAPTER, PLAN, state_to_record

        state = state_to_record(self.model.initial_state() if state is None else state)
        return self.send(node, "train", RecordDict({PLAN: plan_record, GLOBAL_ADAPTER: state, **extra}), round_number)

    def plan_with(self, **fields):
        """This federation's plan as a ConfigRecord with wire fields replaced (None removes a field)."""
        from flwr.app import ConfigRecord

        values = dict(self.plan.to_record())
        for key, value in fields.items():
            key = key.replace("_", "-")
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        return ConfigRecord(values)

    def audit(self, node: str) -> list[dict]:
        return node_audit_entries(self.cfg, node)

    def ledger_sigmas(self, node: str) -> list[float]:
        ledger = region_ledger(self.cfg, node.rsplit("-", 1)[0])
        return [c.noise_multiplier for c in ledger.charges() if c.node == node]


def assert_refused_with_nothing_sent(reply: Message, *fragments: str) -> None:
    assert reply.has_error() and not reply.has_content()
    for fragment in fragments:
        assert fragment in reply.error.reason, reply.error.reason


def node_audit_metrics(**changes: float) -> dict[str, float]:
    """A node's memorisation-audit reply as the report reads it: one 16x canary group, a membership test near
    chance, 17 of 32 one-run guesses right; `changes` override by metric name (underscores for dashes)."""
    metrics = {
        "exposure-rep16-mean": 3.0,
        "exposure-rep16-max": 4.0,
        "extracted-greedy-rep16": 0.0,
        "extracted-beam-rep16": 0.0,
        "canaries-rep16": 2.0,
        "mia-loss-auc": 0.52,
        "mia-loss-tpr-at-1pct-fpr": 0.01,
        "mia-calibrated-auc": 0.51,
        "mia-calibrated-tpr-at-1pct-fpr": 0.02,
        "mia-members": 200.0,
        "mia-nonmembers": 50.0,
        "one-run-canaries": 64.0,
        "one-run-guesses": 32.0,
        "one-run-correct": 17.0,
        "generations": 16.0,
        "pii-spans": 3.0,
        "epsilon": 1.0,
        "delta": 1e-5,
    }
    return metrics | {name.replace("_", "-"): value for name, value in changes.items()}
