"""The memorisation audit: exposure, membership inference, extraction, the one-run bound, the report."""

import html.parser
import json
import math

import numpy as np
import pytest
import torch

from common.leakage.canaries import FORMATS, Canary, load_or_create, make_canaries, redact
from common.leakage.metrics import (
    epsilon_lower_bound,
    exposure_exact,
    exposure_extrapolated,
    membership_auc,
    one_run_guesses,
    tpr_at_fpr,
)


def test_exposure_by_hand():
    # 8 candidates, the canary ranks 2nd: exposure = log2 8 - log2 2 = 2 bits.
    assert exposure_exact(1.5, [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]) == pytest.approx(2.0)
    # Ranked first: the full log2 |R| bits.
    assert exposure_exact(0.5, [0.5, 1, 2, 3]) == pytest.approx(2.0)


def test_extrapolated_exposure_matches_the_known_tail():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    sample = rng.normal(5.0, 1.0, 4000)
    # A canary 3 standard deviations below the mean: tail probability Phi(-3), about 2^-9.5.
    expected = -math.log2(norm.cdf(-3.0))
    assert exposure_extrapolated(2.0, sample, 10**6) == pytest.approx(expected, abs=0.4)
    # Never more than log2 |R|.
    assert exposure_extrapolated(-50.0, sample, 1024) == pytest.approx(10.0)


def test_membership_metrics_on_known_scores():
    assert membership_auc([1, 2, 3], [4, 5, 6]) == 0.0 and membership_auc([4, 5, 6], [1, 2, 3]) == 1.0
    rng = np.random.default_rng(1)
    same = membership_auc(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(same - 0.5) < 0.03
    assert tpr_at_fpr([10, 11, 12, 0.5], [0, 1, 2, 3], fpr=0.0) == pytest.approx(0.75)


def test_one_run_bound_on_known_inputs():
    # All r guesses right: the bound solves p^r = beta with p = e^eps / (1 + e^eps).
    r = 100
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, 0.05) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert epsilon_lower_bound(100, 50, 0.05) == 0.0 and epsilon_lower_bound(0, 0) == 0.0
    assert epsilon_lower_bound(100, 60) < epsilon_lower_bound(100, 80) < epsilon_lower_bound(100, 95)
    # Guessing: top half scores 'in', bottom half 'out'.
    assert one_run_guesses([0.9, 0.1, 0.8, 0.2], [True, False, True, False], guesses=4) == (4, 4)
    assert one_run_guesses([0.9, 0.1, 0.8, 0.2], [False, True, False, True], guesses=2) == (2, 0)


def test_canaries_are_random_private_and_stable(tmp_path):
    canaries = make_canaries(["door-code", "passport"], [1, 4, 16], one_run=10)
    exposure = [c for c in canaries if c.kind == "exposure"]
    assert [c.repetitions for c in exposure] == [1, 4, 16, 1, 4, 16]
    assert len({c.prefix for c in canaries}) > len(canaries) - 2  # contexts differ
    assert all(len(c.secret) == FORMATS[c.format][2] for c in canaries)
    # Fresh secrets every time (six 6-digit and 8-character secrets colliding is out of reach).
    assert [c.secret for c in make_canaries(["door-code", "passport"], [1, 4, 16], 0)] != [c.secret for c in exposure]
    stored = load_or_create(tmp_path, ["door-code"], [16], 4)
    assert load_or_create(tmp_path, ["passport"], [1], 0) == stored  # created once, reused
    assert oct((tmp_path / "canaries.json").stat().st_mode)[-3:] == "600"
    assert "\u2588" * 6 in redact(stored[0]) and stored[0].secret not in redact(stored[0])
    for canary in stored:  # neither the secret nor the made-up name/street in the prefix leaves the node
        shown = redact(canary)
        assert (
            canary.secret not in shown and canary.prefix not in shown and ("[PERSON]" in shown or "[STREET]" in shown)
        )


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return next((model_cache / "models").glob("embedded-*"))


def fresh_lora(model_dir):
    from common.config import LoraSettings
    from common.model.loading import load_base_model
    from common.model.lora import attach_lora

    base = load_base_model(model_dir, torch.device("cpu"), torch.float32)
    return attach_lora(base, LoraSettings(rank=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]), seed=0)


