"""A node trusts nothing the coordinator sends (issue 12): each deviation below is played through the
real ClientApp and must be refused with nothing sent, or charged exactly; epsilon never falls and no
message hangs a node."""

from __future__ import annotations

import itertools
import math
import signal
from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from common.wire import GLOBAL_ADAPTER, PLAN, REQUEST, state_to_record
from tests.inprocess import Federation, assert_refused_with_nothing_sent


@pytest.fixture(autouse=True)
def no_hang():
    """A message that sends a node into an endless loop fails the test instead of hanging the suite."""

    def stuck(*_):
        raise TimeoutError("the node did not answer within 120 s: a hostile message hung it")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, model_cache):
    from tests.conftest import MICRO_MODEL

    work = tmp_path_factory.mktemp("hostile")
    return Federation(
        [
            f"workdir={work}",
            f"model.cache_dir={model_cache}",
            *MICRO_MODEL,
            "regions=[eu,us]",
            "data.users_per_region=60",
            "federation.rounds=3",
            "federation.local_steps=2",
            "federation.batch_size=8",
            "federation.eval_batch_size=64",
            "model.max_length=64",
            "audit.exposure_candidates=60",
            "audit.one_run_canaries=8",
            "audit.generations=2",
            "audit.mia_members=20",
        ]
    )


def spent(federation, node: str) -> list[tuple[int, float]]:
    """(steps, epsilon after) of every charge this node made, oldest first."""
    from tests.inprocess import region_ledger

    ledger = region_ledger(federation.cfg, node.rsplit("-", 1)[0])
    return [(c.steps, c.epsilon_after) for c in ledger.charges() if c.node == node]


HOSTILE_PLANS = [
    # The budget refund: a negative, fractional or boolean step count.
    ({"local_steps": -202}, "local-steps"),
    ({"local_steps": 0}, "local-steps"),
    ({"local_steps": 0.001}, "whole number"),
    ({"local_steps": 2.5}, "whole number"),
    ({"local_steps": True}, "whole number"),
    ({"local_steps": "2"}, "whole number"),
    ({"local_steps": 10**9}, "local-steps"),
    # Values that sent the accountant into an endless loop or crashed training after an "accepted".
    ({"noise_multiplier": math.nan}, "finite"),
    ({"noise_multiplier": math.inf}, "finite"),
    ({"noise_multiplier": -1.0}, "noise-multiplier"),
    ({"noise_multiplier": 0.0}, "noise-multiplier"),
    ({"batch_size": math.nan}, "whole number"),
    ({"batch_size": 0}, "batch-size"),
    ({"batch_size": 10**12}, "batch-size"),
    ({"total_rounds": 0}, "total-rounds"),
    ({"max_grad_norm": math.nan}, "finite"),
    ({"max_grad_norm": -1.0}, "max-grad-norm"),
    ({"learning_rate": math.inf}, "finite"),
    ({"learning_rate": -0.1}, "learning-rate"),
    ({"lora_rank": 0}, "lora-rank"),
    ({"lora_rank": 10**6}, "lora-rank"),
    ({"lora_alpha": math.nan}, "finite"),
    ({"lora_dropout": 1.0}, "lora-dropout"),
    ({"lora_seed": -1}, "lora-seed"),
    ({"eval_batch_size": 0}, "eval-batch-size"),
    ({"cohort_size": 0}, "cohort-size"),
    ({"round": 4}, "past total-rounds"),
    ({"run_id": "x" * 10_000}, "run-id"),
    ({"run_id": "../../etc/passwd"}, "run-id"),
    ({"coordinator_jurisdiction": "EU; DROP"}, "coordinator-jurisdiction"),
    ({"lora_target_modules": ["c_attn", "c_attn"]}, "repeat"),
    ({"lora_target_modules": "c_attn"}, "must be a list"),
    ({"dp_enabled": 1}, "true or false"),
    ({"noise_multiplier": None, "target_epsilon": None}, "exactly one of"),
    ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of"),
    ({"send-me-your-data": True}, "unknown fields"),
    ({"model_fingerprint": None}, "missing fields"),
    ({"secure_aggregation": None}, "missing fields"),
]


