"""The privacy report of a run: JSON for machines, Markdown and a self-contained HTML page for people.

It gathers what the run knows (regions and exclusions, the policy each node reported, epsilon per
region over rounds, utility, every memorisation-audit number, audit-log verification) and says in
plain words what a privacy officer can do with the model. An empirical epsilon lower bound above
the accounted epsilon is reported as a violation: the caller fails the run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from common.audit import EvidenceKey, EvidenceKeyError, HashChainLog, Verification
from common.config import FedsovConfig
from common.leakage.metrics import epsilon_lower_bound
from server.rundir import RunDirectory

# Above these, the audit calls it memorisation: canaries of one repetition count that rank, on average, above
# 98.4% (2^-6) of the other secrets of their format, or a membership test clearly better than a coin. A canary
# the model never saw is as likely as any other secret: its exposure averages 1/ln 2 = 1.44 bits, and a mean of
# 6 bits over 4 such canaries has a chance of 6e-5 (their summed exposure x ln 2 is Gamma(4, 1)). The mean, not
# the maximum: the largest of a handful of canaries is a noisy statistic that crossed any fixed alarm by chance.
EXPOSURE_ALARM_BITS = 6.0
MIA_ALARM_AUC = 0.6
CONFIDENCE = 0.95
# A node's own data counts as its describe reply carries them (summary.json: regions.<r>.data.<node>), in order.
DATA_COUNTS = (
    ("records", "records"),
    ("excluded-no-consent", "excluded: no consent"),
    ("excluded-special", "excluded: special category or field"),
    ("heldout-records", "held-out records"),
    ("skipped-files", "skipped files"),
    ("truncated-units", "truncated units"),
    ("truncated-tokens", "truncated tokens"),
    ("truncated-heldout", "truncated held-out records"),
)


def build_report(run: RunDirectory, cfg: FedsovConfig) -> dict[str, Any]:
    summary = run.read_summary() or {}
    rows = run.read_metrics()
    results = run.read_audit_results()
    manifest_path = run.adapter_dir / "fedsov-manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    regions: dict[str, Any] = {}
    violations: list[str] = []
    for name, info in (summary.get("regions") or {}).items():
        audit = _region_audit(name, results) if results is not None else None
        accounted = info.get("epsilon")
        if audit and "one_run" in audit and audit["one_run"]["guesses"]:
            # A canary in k copies is a group of k units: the bound measures the group's epsilon, at most k x epsilon.
            bound, k = audit["one_run"]["epsilon_lower_bound"], audit["one_run"]["repetitions"]
            if accounted not in (None, "inf") and bound > k * float(accounted) + 1e-9:
                violations.append(
                    f"{name}: lower bound {bound:.3f} > accounted epsilon {float(accounted):.3f}"
                    + (f" x {k} copies" if k > 1 else "")
                )
        regions[name] = {
            "contribution": _contribution(name, info, manifest, summary.get("not_contributing") or []),
            "data": info.get("data") or {},
            "law": info.get("law"),
            "policy_hash": info.get("policy_hash"),
            "delta": info.get("delta"),
            "unit": info.get("unit"),
            "epsilon": accounted,
            "epsilon_budget": info.get("epsilon_budget"),
            "perplexity_before": info.get("perplexity_before"),
            "perplexity_after": info.get("perplexity_after"),
            "audit": audit,
            "verdict": _verdict(audit, accounted),
        }
    log = _verify_coordinator_log(run)
    report = {
        "format": "fedsov-privacy-report/1",
        "run_id": run.run_id,
        "coordinator_jurisdiction": cfg.federation.coordinator_jurisdiction,
        "dp": cfg.privacy.enabled,
        "secure_aggregation": cfg.secure_aggregation.enabled,
        "rounds_completed": summary.get("rounds_completed"),
        "excluded_regions": summary.get("excluded_regions", {}),
        "regions": regions,
        "policies": {n: r.policy.law for n, r in cfg.regions.items()},
        "nodes": node_egress(run.read_events(), rows, results, _anchors(run), cfg.secure_aggregation.enabled),
        "epsilon_by_round": [{"round": r["round"], **(r.get("epsilon") or {})} for r in rows if r["round"] > 0],
        "perplexity_by_round": [{"round": r["round"], **(r.get("perplexity") or {})} for r in rows],
        "audit_log": {
            "path": str(run.path / "audit.jsonl"),
            "ok": log.ok,
            "entries": log.entries,
            "problem": log.problem,
            "first_bad": log.first_bad,
        },
        "bound_violations": violations,
        "thresholds": {
            "exposure_alarm_bits": EXPOSURE_ALARM_BITS,
            "mia_alarm_auc": MIA_ALARM_AUC,
            "lower_bound_confidence": CONFIDENCE,
        },
    }
    report["plain_summary"] = plain_summary(report)
    return report


def _contribution(
    region: str, info: dict[str, Any], manifest: dict[str, Any] | None, shortfalls: list[str]
) -> dict[str, Any]:
    """Whether a planned region's nodes contributed: the summary's record, else the manifest's; never the config."""
    rounds = info.get("rounds_contributed")
    if isinstance(rounds, dict):  # per node
        rounds = max(rounds.values(), default=0)
    if rounds is None and manifest is not None:
        rounds = (manifest["contributing_regions"].get(region) or {}).get("rounds_contributed", 0)
    contributed = info.get("contributed", None if rounds is None else rounds > 0)
    if contributed is None:
        return {"contributed": None, "rounds": None, "status": "planned; whether it contributed was not recorded"}
    if contributed:
        return {"contributed": True, "rounds": rounds, "status": f"contributed ({rounds} round(s))"}
    why = [line for line in shortfalls if f"region {region}" in line] or info.get("refusals") or []
    return {
        "contributed": False,
        "rounds": 0,
        "status": f"planned, did NOT contribute: {'; '.join(why) or 'no update of its nodes was aggregated'}",
    }


