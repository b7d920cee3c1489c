"""Region policies enforced by each region's own node: start checks, plan checks against a
hostile coordinator, the egress guard, planning, provenance and exports.

A hostile coordinator is played by sending hand-made messages through the in-process grid to
the real ClientApp; every refusal must leave nothing sent (checked at the message level)."""

import json
from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from client.node import LEDGER_FILE
from common.data.prepare import ensure_synthetic_data
from common.data.records import Record, write_jsonl
from common.wire import REQUEST, SECAGG
from server.simulation import resolve_run_config
from tests.conftest import edit_policy
from tests.inprocess import Federation, assert_refused_with_nothing_sent, region_ledger, run_federation


@pytest.fixture
def federation(small_overrides):
    return Federation(small_overrides + ["federation.local_steps=2"])


# -- hostile coordinator ----------------------------------------------------------------------


def test_rmsprop_without_dp_is_refused_where_the_policy_allows_no_dp(federation, config_dir):
    """DP-RMSprop needs the DP noise's variance to start from: a plan without DP is refused before training,
    on a node whose policy would accept plaintext training; a node requiring DP names its own rule first."""
    fed = federation
    edit_policy(config_dir, "us", "privacy.require_dp", False)  # taken at the node's next message
    reply = fed.train("us-1", optimizer="rmsprop", dp_enabled=False)
    assert_refused_with_nothing_sent(reply, "PolicyViolation", "optimizer 'rmsprop'", "use adamw")
    plans = [e for e in fed.audit("us-1") if e["action"] == "plan"]
    assert plans[-1]["decision"] == "refused" and "rmsprop" in plans[-1]["reason"]
    assert region_ledger(fed.cfg, "us").charges() == []
    assert_refused_with_nothing_sent(fed.train("eu-1", optimizer="rmsprop", dp_enabled=False), "requires DP-SGD")
    assert not fed.train("us-1", optimizer="adamw", dp_enabled=False).has_error()  # the fix the message names


def test_weaker_sigma_is_raised_to_the_policy_minimum(federation):
    reply = federation.train("eu-1", noise_multiplier=0.1, target_epsilon=None)
    assert not reply.has_error() and set(reply.content) == {"secagg-keys", "metrics", "evidence"}
    assert federation.ledger_sigmas("eu-1") == [0.8]  # GDPR preset floor, not the coordinator's 0.1
    plan_entry = [e for e in federation.audit("eu-1") if e["action"] == "plan"][-1]
    assert plan_entry["decision"] == "adjusted" and "raised from 0.1 to the policy minimum 0.8" in plan_entry["reason"]


def test_larger_clip_norm_is_lowered_to_the_policy_maximum(federation):
    federation.train("us-1", max_grad_norm=10.0)
    plan_entry = [e for e in federation.audit("us-1") if e["action"] == "plan"][-1]
    assert plan_entry["decision"] == "adjusted" and plan_entry["max_grad_norm"] == 1.0
    assert "clip norm lowered from 10 to the policy maximum 1" in plan_entry["reason"]


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"secure_aggregation": False}, ["requires secure aggregation", "plaintext update"]),
        ({"coordinator_jurisdiction": "XX"}, ["declares jurisdiction 'XX'", "pins place it in 'EU'"]),
        ({"dp_enabled": False}, ["requires DP-SGD"]),
        ({"cohort_size": 2}, ["below the policy's minimum cohort 3"]),
    ],
)
def test_plans_that_break_the_policy_are_refused(federation, changes, fragments):
    reply = federation.train("eu-1", **changes)
    assert_refused_with_nothing_sent(reply, "PolicyViolation", *fragments)
    assert federation.ledger_sigmas("eu-1") == []  # nothing trained, nothing charged
    assert [e for e in federation.audit("eu-1") if e["action"] in ("plan", "transfer")][-1]["decision"] == "refused"


def test_a_smaller_real_cohort_than_planned_is_refused_at_key_exchange(federation):
    federation.train("eu-1")
    keys = ConfigRecord(
        {
            "node-ids": [federation.by_name["eu-1"], federation.by_name["us-1"]],
            "c-pks": [b"\x01" * 32] * 2,
            "s-pks": [b"\x02" * 32] * 2,
            "threshold": 2,
        }
    )
    reply = federation.send("eu-1", "train.secagg_shares", RecordDict({SECAGG: keys}))
    assert_refused_with_nothing_sent(reply, "key exchange: 2 client(s)", "minimum cohort 3")


def test_message_types_outside_the_protocol_are_refused(federation):
    for kind in ("query.samples", "query", "train.export_data"):
        reply = federation.send("eu-1", kind, RecordDict({REQUEST: ConfigRecord({"n": 10})}))
        assert_refused_with_nothing_sent(reply, "not part of the fedsov protocol")
    assert any(e["action"] == "message" and e["decision"] == "refused" for e in federation.audit("eu-1"))


