"""Flower ClientApp: a regional node's side of the protocol. Thin glue over `client.node`."""

from __future__ import annotations

import hashlib
import threading
from typing import Callable

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure
from client.node import RegionNode, simulation_settings
from common.config import config_from_json
from common.errors import FedsovError
from common.runconfig import CONFIG_KEY
from common.wire import (
    GLOBAL_ADAPTER,
    METRICS,
    NODE,
    PLAN,
    REFUSED,
    SECAGG,
    SECAGG_KEYS,
    UPDATE,
    RoundPlan,
    aggregation_tag,
    record_to_state,
    state_to_record,
)

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


def handled(step: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    """Reply with the step's records, or with a refusal if it raised a fedsov error."""

    def handler(msg: Message, context: Context) -> Message:
        try:
            return Message(step(msg, context), reply_to=msg)
        except FedsovError as err:
            secure.clear(context.state)
            return refusal(msg, err)

    handler.__name__ = step.__name__
    return handler


@app.query("describe")
@handled
def describe(msg: Message, context: Context) -> RecordDict:
    info, counts = region_node(context).describe()
    return RecordDict({NODE: ConfigRecord(info), METRICS: MetricRecord(counts)})


@app.train()
@handled
def train(msg: Message, context: Context) -> RecordDict:
    node = region_node(context)
    plan = RoundPlan.from_record(msg.content[PLAN])
    outcome = node.train_round(plan, record_to_state(msg.content[GLOBAL_ADAPTER]))
    if not plan.secure_aggregation:
        return RecordDict({UPDATE: state_to_record(outcome.update), METRICS: MetricRecord(outcome.metrics)})
    units = int(outcome.metrics["num-units"])
    keys = secure.begin(
        context.state, aggregation_tag(plan.run_id, plan.round, "train"), msg.metadata.dst_node_id, "train",
        node.settings.region, {"loss-x-units": float(outcome.metrics["train-loss"]) * units, "units": units},
        update=outcome.update,
    )
    clear = MetricRecord({"num-units": units, "epsilon": float(outcome.metrics["epsilon"])})
    return RecordDict({SECAGG_KEYS: ConfigRecord(keys), METRICS: clear})


@app.evaluate()
@handled
def evaluate(msg: Message, context: Context) -> RecordDict:
    node = region_node(context)
    plan = RoundPlan.from_record(msg.content[PLAN])
    metrics = node.evaluate(plan, record_to_state(msg.content[GLOBAL_ADAPTER]))
    if not plan.secure_aggregation:
        return RecordDict({METRICS: MetricRecord(metrics)})
    keys = secure.begin(
        context.state, aggregation_tag(plan.run_id, plan.round, "evaluate"), msg.metadata.dst_node_id, "evaluate",
        node.settings.region,
        {"loss-sum": metrics["loss-sum"], "tokens": metrics["tokens"], "examples": metrics["num-examples"]},
    )
    return RecordDict({SECAGG_KEYS: ConfigRecord(keys)})


def _stage(step: Callable) -> Callable[[Message, Context], RecordDict]:
    def run(msg: Message, context: Context) -> RecordDict:
        return RecordDict({SECAGG: ConfigRecord(step(context.state, msg.content[SECAGG]))})

    run.__name__ = step.__name__
    return run


# The later secure-aggregation stages are the same for training and evaluation.
for _register in (app.train, app.evaluate):
    _register("secagg_shares")(handled(_stage(secure.share)))
    _register("secagg_mask")(handled(_stage(secure.mask)))
    _register("secagg_unmask")(handled(_stage(secure.unmask)))