def _anchors(run: RunDirectory) -> dict[str, Any]:
    try:
        return json.loads(run.anchors_path.read_text())
    except (OSError, ValueError):
        return {}


def node_egress(
    events: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    results: dict[str, Any] | None,
    anchors: dict[str, Any],
    secure: bool,
) -> dict[str, Any]:
    """Per node: its own data counts, and what it released each round and once per run, with the guarantee."""
    from common.secagg.encoding import metric_slots

    nodes: dict[str, Any] = {}
    for e in events:
        if e["event"] == "node_joined":
            nodes[e["node"]] = {
                "region": e["region"],
                "units": e["units"],
                "epsilon_at_join": e.get("epsilon"),
                "excluded_no_consent": e.get("excluded_no_consent"),
                "excluded_special": e.get("excluded_special"),
                "rounds": [],
                "evaluations": [],
            }
    trained: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] == "node_trained" and e["node"] in nodes:
            trained.setdefault(int(e["round"]), []).append(e)
    by_round = {int(r["round"]): r for r in rows}
    for number, entries in sorted(trained.items()):
        row = by_round.get(number, {})
        dropped = set(row.get("clients_dropped") or [])
        slots, slot_of = metric_slots([e["region"] for e in entries])
        sizes = {slot: slot_of.count(slot) for slot in slots}
        revealed = set(row.get("train_loss") or {})
        for e, slot in zip(entries, slot_of, strict=True):
            nodes[e["node"]]["rounds"].append(
                {
                    "round": number,
                    "units": e.get("units", nodes[e["node"]]["units"]),
                    "epsilon": e.get("epsilon"),
                    "slot": slot if secure else None,
                    "slot_clients": sizes[slot] if secure else None,
                    "loss_revealed": slot in revealed if secure else True,
                    "dropped": e["node"] in dropped,
                    "aggregated": bool(row.get("aggregated")),
                }
            )
    # Held-out loss: each node evaluates round 0 (the base model) and every round it trained in.
    for number in [0, *sorted(trained)]:
        entries = [{"node": n, "region": v["region"]} for n, v in nodes.items()] if number == 0 else trained[number]
        slots, slot_of = metric_slots([e["region"] for e in entries])
        sizes = {slot: slot_of.count(slot) for slot in slots}
        shown = set((by_round.get(number) or {}).get("perplexity") or {})
        for e, slot in zip(entries, slot_of, strict=True):
            slot = slot if secure else e["region"]
            nodes[e["node"]]["evaluations"].append(
                {
                    "round": number,
                    "slot": slot,
                    "slot_clients": sizes.get(slot, 1) if secure else None,
                    "revealed": slot in shown,
                }
            )
    for name, node in nodes.items():
        result = (results or {}).get(name) or {}
        node["audit_numbers"] = len(result.get("metrics") or {}) if "metrics" in result else None
        node["audit_examples"] = len(result.get("examples") or [])
        anchor = anchors.get(name) or {}
        node["evidence"] = {
            k: anchor[k] for k in ("ledger-entries", "ledger-head", "audit-entries", "audit-head") if k in anchor
        }
    return nodes