def test_a_forbidden_coordinator_learns_nothing_not_even_counts(small_overrides, config_dir):
    edit_policy(config_dir, "us", "transfers.allowed_coordinator_jurisdictions", ["US-CA"])
    fed = Federation(small_overrides + ["regions=[eu,us,sg]"])
    assert set(fed.by_name) == {"eu-1", "eu-2", "sg-1", "sg-2"}
    describe = [m for m in fed.grid.received if m.metadata.message_type == "query.describe" and m.has_error()]
    assert len(describe) == 2
    for reply in describe:
        assert_refused_with_nothing_sent(reply, "CCPA/CPRA policy forbids sending updates to a coordinator in EU")


# -- egress guard -----------------------------------------------------------------------------


@pytest.fixture
def plaintext_federation(small_overrides, config_dir):
    for region in ("eu", "us"):
        edit_policy(config_dir, region, "transfers.require_secure_aggregation", False)
    return Federation(small_overrides + ["secure_aggregation.enabled=false", "federation.local_steps=2"])


def test_an_update_with_an_extra_key_is_blocked(plaintext_federation, monkeypatch):
    from client.node import RegionNode

    real = RegionNode.train_round

    def leaky(self, plan, state, anchor=None):
        outcome = real(self, plan, state, anchor)
        outcome.update = OrderedDict(outcome.update, embeddings=torch.randn(16, 64))
        return outcome

    monkeypatch.setattr(RegionNode, "train_round", leaky)
    reply = plaintext_federation.train("us-1")
    assert_refused_with_nothing_sent(reply, "egress guard blocked", "unexpected ['embeddings']")
    blocked = [e for e in plaintext_federation.audit("us-1") if e["action"] == "egress" and e["decision"] == "blocked"]
    assert blocked and blocked[-1]["bytes_sent"] == 0


@pytest.mark.parametrize(
    "leak, fragment",
    [
        ({"token-ids": [101, 2023, 2003]}, "metrics"),
        ({"train-loss": [2.1, 3.4, 0.2]}, "not a single number"),
    ],
)
def test_per_example_values_in_metrics_are_blocked(plaintext_federation, monkeypatch, leak, fragment):
    from client.node import RegionNode

    real = RegionNode.train_round

    def leaky(self, plan, state, anchor=None):
        outcome = real(self, plan, state, anchor)
        outcome.metrics.update(leak)
        return outcome

    monkeypatch.setattr(RegionNode, "train_round", leaky)
    assert_refused_with_nothing_sent(plaintext_federation.train("us-1"), "egress guard blocked", fragment)


def test_an_oversized_masked_input_is_blocked(federation, monkeypatch):
    from client import secure

    real_mask = secure.mask
    monkeypatch.setattr(
        secure, "mask", lambda state, content: {"masked": real_mask(state, content)["masked"] + b"x" * 400}
    )
    from client import app as client_app

    monkeypatch.setattr(client_app.secure, "mask", secure.mask)
    run = federation.coordinator
    result = run._train(federation.plan, federation.model.initial_state())[1]
    assert result["aggregated"] is False
    masks = [m for m in federation.grid.received if m.metadata.message_type == "train.secagg_mask"]
    assert masks and all(m.has_error() and "masked input is" in m.error.reason for m in masks)


# -- node start -------------------------------------------------------------------------------