@pytest.mark.parametrize("changes, fragment", HOSTILE_PLANS, ids=[str(c) for c, _ in HOSTILE_PLANS])
def test_a_hostile_plan_is_refused_and_costs_nothing(federation, changes, fragment):
    before = spent(federation, "eu-1")
    reply = federation.train_raw("eu-1", federation.plan_with(**changes))
    assert_refused_with_nothing_sent(reply, "SchemaError", fragment)
    assert spent(federation, "eu-1") == before
    last = federation.audit("eu-1")[-1]
    assert last["action"] == "egress" and last["decision"] == "refusal_sent"


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"coordinator_jurisdiction": "CN"}, "pins place it in 'EU'"),  # a coordinator cannot choose where it is
        ({"lora_target_modules": ["no_such_layer"]}, "Cannot attach LoRA"),
        ({"batch_size": 10_000}, "not below the"),
        ({"round": 0}, "numbered from 1"),
        ({"model_fingerprint": "0" * 64}, "differs from this node's"),
    ],
)
def test_plans_a_node_cannot_honour_are_refused_before_training(federation, changes, fragment):
    before = spent(federation, "eu-2")
    reply = federation.train_raw("eu-2", federation.plan_with(**changes))
    assert_refused_with_nothing_sent(reply, fragment)
    assert spent(federation, "eu-2") == before


def test_a_node_charges_exactly_the_steps_that_ran_and_rounds_only_move_forward(federation):
    reply = federation.train_raw("us-1", federation.plan_with(local_steps=3, round=1))
    assert not reply.has_error(), reply.error.reason
    ((steps, first),) = spent(federation, "us-1")
    assert steps == 3
    # A replay of round 1, and a rewind to it after round 2, are refused; nothing is charged twice.
    assert_refused_with_nothing_sent(federation.train_raw("us-1", federation.plan_with(round=1)), "only moves forward")
    assert not federation.train_raw("us-1", federation.plan_with(round=2, local_steps=1)).has_error()
    assert_refused_with_nothing_sent(federation.train_raw("us-1", federation.plan_with(round=1)), "only moves forward")
    history = spent(federation, "us-1")
    assert [s for s, _ in history] == [3, 1]
    assert all(b > a for (_, a), (_, b) in itertools.pairwise(history))  # epsilon never falls


def test_a_forged_or_nan_adapter_is_refused(federation):
    state = federation.model.initial_state()
    bad = OrderedDict((k, torch.full_like(v, math.nan)) for k, v in state.items())
    reply = federation.train_raw("eu-1", federation.plan_with(), state=bad)
    assert_refused_with_nothing_sent(reply, "NaN or infinite")
    extra = OrderedDict(state, **{"base_model.model.transformer.wte.weight": torch.zeros(4, 4)})
    assert_refused_with_nothing_sent(
        federation.train_raw("eu-1", federation.plan_with(), state=extra), "does not match this model"
    )


def test_unexpected_records_in_a_message_are_refused(federation):
    plan, state = federation.plan_with(), state_to_record(federation.model.initial_state())
    extra = RecordDict({PLAN: plan, GLOBAL_ADAPTER: state, "payload": ConfigRecord({"x": 1})})
    assert_refused_with_nothing_sent(federation.send("eu-1", "train", extra), "records")
    anchor = ConfigRecord({"ledger-genesis": "zz", "ledger-entries": 1, "ledger-head": "0" * 64})
    assert_refused_with_nothing_sent(federation.train_raw("eu-1", plan, **{REQUEST: anchor}), "ledger-genesis")


def test_an_unexpected_error_is_a_logged_refusal_and_its_text_stays_on_the_node(federation, monkeypatch):
    from client.node import RegionNode

    def broken(self, plan, state, anchor=None):
        raise KeyError("the secret text of a record")

    monkeypatch.setattr(RegionNode, "train_round", broken)
    reply = federation.train_raw("eu-1", federation.plan_with())
    assert_refused_with_nothing_sent(reply, "node error (KeyError)")
    assert "secret" not in reply.error.reason
    errors = [e for e in federation.audit("eu-1") if e["action"] == "error"]
    assert errors and "the secret text of a record" in errors[-1]["reason"]


def _adapter_record(values: torch.Tensor, layout: bytes):
    """A global adapter as a deviating coordinator may build it: any values, any layout bytes."""
    from flwr.app import ArrayRecord

    return ArrayRecord(OrderedDict(values=values, layout=torch.frombuffer(bytearray(layout), dtype=torch.uint8)))