def test_membership_inference_is_at_chance_for_a_model_that_never_saw_the_data(model_dir):
    from client.memorisation import example_losses
    from client.training import encode_units
    from common.config import PrivacyUnitKind
    from common.data.synthetic import generate_region_records
    from common.model.loading import load_tokenizer
    from common.privacy.units import group_units

    tok = load_tokenizer(model_dir)
    model = fresh_lora(model_dir)  # B = 0: exactly the base model, trained on none of these records
    ids = encode_units(
        group_units(generate_region_records("us", ["en_US"], seed=11, num_users=150), PrivacyUnitKind.record), tok, 96
    )
    half = len(ids) // 2
    losses_a, losses_b = (
        example_losses(model, ids[:half], tok.pad_token_id),
        example_losses(model, ids[half:], tok.pad_token_id),
    )
    auc = membership_auc([-x for x in losses_a], [-x for x in losses_b])
    assert abs(auc - 0.5) < 0.1


def test_canaries_are_extracted_from_a_deliberately_overfit_model(model_dir):
    # Overfit the whole micro model (not a LoRA: its frozen final layer norm caps how sure a
    # model this small can get) on a canary repeated 64 times, without DP.
    from client.memorisation import canary_losses, extracted
    from client.training import collate, unit_losses
    from common.model.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_base_model(model_dir, torch.device("cpu"), torch.float32)
    canary = Canary("exposure", "door-code", "The door code at Juniper Way is", "493817", 64)
    examples = [tok(canary.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * 64
    examples += [tok(f"Order {i} left the warehouse today.", add_special_tokens=False)["input_ids"] for i in range(16)]
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        batch = [examples[i] for i in torch.randint(len(examples), (16,), generator=generator)]
        ids, mask = collate(batch, tok.pad_token_id, torch.device("cpu"))
        unit_losses(model, ids, mask)[0].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert extracted(model, tok, canary, beams=1) and extracted(model, tok, canary, beams=5)
    loss, others = canary_losses(model, tok, canary, 200)
    assert exposure_extrapolated(loss, others, canary.space_size) > 10
    # The same audit on an untouched base model finds nothing.
    fresh = load_base_model(model_dir, torch.device("cpu"), torch.float32)
    assert not extracted(fresh, tok, canary, beams=1)
    loss, others = canary_losses(fresh, tok, canary, 200)
    assert exposure_extrapolated(loss, others, canary.space_size) < 6


# -- the report ---------------------------------------------------------------------------------


class Sections(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs.get("src", ""))


def fake_run(tmp_path, correct: int, accounted: float, copies: int = 1, mean_bits: float = 3.0):
    from common.audit import AuditLog, EvidenceKey
    from common.config import load_config
    from server.rundir import RunDirectory

    run = RunDirectory(tmp_path / "run")
    run.create()
    key = EvidenceKey.load_or_create(run.coordinator_key_dir)
    AuditLog(run.path / "audit.jsonl", "coordinator", key).record("run", "started", reason="test")
    run.metrics({"round": 0, "perplexity": {"us": 200.0, "overall": 200.0}})
    run.metrics({"round": 1, "perplexity": {"us": 150.0, "overall": 150.0}, "epsilon": {"us": accounted}})
    run.write_summary(
        {
            "rounds_completed": 1,
            "excluded_regions": {"cn": "PIPL policy forbids a coordinator in EU"},
            "regions": {
                "us": {
                    "law": "CCPA/CPRA",
                    "policy_hash": "ab" * 32,
                    "delta": 1e-5,
                    "unit": "record",
                    "epsilon": accounted,
                    "epsilon_budget": 12.0,
                    "perplexity_before": 200.0,
                    "perplexity_after": 150.0,
                }
            },
        }
    )
    from tests.inprocess import node_audit_metrics

    metrics = node_audit_metrics(
        exposure_rep16_mean=mean_bits,
        exposure_rep16_max=4.0 + mean_bits,
        one_run_correct=float(correct),
        one_run_repetitions=float(copies),
        canaries_never_inserted=30.0,
        exposure_never_inserted_mean=1.4,
        epsilon=accounted,
    )
    run.write_audit_results(
        {
            "us-1": {
                "region": "us",
                "metrics": metrics,
                "examples": ["The door code at Oak Lane is \u2588\u2588\u2588\u2588\u2588\u2588 [inserted 16x]"],
            }
        }
    )
    return run, load_config(["regions=[us]"])


def test_report_renders_every_section(tmp_path):
    from server.report import write_privacy_report

    run, cfg = fake_run(tmp_path, correct=17, accounted=3.0)
    report = write_privacy_report(run, cfg)
    assert not report["bound_violations"]
    page = (run.report_dir / "privacy-report.html").read_text()
    parser = Sections()
    parser.feed(page)
    assert parser.ids == [
        "summary",
        "regions",
        "nodes",
        "egress",
        "policies",
        "privacy",
        "utility",
        "audit",
        "plots",
        "examples",
        "audit-log",
    ]
    assert len(parser.images) == 3 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "PIPL policy forbids" in page and "not legal advice" in page and "hash chain intact" in page
    assert "no memorisation detected" in page and "\u2588" in page
    md = (run.report_dir / "privacy-report.md").read_text()
    for heading in ("## Summary", "## Memorisation audit", "## Extraction examples", "## Audit log"):
        assert heading in md
    data = json.loads((run.report_dir / "privacy-report.json").read_text())
    assert data["regions"]["us"]["audit"]["one_run"]["epsilon_lower_bound"] == 0.0


def test_a_lower_bound_above_the_accounted_epsilon_fails_loudly(tmp_path):
    from server.report import write_privacy_report

    run, cfg = fake_run(tmp_path, correct=32, accounted=0.5)  # 32/32 right: epsilon >= 2.2 > 0.5
    report = write_privacy_report(run, cfg)
    assert report["bound_violations"] and "lower bound" in report["bound_violations"][0]
    assert any("AUDIT FAILED" in line for line in report["plain_summary"])


def test_a_canary_in_k_copies_is_held_to_k_times_epsilon(tmp_path):
    from server.report import write_privacy_report

    # 32/32 right gives epsilon >= 2.32: above 1.0 for one copy, within 4 x 1.0 for a canary in 4 copies.
    one = write_privacy_report(*fake_run(tmp_path / "one", correct=32, accounted=1.0))
    four = write_privacy_report(*fake_run(tmp_path / "four", correct=32, accounted=1.0, copies=4))
    assert one["bound_violations"] and not four["bound_violations"]
    assert four["regions"]["us"]["audit"]["one_run"]["repetitions"] == 4


def test_memorisation_verdict_reads_the_mean_over_canaries_and_states_group_epsilon(tmp_path):
    from server.report import EXPOSURE_ALARM_BITS, write_privacy_report

    # One lucky canary (max far above the alarm) does not make memorisation; the mean does.
    quiet = write_privacy_report(*fake_run(tmp_path / "quiet", correct=16, accounted=8.0, mean_bits=3.0))
    assert quiet["regions"]["us"]["verdict"]["status"] == "no memorisation detected"
    assert quiet["regions"]["us"]["audit"]["exposure"]["16"]["max_bits"] >= EXPOSURE_ALARM_BITS
    loud = write_privacy_report(*fake_run(tmp_path / "loud", correct=16, accounted=8.0, mean_bits=12.0))
    verdict = loud["regions"]["us"]["verdict"]
    assert verdict["status"] == "memorisation detected" and verdict["repeated_secrets_only"]
    assert verdict["group_epsilon"]["16"] == 128.0
    assert "16 x epsilon = 128.0" in verdict["signals"][0] and "never-inserted canaries: 1.4" in verdict["signals"][0]
    assert loud["regions"]["us"]["audit"]["never_inserted"] == {"canaries": 30, "mean_bits": 1.4}


def test_auc_standard_error_by_hand():
    from server.report import auc_standard_error

    # AUC 0.5 with 50 members and 50 non-members: Q1 = Q2 = 1/3, var = (0.25 + 98/12) / 2500.
    assert auc_standard_error(0.5, 50, 50) == pytest.approx(((0.25 + 98 / 12) / 2500) ** 0.5)


def test_compare_verdicts():
    from server.compare import judge

    def report(detected_at=(), bound=0.0, violations=(), copies=1, perplexity=30.0):
        exposure = {
            k: {
                "mean_bits": 12.0 if k in detected_at else 1.5,
                "max_bits": 14.0,
                "extracted_greedy": 0,
                "extracted_beam": 0,
            }
            for k in ("1", "16")
        }
        audit = {
            "exposure": exposure,
            "never_inserted": {"canaries": 30, "mean_bits": 1.4},
            "mia": {"loss-auc": 0.6, "calibrated-auc": 0.55},
            "one_run": {"epsilon_lower_bound": bound, "correct": 30, "guesses": 32, "repetitions": copies},
        }
        signals = [f"canaries inserted {k}x reach a mean exposure of 12.0 bits" for k in detected_at]
        verdict = {
            "status": "memorisation detected" if signals else "no memorisation detected",
            "signals": signals,
            "repeated_secrets_only": bool(signals) and "1" not in detected_at,
        }
        return {
            "regions": {"us": {"epsilon": 8.0, "perplexity_after": perplexity, "audit": audit, "verdict": verdict}},
            "perplexity_by_round": [{"round": 0, "overall": 400.0}, {"round": 5, "overall": 31.0}],
            "bound_violations": list(violations),
        }

    ok, lines = judge({"no-dp": report(["16"], bound=1.7), "dp-eps8": report()})
    assert ok == "DP works and the audit has power"
    assert any(
        "lower bound 1.70 without DP (above 1: the audit sees the influence of a single unit)" in x for x in lines
    )
    # Canaries in k copies: the bound is a group's, and the note says so. A region of one node has no
    # perplexity of its own in the report: the arm's overall one is shown.
    _, lines = judge({"no-dp": report(["16"], bound=1.2, copies=4, perplexity=None), "dp-eps8": report(copies=4)})
    assert any("| us | no DP | 8.00 | overall 31.00 |" in x for x in lines)
    assert any("1.20 without DP (above 1: the audit sees the influence of a group of 4 units" in x for x in lines)
    assert "NO POWER" in judge({"no-dp": report(), "dp-eps8": report()})[0]
    # Repeated secrets memorised under DP are group privacy at work (16 x epsilon), not DP failing...
    grouped, lines = judge({"no-dp": report(["16"]), "dp-eps8": report(["16"])})
    assert grouped == "DP works and the audit has power" and any("with DP, canaries inserted 16x" in x for x in lines)
    # ...a secret in one unit is not.
    assert "did NOT prevent" in judge({"no-dp": report(["1", "16"]), "dp-eps8": report(["1"])})[0]
    failed = judge({"no-dp": report(["16"]), "dp-eps8": report(violations=["us: 9 > 8"])})[0]
    assert failed.startswith("AUDIT FAILED")


def test_compare_lab_policies_compose_and_relax_only_dp(tmp_path):
    from common.config import load_config
    from server.compare import AUDIT_FEDERATION, write_lab_policies

    lab = write_lab_policies(tmp_path / "lab-configs", why="test", require_dp=False)
    assert (lab / "regions" / "us.yaml").read_text().startswith("# @package regions.us\n")
    cfg = load_config([*AUDIT_FEDERATION, "privacy=off"], config_dir=lab)
    assert list(cfg.regions) == ["us", "sg"] and cfg.regions["us"].clients == 1
    for name in ("us", "sg"):
        lab_policy = cfg.regions[name].policy
        real_policy = load_config([*AUDIT_FEDERATION]).regions[name].policy
        assert lab_policy.privacy.require_dp is False and real_policy.privacy.require_dp is True
        assert lab_policy.transfers == real_policy.transfers and lab_policy.data_use == real_policy.data_use


def test_a_node_whose_audit_failed_is_reported_as_such(tmp_path):
    """A node lost before the audit (found killing a SuperNode in deployment) must not break the report."""
    from server.report import write_privacy_report

    run, cfg = fake_run(tmp_path, correct=17, accounted=3.0)
    results = json.loads(run.audit_results_path.read_text())
    results["us-1"] = {"region": "us", "error": "Node Unavailable"}
    run.write_audit_results(results)
    report = write_privacy_report(run, cfg)
    assert report["regions"]["us"]["verdict"] == {"status": "audit failed", "signals": ["Node Unavailable"]}
    assert "audit failed" in (run.report_dir / "privacy-report.html").read_text()


def test_compare_report_only_needs_both_arms_finished(tmp_path):
    from common.errors import ConfigError
    from server.compare import compare

    with pytest.raises(ConfigError, match="no finished run for arm.s. no-dp, dp-eps8 .*without --report-only"):
        compare([f"workdir={tmp_path}"], out=lambda line: None, report_only=True)
