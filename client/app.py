"""Flower ClientApp: a regional node's side of the protocol. Thin glue over `client.node`.

Every reply passes the egress guard (`client.egress`); message types outside the protocol
are refused before any handler runs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure
from client.egress import ALLOWED_MESSAGE_TYPES, guard
from client.settings import (
    NodeSettings,
    PolicyGate,
    deployment_settings,
    node_audit,
    node_identity,
    node_roster,
    simulation_settings,
)
from common.config import config_from_json
from common.errors import FedsovError
from common.runconfig import CONFIG_KEY
from common.schema import SchemaError, check_record
from common.wire import (
    ANCHOR_FIELDS,
    AUDIT_REQUEST_FIELDS,
    DESCRIBE_REQUEST_FIELDS,
    EVIDENCE,
    EXAMPLES,
    GLOBAL_ADAPTER,
    METRICS,
    NODE,
    PLAN,
    REFUSED,
    REQUEST,
    SECAGG,
    SECAGG_KEYS,
    UPDATE,
    RoundPlan,
    aggregation_tag,
    plan_digest,
    record_to_state,
    state_to_record,
)

if TYPE_CHECKING:
    from client.node import RegionNode

_NODES: dict[str, RegionNode] = {}
_GATES: dict[str, PolicyGate] = {}
_SETTINGS: dict[str, NodeSettings] = {}
_LOCK = threading.Lock()


def node_settings(context: Context) -> NodeSettings:
    """Simulation maps a partition id to a region; a deployed SuperNode names its own."""
    raw = str(context.run_config.get(CONFIG_KEY, ""))
    node_config = dict(context.node_config)
    if "partition-id" in node_config:
        key = hashlib.sha256(raw.encode()).hexdigest() + f"/{node_config['partition-id']}"
        make = lambda cfg: simulation_settings(cfg, int(node_config["partition-id"]))  # noqa: E731
    else:
        key = hashlib.sha256((raw + repr(sorted(node_config.items()))).encode()).hexdigest()
        make = lambda cfg: deployment_settings(cfg, node_config)  # noqa: E731
    with _LOCK:
        if key not in _SETTINGS:
            _SETTINGS[key] = make(config_from_json(raw))
        return _SETTINGS[key]


def _node_key(settings: NodeSettings) -> str:
    """The node's settings (a warm worker serves run after run, which may differ) and its policy file's version."""
    policy = settings.policy_file.stat() if settings.policy_file.exists() else None
    return f"{settings!r}|{policy and (policy.st_mtime_ns, policy.st_size)}"


def _replace_older(cache: dict, settings: NodeSettings) -> None:
    """Drop the node's earlier version (older policy or settings) once the logs it read are still there.

    Its logs remember the last entry they saw: a log rolled back since then raises here (TamperedLog or
    LedgerError), so a new version of the node never starts on evidence rolled back under the old one.
    """
    for key, older in list(cache.items()):
        if older.settings.state_dir == settings.state_dir:
            older.audit.entries()
            if not isinstance(older, PolicyGate):
                older.evidence()  # a started node also read its privacy ledger
            del cache[key]


def policy_gate(context: Context) -> PolicyGate:
    """Policy and audit log only, for the messages that touch neither data nor model.

    A process that has not started the node (a worker just restarted, a fresh simulation actor)
    answers these stages without loading torch, the model and the data.
    """
    settings = node_settings(context)
    key = _node_key(settings)
    with _LOCK:
        if key in _NODES:
            return _NODES[key]  # type: ignore[return-value]  # a started node has the same policy and audit log
        if key not in _GATES:
            _replace_older(_GATES, settings)
            _GATES[key] = PolicyGate(settings)
        return _GATES[key]


def region_node(context: Context) -> RegionNode:
    """The node this message is for, with every start check passed.

    Started once per process, settings and policy version: when the region edits its policy
    file, the next message starts the node again under the new rules.
    """
    from client.node import RegionNode

    settings = node_settings(context)
    key = _node_key(settings)
    with _LOCK:
        if key not in _NODES:
            _replace_older(_NODES, settings)
            _NODES[key] = RegionNode(settings)
        return _NODES[key]


def refusal(msg: Message, reason: str) -> Message:
    """A refusal carries only its reason: no update, no metrics."""
    return Message(Error(code=REFUSED, reason=reason), reply_to=msg)


class GuardedClientApp(ClientApp):
    """A ClientApp that refuses message types the protocol does not use, and logs it.

    Whatever fails on the way (even before a node's audit log can be opened) becomes a refusal that
    names only the error's type: exception text can carry data, and a traceback is never sent.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        try:
            if kind not in ALLOWED_MESSAGE_TYPES:
                reason = f"message type {kind!r} is not part of the fedsov protocol; nothing is sent in reply"
                node_audit(node_settings(context)).record("message", "refused", reason=reason, message_type=kind)
                return refusal(message, reason)
            return super().__call__(message, context)
        except FedsovError as err:  # e.g. the node's own settings or roster are broken: its words, no data
            return refusal(message, f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - the last line of defence: nothing of it may leave the node
            return refusal(message, f"node error ({type(err).__name__}); nothing is sent in reply")


app = GuardedClientApp(mods=[guard(lambda context: node_audit(node_settings(context)), refusal)])


def handled(step: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    """Reply with the step's records, or with a refusal: a fedsov error says why, anything else only its type.

    Every refusal is in the node's audit log (the egress guard records what was sent); an unexpected error is
    recorded there in full, and the coordinator learns only that the node failed.
    """

    def handler(msg: Message, context: Context) -> Message:
        try:
            return Message(step(msg, context), reply_to=msg)
        except FedsovError as err:
            secure.clear(context.state)
            return refusal(msg, f"{_who(context)}{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - an unexpected error must still be a logged refusal
            secure.clear(context.state)
            node_audit(node_settings(context)).record(
                "error",
                "refused",
                reason=f"{type(err).__name__}: {str(err)[:2000]}",
                round=_round(msg),
                message_type=msg.metadata.message_type,
            )
            return refusal(msg, f"node error ({type(err).__name__}); details stay in the node's audit log")

    handler.__name__ = step.__name__
    return handler


def _who(context: Context) -> str:
    """'node eu-2 (region eu): ' for a refusal's first words, so the coordinator can say who refused."""
    try:
        settings = node_settings(context)
    except FedsovError:
        return ""
    return f"node {settings.name} (region {settings.region}): "


def records(msg: Message, required: dict[str, type], optional: dict[str, type] | None = None) -> RecordDict:
    """The message's records, exactly the names and kinds its type carries; anything else is refused."""
    optional = optional or {}
    names = set(msg.content.keys())
    if not set(required) <= names <= set(required) | set(optional):
        raise SchemaError(
            f"{msg.metadata.message_type}: records {sorted(names)}, expected {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
        )
    for name in names:
        kind = {**required, **optional}[name]
        if not isinstance(msg.content[name], kind):
            raise SchemaError(f"{msg.metadata.message_type}: record {name!r} is not a {kind.__name__}")
    return msg.content


@app.query("describe")
@handled
def describe(msg: Message, context: Context) -> RecordDict:
    request = check_record(records(msg, {REQUEST: ConfigRecord})[REQUEST], DESCRIBE_REQUEST_FIELDS, "describe request")
    node = region_node(context)
    info, counts = node.describe(request["coordinator-jurisdiction"])
    return RecordDict(
        {NODE: ConfigRecord(info), METRICS: MetricRecord(counts), EVIDENCE: ConfigRecord(node.evidence())}
    )


@app.query("audit")
@handled
def memorisation_audit(msg: Message, context: Context) -> RecordDict:
    content = records(msg, {PLAN: ConfigRecord, GLOBAL_ADAPTER: ArrayRecord, REQUEST: ConfigRecord})
    check_record(content[REQUEST], AUDIT_REQUEST_FIELDS, "audit request")
    node = region_node(context)
    plan = RoundPlan.from_record(content[PLAN])
    metrics, examples = node.memorisation_audit(plan, record_to_state(content[GLOBAL_ADAPTER]))
    return RecordDict({METRICS: MetricRecord(metrics), EXAMPLES: ConfigRecord({"examples": examples})})


@app.train()
@handled
def train(msg: Message, context: Context) -> RecordDict:
    content = records(msg, {PLAN: ConfigRecord, GLOBAL_ADAPTER: ArrayRecord}, {REQUEST: ConfigRecord})
    plan = RoundPlan.from_record(content[PLAN])
    anchor = check_record(content[REQUEST], ANCHOR_FIELDS, "anchor") if REQUEST in content else None
    node = region_node(context)
    outcome = node.train_round(plan, record_to_state(content[GLOBAL_ADAPTER]), anchor)
    evidence = ConfigRecord(node.evidence())
    if not plan.secure_aggregation:
        return RecordDict(
            {UPDATE: state_to_record(outcome.update), METRICS: MetricRecord(outcome.metrics), EVIDENCE: evidence}
        )
    units = int(outcome.metrics["num-units"])
    keys = secure.begin(
        context.state,
        aggregation_tag(plan.run_id, plan.round, "train"),
        msg.metadata.dst_node_id,
        "train",
        node_identity(node.settings),
        node.settings.name,
        plan_digest(content[PLAN]),
        {"loss-x-units": float(outcome.metrics["train-loss"]) * units, "units": units},
        update=outcome.update,
    )
    clear = MetricRecord({"num-units": units, "epsilon": float(outcome.metrics["epsilon"])})
    return RecordDict({SECAGG_KEYS: ConfigRecord(keys), METRICS: clear, EVIDENCE: evidence})


@app.evaluate()
@handled
def evaluate(msg: Message, context: Context) -> RecordDict:
    content = records(msg, {PLAN: ConfigRecord, GLOBAL_ADAPTER: ArrayRecord})
    plan = RoundPlan.from_record(content[PLAN])
    node = region_node(context)
    metrics = node.evaluate(plan, record_to_state(content[GLOBAL_ADAPTER]))
    if not plan.secure_aggregation:
        return RecordDict({METRICS: MetricRecord(metrics)})
    keys = secure.begin(
        context.state,
        aggregation_tag(plan.run_id, plan.round, "evaluate"),
        msg.metadata.dst_node_id,
        "evaluate",
        node_identity(node.settings),
        node.settings.name,
        plan_digest(content[PLAN]),
        {"loss-sum": metrics["loss-sum"], "tokens": metrics["tokens"], "examples": metrics["num-examples"]},
    )
    return RecordDict({SECAGG_KEYS: ConfigRecord(keys)})


def _round(msg: Message) -> int | None:
    return int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else None


def _stage(msg: Message) -> ConfigRecord:
    return records(msg, {SECAGG: ConfigRecord})[SECAGG]


def _cohort_checked(msg: Message, context: Context, nodes_field: str, stage: str) -> tuple[ConfigRecord, PolicyGate]:
    """The stage's record, once the distinct nodes it names meet this node's minimum cohort (repeats never count)."""
    content = _stage(msg)
    gate = policy_gate(context)
    nodes = content.get(nodes_field)
    gate.check_cohort(len(set(nodes)) if isinstance(nodes, list) else 0, stage, _round(msg))
    return content, gate


@handled
def secagg_shares(msg: Message, context: Context) -> RecordDict:
    content, gate = _cohort_checked(msg, context, "node-ids", "key exchange")
    shares = secure.share(context.state, content, node_roster(gate.settings), gate.policy.transfers.min_cohort)
    return RecordDict({SECAGG: ConfigRecord(shares)})


@handled
def secagg_mask(msg: Message, context: Context) -> RecordDict:
    return RecordDict({SECAGG: ConfigRecord(secure.mask(context.state, _stage(msg)))})


@handled
def secagg_confirm(msg: Message, context: Context) -> RecordDict:
    content, gate = _cohort_checked(msg, context, "survivors", "unmasking")
    return RecordDict({SECAGG: ConfigRecord(secure.confirm(context.state, content, node_identity(gate.settings)))})


@handled
def secagg_unmask(msg: Message, context: Context) -> RecordDict:
    gate = policy_gate(context)
    return RecordDict({SECAGG: ConfigRecord(secure.unmask(context.state, _stage(msg), node_roster(gate.settings)))})


# The later secure-aggregation stages are the same for training and evaluation.
for _register in (app.train, app.evaluate):
    _register("secagg_shares")(secagg_shares)
    _register("secagg_mask")(secagg_mask)
    _register("secagg_confirm")(secagg_confirm)
    _register("secagg_unmask")(secagg_unmask)