def _verify_coordinator_log(run: RunDirectory) -> Verification:
    try:
        key = EvidenceKey.load(run.coordinator_key_dir)
    except EvidenceKeyError as err:
        return Verification(False, 0, None, f"cannot be verified on this machine: {err}")
    return HashChainLog(run.path / "audit.jsonl", key).verify()


def _region_audit(region: str, results: dict[str, Any]) -> dict[str, Any] | None:
    nodes = [r for r in results.values() if r.get("region") == region and "metrics" in r]
    errors = [r["error"] for r in results.values() if r.get("region") == region and "error" in r]
    if not nodes:
        return {"error": "; ".join(errors) or "no node reported"} if errors else None
    metrics = [n["metrics"] for n in nodes]
    reps = sorted({int(k.split("rep")[1].split("-")[0]) for m in metrics for k in m if k.startswith("canaries-rep")})
    exposure = {}
    for r in reps:
        count = sum(m.get(f"canaries-rep{r}", 0) for m in metrics)
        exposure[str(r)] = {
            "canaries": count,
            "mean_bits": sum(m[f"exposure-rep{r}-mean"] * m[f"canaries-rep{r}"] for m in metrics) / count,
            "max_bits": max(m[f"exposure-rep{r}-max"] for m in metrics),
            "extracted_greedy": sum(m[f"extracted-greedy-rep{r}"] for m in metrics),
            "extracted_beam": sum(m[f"extracted-beam-rep{r}"] for m in metrics),
        }

    def weighted(key: str) -> float | None:
        pairs = [(m[key], m["mia-members"] + m["mia-nonmembers"]) for m in metrics if key in m]
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else None

    guesses = int(sum(m.get("one-run-guesses", 0) for m in metrics))
    correct = int(sum(m.get("one-run-correct", 0) for m in metrics))
    never = sum(m.get("canaries-never-inserted", 0) for m in metrics)
    return {
        "nodes": len(nodes),
        "errors": errors,
        "exposure": exposure,
        # One-run canaries left out of training: what exposure a secret the model never saw reaches here.
        "never_inserted": {
            "canaries": int(never),
            "mean_bits": sum(
                m["exposure-never-inserted-mean"] * m["canaries-never-inserted"]
                for m in metrics
                if m.get("canaries-never-inserted")
            )
            / never,
        }
        if never
        else None,
        "mia": {
            key: weighted(f"mia-{key}")
            for key in ("loss-auc", "loss-tpr-at-1pct-fpr", "calibrated-auc", "calibrated-tpr-at-1pct-fpr")
        }
        | {"members": sum(m["mia-members"] for m in metrics), "nonmembers": sum(m["mia-nonmembers"] for m in metrics)},
        "one_run": {
            "canaries": int(sum(m.get("one-run-canaries", 0) for m in metrics)),
            "guesses": guesses,
            "correct": correct,
            "epsilon_lower_bound": epsilon_lower_bound(guesses, correct, 1 - CONFIDENCE),
            "repetitions": int(max((m.get("one-run-repetitions", 1) for m in metrics), default=1)),
        },
        "generations": {
            "samples": int(sum(m["generations"] for m in metrics)),
            "pii_spans": int(sum(m["pii-spans"] for m in metrics)),
        },
        "examples": [e for n in nodes for e in n["examples"]],
    }


