"""The coordinator and the regional nodes together, in process (real ServerApp and ClientApp
code, Flower messages, no Ray): training, accounting, checkpoints, resume, refusals."""

import json

import pytest
import torch

from common.config import load_config
from common.data.prepare import ensure_synthetic_data
from common.errors import FederationError
from server.simulation import resolve_run_config
from tests.conftest import edit_policy
from tests.inprocess import ledger_epsilons, run_federation


def test_federated_dp_lora_trains_accounts_and_saves(small_overrides):
    # No memorisation audit: it is checked in-process in test_leakage, test_habits and test_hostile_coordinator.
    cfg, run, summary, grid = run_federation(small_overrides + ["federation.rounds=3", "audit.enabled=false"])
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for region in ("eu", "us"):
        assert rows[-1]["perplexity"][region] < rows[0]["perplexity"][region]
        eps = [r["epsilon"][region] for r in rows[1:]]
        assert eps == sorted(eps) and eps[0] > 0
        assert eps[-1] <= cfg.privacy.target_epsilon + 1e-6
    # The epsilon the coordinator reports is exactly what each node's ledger holds.
    ledgers = ledger_epsilons(cfg)
    assert set(ledgers) == {"eu-1", "eu-2", "us-1", "us-2"}
    for region in ("eu", "us"):
        final = max(ledgers[f"{region}-1"][-1], ledgers[f"{region}-2"][-1])
        assert rows[-1]["epsilon"][region] == pytest.approx(final)
        assert all(len(v) == 3 for v in ledgers.values())
    assert summary["regions"]["eu"]["perplexity_after"] == rows[-1]["perplexity"]["eu"]
    # Secure aggregation is on by default: in the clear a node sends keys, its unit count and its
    # epsilon; its update and loss leave only masked.
    kinds = {reply.metadata.message_type for reply in grid.received}
    assert {"train.secagg_mask", "evaluate.secagg_unmask"} <= kinds
    for reply in grid.received:
        if reply.metadata.message_type == "train":
            assert set(reply.content) == {"secagg-keys", "metrics", "evidence"}
            assert set(reply.content["metrics"]) == {"num-units", "epsilon"}
        if reply.metadata.message_type == "evaluate":
            assert set(reply.content) == {"secagg-keys"}
        if reply.metadata.message_type.endswith("secagg_mask"):
            assert set(reply.content["secagg"]) == {"masked"}
    assert all(r["secure_aggregation"] and r["aggregated"] for r in rows[1:])
    # Checkpoints: the newest few, each a loadable PEFT adapter.
    checkpoints = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert checkpoints == ["round-0001", "round-0002", "round-0003"]


def test_saved_adapter_loads_with_peft_and_beats_the_base(small_overrides, config_dir):
    from peft import PeftModel

    from client.training import encode_units, heldout_loss
    from common.data.partition import split_heldout
    from common.data.records import load_records
    from common.model.loading import load_base_model, load_tokenizer
    from common.privacy.units import group_units

    for region in ("eu", "us"):  # regions that allow training without DP or secure aggregation
        edit_policy(config_dir, region, "privacy.require_dp", False)
        edit_policy(config_dir, region, "transfers.require_secure_aggregation", False)
    cfg, run, summary, grid = run_federation(
        small_overrides
        + ["privacy=off", "secure_aggregation.enabled=false", "federation.rounds=2", "audit.enabled=false"]
    )
    # Without secure aggregation (an explicit, logged choice) updates travel in the clear.
    assert any(e["event"] == "secure_aggregation_disabled" for e in run.read_events())
    for reply in grid.received:
        if reply.metadata.message_type == "train":
            assert set(reply.content) == {"update", "metrics", "evidence"}
            assert set(reply.content["metrics"]) == {
                "num-units",
                "train-loss",
                "epsilon",
                "noise-multiplier",
                "sample-rate",
                "steps",
            }
    base_path = summary["model"]["path"]
    assert (run.adapter_dir / "adapter_config.json").is_file()
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    tok = load_tokenizer(base_path)
    records = load_records([f"{cfg.data.root}/us"], expected_region="us")  # us policy: no scrubbing
    _, heldout = split_heldout([r for r in records if r.consent], fraction=cfg.data.heldout_fraction)
    ids = encode_units(group_units(heldout, cfg.regions["us"].policy.privacy.unit), tok, 96)
    base = load_base_model(base_path, torch.device("cpu"), torch.float32)
    base_loss, n = heldout_loss(base, ids, batch_size=64, pad_id=tok.pad_token_id)
    tuned = PeftModel.from_pretrained(
        load_base_model(base_path, torch.device("cpu"), torch.float32), str(run.adapter_dir)
    )
    tuned_loss, _ = heldout_loss(tuned, ids, batch_size=64, pad_id=tok.pad_token_id)
    assert tuned_loss / n < base_loss / n
    assert summary["regions"]["us"]["epsilon"] == "inf"


