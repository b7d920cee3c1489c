"""A Flower Grid that delivers messages to the real ClientApp in this process.

Tests run the real ServerApp coordinator and ClientApp handlers without Ray or a SuperLink;
every message still goes through Flower Message objects. Recorded traffic lets tests check
exactly what each node sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable
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
            self.sent.append(msg)
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            self.received.append(reply)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]