def test_wrong_region_data_stops_the_node_naming_file_and_record(small_overrides):
    cfg = resolve_run_config(small_overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    stray = f"{cfg.data.root}/eu/part-00009.jsonl"
    write_jsonl(
        [
            Record("parcel for Jane Roe, 12 Elm St", "us", "us-u99", True),
            Record("another US record", "us", "us-u98", True),
        ],
        stray,
    )
    fed = Federation(small_overrides)
    assert set(fed.by_name) == {"us-1", "us-2"}
    refusals = [m for m in fed.grid.received if m.metadata.message_type == "query.describe" and m.has_error()]
    assert len(refusals) == 2
    for reply in refusals:
        assert_refused_with_nothing_sent(reply, "ResidencyViolation", "part-00009.jsonl line 1", "record region 'us'")
    start = [e for e in fed.audit("eu-1") if e["action"] == "start"]
    assert start and start[-1]["decision"] == "refused"


def test_data_outside_the_storage_roots_stops_the_node(small_overrides, config_dir, tmp_path):
    edit_policy(config_dir, "eu", "residency.storage_roots", [str(tmp_path / "eu-vault")])
    fed = Federation(small_overrides)
    reasons = [m.error.reason for m in fed.grid.received if m.has_error()]
    assert len(reasons) == 2 and all("outside the storage locations" in r and "eu-vault" in r for r in reasons)


def test_a_node_given_another_regions_policy_refuses_to_start(small_overrides, config_dir):
    from client.node import RegionNode, simulation_settings
    from common.errors import ConfigError

    cfg = resolve_run_config(small_overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    # The eu node's policy file is replaced by the US one (after the coordinator read its copy).
    (config_dir / "regions" / "eu.yaml").write_text((config_dir / "regions" / "us.yaml").read_text())
    with pytest.raises(ConfigError, match="eu.yaml declares region 'us' .* must hold the rules of region 'eu'"):
        RegionNode(simulation_settings(cfg, 0))


def test_data_use_rules_exclude_count_and_scrub(small_overrides):
    from client.node import RegionNode, simulation_settings

    cfg = resolve_run_config(small_overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    eu = RegionNode(simulation_settings(cfg, 0))
    counts = eu.data.counts
    assert counts["excluded_no_consent"] > 0 and counts["excluded_special"] > 0 and counts["scrubbed_spans"] > 0
    texts = [t for u in eu.data.train_units for t in u.texts]
    assert not any("@" in t for t in texts) and any("[EMAIL_ADDRESS]" in t for t in texts)
    assert not any("I have type 1 diabetes" in t for t in texts)  # special category, GDPR Art. 9
    us = RegionNode(simulation_settings(cfg, 2))  # the US preset keeps identifiers (no scrubbing)
    assert us.data.counts["scrubbed_spans"] == 0 and any("@" in t for u in us.data.train_units for t in u.texts)


# -- planning, summary, provenance, export ---------------------------------------------------


def test_coordinator_plans_around_policies(small_overrides):
    from server.planning import plan_regions

    cfg = resolve_run_config(small_overrides + ["regions=[eu,us,cn]"])
    plan = plan_regions(cfg)
    assert set(plan.included) == {"eu", "us"} and plan.cohort == 4
    assert "PIPL policy forbids sending updates to a coordinator in EU" in plan.excluded["cn"]
    # A cohort too small for the EU's minimum of 3 leaves the EU out; the US, then alone with one
    # client, is below its own minimum of 2 and goes too.
    small = plan_regions(resolve_run_config(small_overrides + ["regions.eu.clients=1", "regions.us.clients=1"]))
    assert "at least 3 clients" in small.excluded["eu"] and "offers 1" in small.excluded["us"]
    assert not small.included


def test_run_shows_exclusions_writes_manifest_and_export_obeys_it(small_overrides, tmp_path):
    from common.audit import EvidenceKey, HashChainLog
    from common.errors import PolicyViolation
    from server.provenance import MANIFEST, export_adapter

    cfg, run, summary, grid = run_federation(
        small_overrides
        + ["regions=[eu,us,cn]", "federation.rounds=1", "federation.local_steps=2", "audit.enabled=false"]
    )
    assert "PIPL" in summary["excluded_regions"]["cn"] and set(summary["regions"]) == {"eu", "us"}
    cn_replies = [m for m in grid.received if m.has_error()]
    assert len(cn_replies) == 2 and all("PIPL policy forbids" in m.error.reason for m in cn_replies)
    manifest = json.loads((run.adapter_dir / MANIFEST).read_text())
    assert set(manifest["contributing_regions"]) == {"eu", "us"}
    eu = manifest["contributing_regions"]["eu"]
    assert eu["law"] == "GDPR" and eu["allowed_deployment"] == ["EU"] and eu["rounds_contributed"] == 1
    assert len(eu["policy_hashes"][0]) == 64 and 0 < eu["epsilon"] <= 3.0
    assert "cn" in manifest["excluded_regions"]
    with pytest.raises(PolicyViolation, match="eu: GDPR policy allows deployment only in EU"):
        export_adapter(run.path, tmp_path / "to-us", "US-CA")
    assert not (tmp_path / "to-us").exists()
    export_adapter(run.path, tmp_path / "to-eu", "EU")
    assert (tmp_path / "to-eu" / "adapter_model.safetensors").is_file() and (tmp_path / "to-eu" / MANIFEST).is_file()
    key = EvidenceKey.load(run.coordinator_key_dir)
    decisions = [(e["action"], e["decision"]) for e in HashChainLog(run.path / "audit.jsonl", key).entries()]
    assert ("export", "refused") in decisions and ("export", "accepted") in decisions
    assert ("region", "excluded") in decisions and ("round", "aggregated") in decisions


def test_tampered_ledger_makes_the_node_refuse_to_train(small_overrides):
    cfg, run, _, _ = run_federation(
        small_overrides + ["federation.rounds=1", "federation.local_steps=2", "audit.enabled=false"]
    )
    ledger = f"{cfg.workdir}/ledgers/eu/{LEDGER_FILE}"
    lines = open(ledger).read().splitlines()
    open(ledger, "w").write("\n".join(lines[:-1]) + "\n")  # drop the last charge
    from client.node import RegionNode, simulation_settings
    from common.errors import LedgerError

    with pytest.raises(LedgerError, match="truncated"):
        RegionNode(simulation_settings(cfg, 0))
    # Deleting the ledger together with its head does not reset the budget either: the node's
    # audit log still records the charges.
    import os

    os.remove(ledger)
    os.remove(ledger + ".head")
    with pytest.raises(LedgerError, match="audit log records 1 charge"):
        RegionNode(simulation_settings(cfg, 0))