@pytest.mark.heavy(seconds=30)
def test_resume_continues_the_round_count_and_a_new_run_continues_the_budget(small_overrides):
    small_overrides = [*small_overrides, "audit.enabled=false"]  # three runs' budgets and rounds: no audit needed
    cfg, run, _, _ = run_federation(small_overrides)
    first = ledger_epsilons(cfg)
    # Resume the same run with one more round: rounds 1-2 are not repeated.
    cfg2, run2, summary, _ = run_federation([f"resume={run.path}", "federation.rounds=3"])
    assert run2.path == run.path
    assert [r["round"] for r in run2.read_metrics()] == [0, 1, 2, 3]
    assert summary["rounds_completed"] == 3
    resumed = ledger_epsilons(cfg)
    assert all(len(resumed[n]) == 3 and resumed[n][:2] == first[n] for n in first)
    # A new run on the same data starts from the spent budget, never from zero.
    _, run3, _, _ = run_federation(small_overrides, run_name="second")
    again = ledger_epsilons(cfg)
    for node, history in again.items():
        assert len(history) == 5 and history[3] > resumed[node][2]
    assert run3.read_metrics()[1]["epsilon"]["eu"] > run2.read_metrics()[-1]["epsilon"]["eu"]


def test_over_budget_round_is_refused_and_nothing_is_sent(small_overrides, config_dir):
    from client.node import RegionNode, simulation_settings
    from common.privacy.accounting import DpSgdSteps, epsilon_spent

    edit_policy(config_dir, "eu", "transfers.min_cohort", 2)  # two clients in all
    overrides = small_overrides + [
        "regions.eu.clients=1",
        "regions.us.clients=1",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "federation.local_steps=10",
        "audit.enabled=false",
    ]
    cfg = resolve_run_config(overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    # A budget that one round fits and two rounds exceed, for every node's sampling rate.
    rates = [cfg.federation.batch_size / len(RegionNode(simulation_settings(cfg, i)).data.train_units) for i in (0, 1)]
    one = max(epsilon_spent([DpSgdSteps(1.0, q, 10)], 1e-5) for q in rates)
    two = min(epsilon_spent([DpSgdSteps(1.0, q, 10)] * 2, 1e-5) for q in rates)
    assert one < two
    budget = (one + two) / 2
    for region in ("eu", "us"):
        edit_policy(config_dir, region, "privacy.epsilon_budget", budget)
    cfg, run, summary, grid = run_federation(overrides, run_name="budget")
    refusals = [m for m in grid.received if m.metadata.message_type == "train" and m.has_error()]
    assert len(refusals) == 2  # both nodes, round 2
    for reply in refusals:
        assert not reply.has_content()
        assert "BudgetExhausted" in reply.error.reason and "Nothing was trained or sent" in reply.error.reason
    skipped = [e for e in run.read_events() if e["event"] == "round_skipped"]
    assert [e["round"] for e in skipped] == [2] and "global adapter unchanged" in skipped[0]["reason"]
    assert all(len(h) == 1 and h[0] <= budget for h in ledger_epsilons(cfg).values())
    assert summary["regions"]["eu"]["refusals"]


def test_delta_above_one_over_n_is_refused_with_the_limit(small_overrides, config_dir):
    for region in ("eu", "us"):
        edit_policy(config_dir, region, "privacy.delta", 0.5)
    with pytest.raises(FederationError, match="Every node refused"):
        run_federation(small_overrides)
    cfg = load_config(small_overrides)
    events = [json.loads(line) for line in open(f"{cfg.workdir}/runs/run/events.jsonl")]
    reasons = [e["reason"] for e in events if e["event"] == "node_unavailable"]
    assert len(reasons) == 4 and all("policy.privacy.delta=0.5 is larger than 1/N" in r for r in reasons)