def _global_adapter(federation, kind: str):
    import json

    state = federation.model.initial_state()
    names, shapes = list(state), [list(t.shape) for t in state.values()]
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    if kind == "sizes differ":  # the layout claims one value more than arrived
        shapes[0][0] += 1
    elif kind == "nan":
        flat[0] = float("nan")
    elif kind == "unknown tensor":  # well formed, but names a tensor this node's model does not have
        names[0] = "base_model.model.lm_head.lora_A.weight"
    elif kind == "other shape":  # the same values, the first tensor transposed
        shapes[0] = shapes[0][::-1]
    return _adapter_record(flat, json.dumps([[n, s] for n, s in zip(names, shapes, strict=True)]).encode())


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("sizes differ", "The adapter layout describes"),
        ("nan", "NaN or infinite"),
        ("unknown tensor", "unexpected ['base_model.model.lm_head.lora_A.weight']"),
        ("other shape", "shape"),
    ],
)
def test_a_malformed_global_adapter_is_refused_and_costs_nothing(federation, kind, reason):
    before = spent(federation, "eu-2")
    content = RecordDict({PLAN: federation.plan_with(), GLOBAL_ADAPTER: _global_adapter(federation, kind)})
    reply = federation.send("eu-2", "train", content)
    assert_refused_with_nothing_sent(reply, reason)
    assert spent(federation, "eu-2") == before


# -- bounded queries ----------------------------------------------------------------------------


def evaluate(federation, node: str, round_number: int, state, run_id: str | None = None):
    import dataclasses

    plan = dataclasses.replace(federation.plan, round=round_number, **({"run_id": run_id} if run_id else {}))
    content = RecordDict({PLAN: plan.to_record(), GLOBAL_ADAPTER: state_to_record(state)})
    return federation.send(node, "evaluate", content, round_number)


def audit(federation, node: str, state, run_id: str | None = None):
    import dataclasses

    plan = dataclasses.replace(
        federation.plan, round=federation.plan.total_rounds, **({"run_id": run_id} if run_id else {})
    )
    content = RecordDict(
        {
            PLAN: plan.to_record(),
            GLOBAL_ADAPTER: state_to_record(state),
            REQUEST: ConfigRecord({"coordinator-jurisdiction": plan.coordinator_jurisdiction}),
        }
    )
    return federation.send(node, "query.audit", content, plan.round)


def test_evaluation_and_audit_are_bounded_to_the_run_the_node_trained_in(federation):
    run = "bounded#1"
    initial = federation.model.initial_state()
    crafted = OrderedDict((k, v + 0.01) for k, v in initial.items())
    # Round 0 evaluates only the base model (LoRA B = 0), once.
    assert_refused_with_nothing_sent(evaluate(federation, "us-2", 0, crafted, run), "initial adapter")
    assert not evaluate(federation, "us-2", 0, initial, run).has_error()
    assert_refused_with_nothing_sent(evaluate(federation, "us-2", 0, initial, run), "already evaluated")
    # Round 1 only after this node trained round 1 of this run.
    assert_refused_with_nothing_sent(evaluate(federation, "us-2", 1, crafted, run), "did not train round 1")
    assert_refused_with_nothing_sent(audit(federation, "us-2", crafted, run), "trained nothing in run")
    assert not federation.train_raw("us-2", federation.plan_with(run_id=run, round=1)).has_error()
    assert not evaluate(federation, "us-2", 1, crafted, run).has_error()
    # The audit runs once, on the adapter the node last evaluated in the run, and keeps the verbatim-PII
    # count (a membership oracle for whatever a crafted adapter generates) on the node.
    assert_refused_with_nothing_sent(audit(federation, "us-2", initial, run), "final adapter")
    reply = audit(federation, "us-2", crafted, run)
    assert not reply.has_error(), reply.error.reason
    assert "pii-spans-verbatim-in-training" not in reply.content["metrics"]
    kept = [e for e in federation.audit("us-2") if e["action"] == "memorisation_audit"][-1]
    assert "pii_spans_verbatim_in_training" in kept
    assert_refused_with_nothing_sent(audit(federation, "us-2", crafted, run), "already audited")


