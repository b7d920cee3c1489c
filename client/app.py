"""Flower ClientApp: a regional node's side of the protocol. Thin glue over `client.node`."""

from __future__ import annotations

import hashlib
import threading

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import RegionNode, simulation_settings
from common.config import config_from_json
from common.errors import FedsovError
from common.runconfig import CONFIG_KEY
from common.wire import GLOBAL_ADAPTER, METRICS, NODE, PLAN, REFUSED, UPDATE, RoundPlan, record_to_state, state_to_record

app = ClientApp()

_NODES: dict[str, RegionNode] = {}
_NODES_LOCK = threading.Lock()


def region_node(context: Context) -> RegionNode:
    """The node this message is for, created once per process and configuration."""
    raw = str(context.run_config.get(CONFIG_KEY, ""))
    if "partition-id" not in context.node_config:
        raise FedsovError(
            "This ClientApp runs only in fedsov's simulation for now: the node config has no partition-id."
        )
    key = hashlib.sha256(raw.encode()).hexdigest() + f"/{context.node_config['partition-id']}"
    with _NODES_LOCK:
        if key not in _NODES:
            settings = simulation_settings(config_from_json(raw), int(context.node_config["partition-id"]))
            _NODES[key] = RegionNode(settings)
        return _NODES[key]


def refusal(msg: Message, err: FedsovError) -> Message:
    """A refusal carries only its reason: no update, no metrics."""
    return Message(Error(code=REFUSED, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    try:
        info, counts = region_node(context).describe()
    except FedsovError as err:
        return refusal(msg, err)
    return Message(RecordDict({NODE: ConfigRecord(info), METRICS: MetricRecord(counts)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        node = region_node(context)
        plan = RoundPlan.from_record(msg.content[PLAN])
        outcome = node.train_round(plan, record_to_state(msg.content[GLOBAL_ADAPTER]))
    except FedsovError as err:
        return refusal(msg, err)
    content = RecordDict({UPDATE: state_to_record(outcome.update), METRICS: MetricRecord(outcome.metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        node = region_node(context)
        plan = RoundPlan.from_record(msg.content[PLAN])
        metrics = node.evaluate(plan, record_to_state(msg.content[GLOBAL_ADAPTER]))
    except FedsovError as err:
        return refusal(msg, err)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