def auc_standard_error(auc: float, members: int, nonmembers: int) -> float:
    """Hanley & McNeil (1982): the standard error of an ROC AUC from its two sample sizes."""
    if not members or not nonmembers:
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (members - 1) * (q1 - auc**2) + (nonmembers - 1) * (q2 - auc**2)) / (members * nonmembers)
    return max(var, 0.0) ** 0.5


def _verdict(audit: dict[str, Any] | None, accounted: Any) -> dict[str, Any]:
    """Memorisation detected or not, from the means over canaries, extraction and membership inference; with
    the protection DP gives a secret in k copies (each its own unit): group privacy, about k x epsilon."""
    if audit is None:
        return {"status": "not audited", "signals": []}
    if "exposure" not in audit:
        return {"status": "audit failed", "signals": [audit.get("error", "")]}
    eps = None if accounted in (None, "inf") else float(accounted)
    group = {reps: (None if eps is None else int(reps) * eps) for reps in audit["exposure"]}
    never = audit.get("never_inserted")
    reference = f"; never-inserted canaries: {never['mean_bits']:.1f}" if never else ""

    def protection(reps: str) -> str:
        if eps is None:
            return "no DP"
        if reps == "1":
            return f"DP epsilon {eps:.2f}"
        return f"DP protects a secret in {reps} copies only at about {reps} x epsilon = {group[reps]:.1f}"

    signals = []
    repeated = []  # signals from secrets in several units only: group privacy, not the per-unit guarantee
    for reps, e in audit["exposure"].items():
        found = []
        if e["extracted_greedy"] or e["extracted_beam"]:
            found.append(f"canaries inserted {reps}x were extracted verbatim ({protection(reps)})")
        if e["mean_bits"] >= EXPOSURE_ALARM_BITS:
            found.append(
                f"canaries inserted {reps}x reach a mean exposure of {e['mean_bits']:.1f} bits over "
                f"{e['canaries']} canaries{reference} ({protection(reps)})"
            )
        signals += found
        repeated += found if reps != "1" else []
    mia = audit["mia"]
    for kind in ("loss", "calibrated"):
        auc = mia.get(f"{kind}-auc")
        if auc is None:
            continue
        se = auc_standard_error(auc, mia["members"], mia["nonmembers"])
        # Clearly better than a coin: above the alarm level and above chance beyond sampling noise.
        if auc >= MIA_ALARM_AUC and auc - 1.96 * se > 0.5:
            signals.append(f"membership inference ({kind}) AUC {auc:.2f} +/- {1.96 * se:.2f}")
    return {
        "status": "memorisation detected" if signals else "no memorisation detected",
        "signals": signals,
        "group_epsilon": group,
        "repeated_secrets_only": bool(signals) and len(repeated) == len(signals),
    }