def test_the_coordinators_jurisdiction_comes_from_the_nodes_pins(small_overrides, config_dir):
    """A PIPL node trains for a CN coordinator only where its own pins say the coordinator is in CN."""
    from client.node import RegionNode, simulation_settings
    from common.data.prepare import ensure_synthetic_data
    from common.errors import PolicyViolation
    from server.simulation import resolve_run_config

    cfg = resolve_run_config(small_overrides + ["regions=[cn]", "regions.cn.clients=1"])
    ensure_synthetic_data(cfg, log=lambda m: None)
    node = RegionNode(simulation_settings(cfg, 0))  # pinned: local coordinator in EU (the shipped default)
    with pytest.raises(PolicyViolation, match="declares jurisdiction 'CN', but this node's pins place it in 'EU'"):
        node.describe("CN")  # an EU coordinator claiming to be in China
    with pytest.raises(PolicyViolation, match="PIPL policy forbids"):
        node.describe("EU")
    (config_dir / "coordinators.yaml").write_text("local:\n  jurisdiction: CN\npinned: []\n")
    assert RegionNode(simulation_settings(cfg, 0)).describe("CN")[0]["region"] == "cn"


def test_a_node_trusts_a_coordinator_ca_only_once_pinned(tmp_path, config_dir, capsys):
    from common.cli import main
    from common.coordinator_pins import jurisdiction_for_ca
    from common.credentials import make_certificates
    from common.errors import ConfigError

    ca = make_certificates(tmp_path / "certs", ["localhost"]).ca_cert
    with pytest.raises(ConfigError, match="is not pinned"):
        jurisdiction_for_ca(config_dir, ca)
    assert main(["node", "trust", "--ca", str(ca), "--jurisdiction", "SG", "--name", "sg-hub"]) == 0
    assert "Pinned coordinator 'sg-hub'" in capsys.readouterr().out
    assert jurisdiction_for_ca(config_dir, ca) == "SG"
    assert main(["node", "trust", "--ca", str(ca), "--jurisdiction", "CN", "--name", "sg-hub"]) == 2
    assert "already pinned to SG" in capsys.readouterr().err


# -- evidence across runs -------------------------------------------------------------------------


def test_resharding_keeps_histories_and_a_deleted_node_state_is_caught_by_its_anchors(small_overrides):
    import shutil
    from pathlib import Path

    from tests.inprocess import run_federation

    one_round = small_overrides + ["federation.rounds=1", "federation.local_steps=2", "audit.enabled=false"]
    cfg, first, _, _ = run_federation(one_round + ["regions.eu.clients=2", "regions.us.clients=2"], run_name="first")
    trained = {e["node"]: e["epsilon"] for e in first.read_events() if e["event"] == "node_trained"}
    assert set(trained) == {"eu-1", "eu-2", "us-1", "us-2"}
    # Re-shard eu from 2 clients to 3: eu-3 is a new node, yet every person it gets was trained before and
    # keeps that history (the region's ledger follows the data, not the node folder).
    _, second, _, _ = run_federation(one_round + ["regions.eu.clients=3"], run_name="second")
    joined = {e["node"]: e["epsilon"] for e in second.read_events() if e["event"] == "node_joined"}
    assert min(joined["eu-1"], joined["eu-2"], joined["eu-3"]) >= min(trained["eu-1"], trained["eu-2"]) > 0
    # Delete all of us-1's state (audit log, its region's ledger, its evidence keys) between runs, as on a machine
    # whose node processes restart: us-1 starts afresh and a new us ledger appears. The coordinator still holds
    # both us nodes' anchors, so the next run excludes them and says why.
    from client import app as client_app

    work = Path(cfg.workdir)
    for folder in (
        work / "nodes" / "us-1",
        work / "keys" / "us-1",
        work / "ledgers" / "us",
        work / "keys" / "ledger-us",
    ):
        shutil.rmtree(folder)
    for cache in (client_app._NODES, client_app._GATES, client_app._SETTINGS):
        cache.clear()  # new node processes, as after a restart
    _, third, summary, _ = run_federation(one_round + ["regions.eu.clients=3"], run_name="third")
    failed = {e["node"]: e["reason"] for e in third.read_events() if e["event"] == "node_evidence_failed"}
    assert "us-1" in failed and "deleted or replaced" in failed["us-1"]
    # us-2 kept its own audit log, which records the ledger head it last charged: the fresh ledger fails that check.
    unavailable = " ".join(summary["unavailable_nodes"])
    assert "us-1: evidence check failed" in unavailable and "privacy ledger" in unavailable.lower()
    assert "us" not in third.read_metrics()[-1].get("epsilon", {})
