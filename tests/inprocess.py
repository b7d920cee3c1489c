"""A Flower Grid that delivers messages to the real ClientApp in this process.

Tests run the real ServerApp coordinator and ClientApp handlers without Ray or a SuperLink;
every message still goes through Flower Message objects. Recorded traffic lets tests check
exactly what each node sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
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
    def for_config(cls, cfg: FedsovConfig, client_app=None) -> "InProcessGrid":
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


def ledger_epsilons(cfg) -> dict[str, list[float]]:
    """Each node's ledger: the epsilon after every charged round, oldest first."""
    from client.node import LEDGER_FILE
    from common.privacy.ledger import PrivacyLedger

    out = {}
    for node_dir in sorted((Path(cfg.workdir) / "nodes").iterdir()):
        region = cfg.regions[node_dir.name.rsplit("-", 1)[0]].policy.privacy
        ledger = PrivacyLedger(node_dir / LEDGER_FILE, delta=region.delta, unit=region.unit)
        (fingerprint,) = ledger.datasets()
        out[node_dir.name] = [c.epsilon_after for c in ledger.history(fingerprint)]
    return out