def plain_summary(report: dict[str, Any]) -> list[str]:
    lines = []
    regions = report["regions"]
    if report["excluded_regions"]:
        for r, why in report["excluded_regions"].items():
            lines.append(f"Region {r} did not take part: {why}. None of its data was used.")
    for name, r in regions.items():
        if r["contribution"]["contributed"] is False:
            why = r["contribution"]["status"].split(": ", 1)[1]
            lines.append(
                f"Region {name} was planned but did not contribute: {why}. Nothing of its data is in the model."
            )
        eps = r["epsilon"]
        unit = "person" if r.get("unit") == "user" else "record"
        if eps == "inf" or not report["dp"]:
            lines.append(
                f"{name}: trained WITHOUT differential privacy: there is no formal bound on what the model "
                "reveals about any individual. Do not release it outside the region."
            )
        elif eps is not None:
            lines.append(
                f"{name}: each {unit}'s influence is bounded by differential privacy, epsilon {float(eps):.2f} "
                f"at delta {r['delta']:g} (cumulative over all training on this data; budget {r['epsilon_budget']})."
            )
        verdict = r["verdict"]
        if verdict["status"] == "memorisation detected":
            lines.append(
                f"{name}: the audit found memorisation ({'; '.join(verdict['signals'])}). Treat the model as "
                "containing personal data of this region."
            )
        elif verdict["status"] == "no memorisation detected":
            lines.append(
                f"{name}: the audit found no sign of memorisation: secret canaries were not extracted, "
                "membership inference is close to chance and generated text reused no personal data."
            )
    if report["bound_violations"]:
        lines.append(
            "AUDIT FAILED: an empirical privacy lower bound exceeds the accounted epsilon. Do not use this model."
        )
    if not report["audit_log"]["ok"]:
        lines.append(f"The coordinator's audit log FAILED verification ({report['audit_log']['problem']}).")
    return lines


# -- rendering ---------------------------------------------------------------------------------


def write_privacy_report(run: RunDirectory, cfg: FedsovConfig) -> dict[str, Any]:
    report = build_report(run, cfg)
    out = run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(report)
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "privacy-report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "privacy-report.md").write_text(render_markdown(report, list(figures)))
    (out / "privacy-report.html").write_text(render_html(report, figures))
    return report


def _figures(report: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    regions = list(report["regions"])

    def save(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    if report["epsilon_by_round"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for r in regions:
            pts = [(row["round"], row[r]) for row in report["epsilon_by_round"] if isinstance(row.get(r), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=r)
        ax.set_xlabel("round"), ax.set_ylabel("epsilon (cumulative)"), ax.set_title("Privacy spent per region")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
            figures["epsilon"] = save(fig)
        else:  # no finite epsilon to draw (training without DP)
            plt.close(fig)
    if report["perplexity_by_round"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for r in regions + ["overall"]:
            pts = [(row["round"], row[r]) for row in report["perplexity_by_round"] if r in row]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=r, linestyle="--" if r == "overall" else "-")
        ax.set_xlabel("round"), ax.set_ylabel("held-out perplexity"), ax.set_title("Utility per region")
        ax.legend()
        figures["perplexity"] = save(fig)
    audited = {r: v["audit"] for r, v in report["regions"].items() if v["audit"] and "exposure" in v["audit"]}
    if audited:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        reps = sorted({int(k) for a in audited.values() for k in a["exposure"]})
        width = 0.8 / max(1, len(audited))
        for i, (r, a) in enumerate(audited.items()):
            ax.bar(
                [j + i * width for j in range(len(reps))],
                [a["exposure"].get(str(k), {}).get("mean_bits", 0) for k in reps],
                width=width,
                label=r,
            )
        ax.axhline(EXPOSURE_ALARM_BITS, color="red", linestyle=":", label="alarm")
        ax.set_xticks([j + width * (len(audited) - 1) / 2 for j in range(len(reps))], [f"{k}x" for k in reps])
        ax.set_xlabel("canary repetitions"), ax.set_ylabel("mean exposure (bits)"), ax.set_title("Canary exposure")
        ax.legend()
        figures["exposure"] = save(fig)
    return figures


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if x == "inf":
        return "inf (no DP)"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _auc(mia: dict[str, Any], kind: str) -> str:
    """A membership-inference AUC with its 95% interval, or n/a."""
    value = mia.get(f"{kind}-auc")
    if value is None:
        return "n/a"
    return f"{value:.2f} +/- {1.96 * auc_standard_error(value, mia['members'], mia['nonmembers']):.2f}"


def _delta(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.1e}"  # 1e-5 is not 0.00


def _tables(report: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(anchor, title, header, rows) for each table the report shows."""
    regions = report["regions"]
    policy_rows = [
        [
            r,
            _fmt(v["law"]),
            (v["policy_hash"] or "n/a")[:16],
            _delta(v["delta"]),
            _fmt(v["unit"]),
            _fmt(v["epsilon_budget"]),
        ]
        for r, v in regions.items()
    ]
    privacy_rows = [[r, _fmt(v["epsilon"]), _delta(v["delta"]), _fmt(v["epsilon_budget"])] for r, v in regions.items()]
    utility_rows = [[r, _fmt(v["perplexity_before"]), _fmt(v["perplexity_after"])] for r, v in regions.items()]
    audit_rows = []
    for r, v in regions.items():
        a = v["audit"]
        if not a or "exposure" not in a:
            audit_rows.append([r, v["verdict"]["status"]] + ["n/a"] * 6)
            continue
        exp = "; ".join(
            f"{k}x: mean {e['mean_bits']:.1f} / max {e['max_bits']:.1f} bits, extracted "
            f"{e['extracted_greedy']}+{e['extracted_beam']} of {e['canaries']}"
            for k, e in a["exposure"].items()
        )
        never = a.get("never_inserted")
        exp += f"; never inserted: mean {never['mean_bits']:.1f} bits of {never['canaries']}" if never else ""
        o = a["one_run"]
        copies = f", {o['repetitions']} copies each" if o.get("repetitions", 1) > 1 else ""
        audit_rows.append(
            [
                r,
                v["verdict"]["status"],
                exp,
                _auc(a["mia"], "loss"),
                _auc(a["mia"], "calibrated"),
                _fmt(a["mia"]["calibrated-tpr-at-1pct-fpr"]),
                f"{o['correct']}/{o['guesses']} right{copies}: epsilon >= {o['epsilon_lower_bound']:.2f} "
                f"(accounted {_fmt(v['epsilon'])})",
                f"{a['generations']['pii_spans']} in {a['generations']['samples']} samples",
            ]
        )
    excluded = [[r, f"excluded: {w}"] for r, w in report["excluded_regions"].items()]
    nodes = report.get("nodes") or {}
    counts = {node: (r, c) for r, v in regions.items() for node, c in v["data"].items()}
    if not counts:  # a run from before describe carried them: what the join events say
        counts = {
            n: (
                v["region"],
                {"excluded-no-consent": v["excluded_no_consent"], "excluded-special": v["excluded_special"]},
            )
            for n, v in nodes.items()
        }
    shown = [(k, title) for k, title in DATA_COUNTS if any(k in c for _, c in counts.values())]
    node_rows = [
        [n, r, _fmt((nodes.get(n) or {}).get("units"))] + [_fmt(c.get(k)) for k, _ in shown]
        for n, (r, c) in counts.items()
    ]
    return [
        (
            "regions",
            "Contributing and excluded regions",
            ["region", "status"],
            [[r, v["contribution"]["status"]] for r, v in regions.items()] + excluded,
        ),
        (
            "nodes",
            "Data on each node (its own share of the region's data)",
            ["node", "region", "training units"] + [title for _, title in shown],
            node_rows,
        ),
        (
            "egress",
            "What left each node, and under which guarantee",
            ["node", "round", "in the clear", "only inside secure aggregation", "held-out loss (outside epsilon)"],
            _egress_rows(report),
        ),
        (
            "policies",
            "Policies (as each node reported them)",
            ["region", "law", "policy hash", "delta", "unit", "budget"],
            policy_rows,
        ),
        (
            "privacy",
            "Privacy spent (each node's ledger, cumulative)",
            ["region", "epsilon", "delta", "lifetime budget"],
            privacy_rows,
        ),
        ("utility", "Utility: held-out perplexity", ["region", "before", "after"], utility_rows),
        (
            "audit",
            "Memorisation audit (run on each region's own nodes)",
            [
                "region",
                "verdict",
                "canary exposure",
                "MIA AUC (loss), 95% CI",
                "MIA AUC (calibrated), 95% CI",
                "TPR at 1% FPR",
                "one-run lower bound (95%)",
                "PII in generations",
            ],
            audit_rows,
        ),
    ]


EGRESS_NOTES = (
    "In the clear, to the coordinator: at join the node's region, policy hash, unit and record counts and the epsilon "
    "it had spent; in each round it trained, its unit count and cumulative epsilon; its evidence heads (entry counts "
    "and hashes of its privacy ledger and audit log, never their content).",
    "Only inside secure aggregation: the adapter update and the train loss, summed per region over at least two "
    "clients; a region with a single client in a round is merged into a shared slot (other-regions), and a slot "
    "left with one survivor after dropouts stays masked. The coordinator never sees one client's update.",
    "Outside epsilon (not covered by the DP guarantee): held-out loss sums per region, once per round the node "
    "trained in plus round 0 (the base model), and the memorisation-audit numbers, once per run, on the run's final "
    "adapter. The count of generated PII found verbatim in a node's training data stays on the node.",
)


def _egress_rows(report: dict[str, Any]) -> list[list[str]]:
    secure = report["secure_aggregation"]
    rows = []
    for name, n in (report.get("nodes") or {}).items():
        joined = f"region {n['region']}, {n['units']} units, epsilon spent {_fmt(n['epsilon_at_join'])}"
        rows.append([name, "join", joined, "-", "-"])
        evaluations = {e["round"]: e for e in n["evaluations"]}
        trained = {t["round"]: t for t in n["rounds"]}
        for number in sorted(set(evaluations) | set(trained)):
            t, e = trained.get(number), evaluations.get(number)
            clear = f"{t['units']} units, cumulative epsilon {_fmt(t['epsilon'])}" if t else "-"
            if t is None:
                summed = "-"
            elif t["dropped"]:
                summed = "dropped after the key exchange: its update was never unmasked or summed"
            elif not secure:
                clear += "; the update and the train loss, in the clear (secure aggregation OFF)"
                summed = "-"
            else:
                summed = f"update + train loss in slot {t['slot']} ({t['slot_clients']} clients); loss " + (
                    "revealed as the slot's sum" if t["loss_revealed"] else "stayed masked"
                )
            held = "-"
            if e is not None:
                where = f"slot {e['slot']} ({e['slot_clients']} clients)" if secure else f"region {e['slot']}"
                held = f"{where}: " + ("released as the sum" if e["revealed"] else "stayed masked")
            rows.append([name, str(number), clear, summed, held])
        audit = (
            f"{n['audit_numbers']} audit numbers and {n['audit_examples']} redacted canary prompts, once, on the "
            "final adapter (outside epsilon)"
            if n.get("audit_numbers") is not None
            else "no audit numbers"
        )
        ev = n.get("evidence") or {}
        heads = (
            f"; evidence: ledger {ev['ledger-entries']} entries, head {str(ev['ledger-head'])[:16]}, audit log "
            f"{ev['audit-entries']} entries, head {str(ev['audit-head'])[:16]}"
            if ev
            else ""
        )
        rows.append([name, "end of run", audit + heads, "-", "-"])
    return rows


def _examples(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (r, e)
        for r, v in report["regions"].items()
        if v["audit"] and "examples" in v["audit"]
        for e in v["audit"]["examples"]
    ]


def _log_status(report: dict[str, Any]) -> str:
    log = report["audit_log"]
    if log["ok"]:
        return f"Coordinator audit log {log['path']}: verified, {log['entries']} entries, hash chain intact."
    return f"Coordinator audit log {log['path']}: TAMPERED at entry {log['first_bad']}: {log['problem']}"


def render_markdown(report: dict[str, Any], figures: list[str]) -> str:
    md = [f"# Privacy report: run {report['run_id']}", "", "## Summary", ""]
    md += [f"- {line}" for line in report["plain_summary"]]
    md += [
        "",
        f"Coordinator in {report['coordinator_jurisdiction']}; DP {'on' if report['dp'] else 'OFF'}; secure "
        f"aggregation {'on' if report['secure_aggregation'] else 'OFF'}; {report['rounds_completed']} rounds.",
        "",
    ]
    for anchor, title, header, rows in _tables(report):
        md += [f"## {title}", ""]
        if anchor == "egress":
            md += [f"- {note}" for note in EGRESS_NOTES] + [""]
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        md.append("")
    md += ["## Plots", ""] + [f"![{f}]({f}.png)" for f in figures] + [""]
    md += ["## Extraction examples (secrets blacked out)", ""] + [f"- {r}: {e}" for r, e in _examples(report)] + [""]
    md += ["## Audit log", "", _log_status(report), ""]
    md += [
        "Thresholds: exposure alarm {exposure_alarm_bits} bits, membership AUC alarm {mia_alarm_auc}, lower bound at "
        "{lower_bound_confidence:.0%} confidence.".format(**report["thresholds"]),
        "",
    ]
    return "\n".join(md)


def render_html(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Privacy report {esc(report['run_id'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}.bad{color:#b00;font-weight:bold}"
        ".ok{color:#070}img{max-width:100%}td.verdict-bad{background:#fde2e2;color:#a00;font-weight:bold}"
        "td.verdict-ok{background:#e2f5e4;color:#065f1b}td.verdict-none{background:#eee;color:#555}"
        "td.warn{background:#fff1c2;color:#7a4b00;font-weight:bold}td.muted{color:#666}"
        ".notes li{margin:.3em 0}</style></head><body>",
        f"<h1>Privacy report: run {esc(report['run_id'])}</h1>",
        "<section id='summary'><h2>Summary</h2><ul>",
    ]
    for line in report["plain_summary"]:
        cls = " class='bad'" if "FAILED" in line or "WITHOUT" in line or "found memorisation" in line else ""
        parts.append(f"<li{cls}>{esc(line)}</li>")
    parts.append("</ul></section>")
    for anchor, title, header, rows in _tables(report):
        parts.append(f"<section id='{anchor}'><h2>{esc(title)}</h2>")
        if anchor == "egress":
            parts.append("<ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in EGRESS_NOTES) + "</ul>")
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(_td(c) for c in row) + "</tr>")
        parts.append("</table></section>")
    parts.append("<section id='plots'><h2>Plots</h2>")
    for name, png in figures.items():
        parts.append(
            f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>"
        )
    parts.append("</section><section id='examples'><h2>Extraction examples (secrets blacked out)</h2><ul>")
    parts += [f"<li><b>{esc(r)}</b>: {esc(e)}</li>" for r, e in _examples(report)]
    status = _log_status(report)
    parts.append(
        f"</ul></section><section id='audit-log'><h2>Audit log</h2>"
        f"<p class='{'ok' if report['audit_log']['ok'] else 'bad'}'>{esc(status)}</p></section>"
    )
    parts.append("<p>Policies are engineering defaults, not legal advice.</p></body></html>")
    return "".join(parts)


# How a status cell looks: a verdict is seen before it is read.
CELL_CLASSES = (
    ("memorisation detected", "verdict-bad"),
    ("audit failed", "verdict-bad"),
    ("no memorisation detected", "verdict-ok"),
    ("not audited", "verdict-none"),
    ("planned, did NOT contribute", "warn"),
    ("contributed", "verdict-ok"),
    ("excluded", "muted"),
)


def _td(text: str) -> str:
    cls = next((c for prefix, c in CELL_CLASSES if text.startswith(prefix)), None)
    return f"<td class='{cls}'>{html.escape(text)}</td>" if cls else f"<td>{html.escape(text)}</td>"


def load_report(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "report" / "privacy-report.json").read_text())
