"""Evidence for the data protection officer: what a record of processing and a DPIA need from one run.

`fedsov dpo-record <run_dir>` writes `dpo-record.json` and `dpo-record.md` into the run's report folder. The
fields follow GDPR Art. 30(1) (record of processing activities) and Art. 35(7) (the content of a data
protection impact assessment); UK GDPR has the same articles, and other laws ask for similar records (for
example PIPL Art. 55-56, LGPD Art. 37-38), whose fields the DPO maps. fedsov fills what it knows from the run:
the processing it did, the people and records each region's nodes counted, who received what and where, each
region's transfer rules as evaluated on the run's date, retention, and the safeguards with their results.
What fedsov cannot know (who the controller is, the legal basis for collecting the data and for training on
it, who the people are, necessity and proportionality, residual risk) is present and marked `to_fill`, so the
record is never mistaken for complete. Engineering evidence, not legal advice.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.config import FedsovConfig, config_from_container
from common.errors import FedsovError
from common.policy import DISCLAIMER, coordinator_allowed, policy_hash, transfer_rules
from server.provenance import MANIFEST
from server.retention import checkpoint_rule
from server.rundir import RunDirectory

FORMAT = "fedsov-dpo-record/1"


def to_fill(what: str) -> dict[str, str]:
    """A field only the controller's people can fill, saying what belongs there."""
    return {"to_fill": what}


def build_dpo_record(run: RunDirectory) -> dict[str, Any]:
    if not run.config_path.is_file():
        raise FedsovError(f"{run.path} holds no config.yaml: not a fedsov run directory.")
    cfg = config_from_container(OmegaConf.load(run.config_path))
    events = run.read_events()
    summary = run.read_summary()
    manifest = _read_json(run.adapter_dir / MANIFEST)
    report = _read_json(run.report_dir / "privacy-report.json")
    started = next((e["time"] for e in events if e["event"] == "run_started"), None)
    on = datetime.date.fromisoformat(started[:10]) if started else datetime.datetime.now(datetime.timezone.utc).date()
    excluded = {e["region"]: e["reason"] for e in events if e["event"] == "region_excluded"}
    joined = [e for e in events if e["event"] == "node_joined"]
    record = {
        "format": FORMAT,
        "run_id": run.run_id,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_started": started,
        "status": summary["status"] if summary else "not finished (no summary.json): the record covers what ran",
        "rounds_completed": summary["rounds_completed"]
        if summary
        else max((r["round"] for r in run.read_metrics()), default=0),
        "notice": DISCLAIMER,
        "controller": to_fill(
            "name and contact details of each controller (each region's organisation), any joint "
            "controllers and representatives (Art. 30(1)(a))"
        ),
        "dpo": to_fill("contact details of each data protection officer (Art. 30(1)(a))"),
        "coordinator_operator": to_fill(
            "who runs the coordinator, and whether as processor (Art. 28 contract) or "
            "joint controller (Art. 26 arrangement)"
        ),
        "purposes": _purposes(cfg, manifest),
        "legal_basis": {
            name: to_fill(
                f"{r.policy.law}: the ground for collecting the data and for training a model "
                "on it, and whether training is compatible with the purpose it was collected "
                "for" + (" (Art. 6(1), Art. 9(2) for special categories, Art. 6(4))" if "GDPR" in r.policy.law else "")
            )
            for name, r in cfg.regions.items()
            if name not in excluded
        },
        "data_subjects": {
            "categories": to_fill("who the people are (customers, patients, employees, minors?)"),
            "counted": _counted(cfg, joined, excluded),
        },
        "personal_data": {
            "categories": to_fill("what the texts are about and which categories of personal data they hold"),
            "processed_by_fedsov": {name: _data_use(r) for name, r in cfg.regions.items() if name not in excluded},
        },
        "recipients": _recipients(cfg, manifest),
        "transfers": _transfers(cfg, excluded, on),
        "retention": _retention(cfg, run, excluded),
        "security_measures": _measures(cfg, manifest, report),
        "dpia": {
            "description": "see purposes, data_subjects, personal_data, recipients and transfers (Art. 35(7)(a))",
            "necessity_and_proportionality": to_fill(
                "why a model trained on this data is needed for the purpose, "
                "and why less data or less identifying data would not do "
                "(Art. 35(7)(b))"
            ),
            "risks_measured_by_fedsov": _measured_risks(report),
            "risks": to_fill(
                "the risks to the people's rights and freedoms, given the measurements above (Art. "
                "35(7)(c)): e.g. what a leaked secret or a membership inference would mean for them"
            ),
            "measures": "see security_measures (Art. 35(7)(d))",
            "residual_risk_and_consultation": to_fill(
                "the residual risk; the views of the people or their "
                "representatives where appropriate (Art. 35(9)); prior "
                "consultation of the authority if the risk stays high (Art. 36)"
            ),
        },
        "erasure": (
            "Erasure requests are recorded on each region's node (`fedsov node erase`), logged in its audit "
            "log, and leave the person's records out of all later training; the node reports which runs "
            "trained on them and at what epsilon. Whether to retrain from an earlier checkpoint is the "
            "operator's decision."
        ),
        "sources": {
            "config": str(run.config_path),
            "events": str(run.events_path),
            "summary": str(run.summary_path) if summary else None,
            "manifest": str(run.adapter_dir / MANIFEST) if manifest else None,
            "privacy_report": str(run.report_dir / "privacy-report.json") if report else None,
        },
    }
    record["to_fill"] = _unfilled(record)
    return record


def write_dpo_record(run: RunDirectory, out_dir: Path | None = None) -> tuple[Path, Path]:
    record = build_dpo_record(run)
    out = out_dir or run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "dpo-record.json", out / "dpo-record.md"
    json_path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    md_path.write_text(render_markdown(record))
    return json_path, md_path


# -- sections ---------------------------------------------------------------------------------


def _purposes(cfg: FedsovConfig, manifest: dict | None) -> dict[str, Any]:
    model = manifest["base_model"] if manifest else {"path": cfg.model.name_or_path, "fingerprint": None}
    operations = [
        f"fine-tuning a LoRA adapter of the base model {model['path']} with DP-SGD, on each region's own node; "
        "only noised adapter updates leave a node, summed under secure aggregation"
        if cfg.secure_aggregation.enabled
        else f"fine-tuning a LoRA adapter of the base model {model['path']} with DP-SGD on each region's own node; "
        "noised adapter updates are sent to the coordinator one by one (secure aggregation off)",
        "held-out evaluation on each node (the coordinator receives summed losses per region)",
    ]
    if cfg.audit.enabled:
        operations.append(
            "a memorisation audit of the final adapter on each node (canaries, membership inference, "
            "PII in generations); only aggregate numbers and redacted examples leave the node"
        )
    return {
        "declared": cfg.purpose
        or to_fill(
            "the purpose the model serves, in the controller's words (set "
            "`purpose` in the run config to have fedsov record it)"
        ),
        "processing_operations": operations,
    }


def _counted(cfg: FedsovConfig, joined: list[dict], excluded: dict[str, str]) -> dict[str, Any]:
    counted: dict[str, Any] = {}
    for name, region in cfg.regions.items():
        if name in excluded:
            counted[name] = {"excluded": excluded[name], "people": 0}
            continue
        nodes = [e for e in joined if e["region"] == name]
        counted[name] = {
            "nodes": [e["node"] for e in nodes],
            "people": sum(int(e.get("people", 0)) for e in nodes) if all("people" in e for e in nodes) else None,
            "privacy_units": sum(int(e["units"]) for e in nodes),
            "unit": region.policy.privacy.unit.value,
            "records_excluded_without_consent": sum(int(e["excluded_no_consent"]) for e in nodes),
            "records_excluded_special_category_or_field": sum(int(e["excluded_special"]) for e in nodes),
            "note": "people: distinct user ids in the nodes' training and held-out data, as each node counted them"
            + ("; privacy units include the audit's canary copies" if cfg.audit.enabled else ""),
        }
    return counted


def _data_use(region) -> dict[str, Any]:
    d = region.policy.data_use
    return {
        "law": region.policy.law,
        "records": "free-text records with a user id and a consent flag (and optional tags)",
        "consent_required": d.require_consent,
        "special_categories_excluded": list(d.excluded_special_categories),
        "fields_excluded": list(d.excluded_fields),
        "identifiers_scrubbed_before_training": list(d.scrub_entities) if d.scrub_pii else [],
    }


def _recipients(cfg: FedsovConfig, manifest: dict | None) -> list[dict[str, Any]]:
    j = cfg.federation.coordinator_jurisdiction
    what = (
        "each round's sum of the nodes' noised adapter updates (never one node's), summed losses per region, "
        "each node's record and unit counts and epsilon spent"
        if cfg.secure_aggregation.enabled
        else "each node's noised adapter update, losses, record and unit counts and epsilon spent"
    )
    recipients = [
        {"who": "the coordinator", "jurisdiction": j, "receives": what, "organisation": to_fill("who operates it")},
        {"who": "every contributing node", "receives": "the global adapter after each round"},
    ]
    if manifest:
        allowed = {r: info["allowed_deployment"] for r, info in manifest["contributing_regions"].items()}
        recipients.append(
            {
                "who": "whoever the final adapter is exported to or deployed for",
                "allowed_jurisdictions_by_region": allowed,
                "organisations": to_fill("who will use or receive the model"),
            }
        )
    return recipients


def _transfers(cfg: FedsovConfig, excluded: dict[str, str], on: datetime.date) -> dict[str, Any]:
    j = cfg.federation.coordinator_jurisdiction
    out: dict[str, Any] = {}
    for name, region in cfg.regions.items():
        p = region.policy
        allowed, why = coordinator_allowed(p, j, on)
        entry = {
            "law": p.law,
            "from": region.jurisdiction,
            "to": j,
            "to_another_jurisdiction": region.jurisdiction != j,
            "took_place": name not in excluded,
            "evaluated_on": on.isoformat(),
            "basis_as_evaluated": why if allowed else f"refused: {excluded.get(name, why)}",
            "policy_hash_of_coordinator_copy": policy_hash(p),
            "rules": transfer_rules(p, on),
        }
        if p.transfers.volume_rules is not None and name not in excluded:
            entry["volume_rules"] = (
                "evaluated by each node on the people its releases abroad covered in the period "
                "(its audit log's transfer_scope entries record the band and the safeguard)"
            )
        if name not in excluded:
            entry["assessment"] = to_fill(
                "whether a DP-noised adapter update is personal data of the people it was "
                "trained on, and the transfer tool relied on (adequacy, safeguard, "
                "derogation)"
            )
        out[name] = entry
    return out


def _retention(cfg: FedsovConfig, run: RunDirectory, excluded: dict[str, str]) -> dict[str, Any]:
    days, rule = checkpoint_rule(run)
    kept = sorted(p.name for p in run.checkpoints_dir.glob("round-*")) if run.checkpoints_dir.is_dir() else []
    return {
        "by_region": {
            name: {
                "checkpoint_days": r.policy.retention.checkpoint_days,
                "ledger_backup_days": r.policy.retention.ledger_backup_days,
            }
            for name, r in cfg.regions.items()
            if name not in excluded
        },
        "this_run_checkpoints": {
            "days": days,
            "rule": rule,
            "kept_now": kept,
            "enforced_by": "`fedsov retention enforce --runs-dir <runs>` on the coordinator",
        },
        "ledger_backups": "deleted on each node by `fedsov retention enforce` and at node start",
        "never_deleted": "the privacy ledgers and audit logs: the evidence of the privacy spent and of every decision",
        "final_adapter": to_fill("how long the released model is kept, and where"),
        "source_data": to_fill("the regions' own retention of the training records (fedsov does not hold them)"),
    }


def _measures(cfg: FedsovConfig, manifest: dict | None, report: dict | None) -> dict[str, Any]:
    dp = {}
    for name, info in (manifest["contributing_regions"] if manifest else {}).items():
        p = cfg.regions[name].policy.privacy  # contributing regions are the run's configured ones
        dp[name] = {
            "epsilon_spent": info["epsilon"],
            "delta": info["delta"],
            "unit": info["unit"],
            "rounds": info["rounds_contributed"],
            "nodes": info["nodes"],
            "lifetime_budget": p.epsilon_budget,
            "min_noise_multiplier": p.min_noise_multiplier,
            "max_grad_norm": p.max_grad_norm,
        }
    cohorts = {n: r.policy.transfers.min_cohort for n, r in cfg.regions.items()}
    return {
        "differential_privacy": {
            "enabled": cfg.privacy.enabled,
            "target_epsilon": cfg.privacy.target_epsilon,
            "noise_multiplier": cfg.privacy.noise_multiplier,
            "by_region": dp,
            "accounting": "cumulative per dataset across runs, in each region's privacy ledger",
        },
        "secure_aggregation": {
            "enabled": cfg.secure_aggregation.enabled,
            "threshold_fraction": cfg.secure_aggregation.threshold_fraction,
            "min_clients": cfg.secure_aggregation.min_clients,
            "min_cohort_by_region": cohorts,
        },
        "residency": "raw records never leave a node; each node reads only its region's records, from its storage "
        "roots",
        "egress_guard": "every reply a node sends is checked against an allow-list of its message type",
        "memorisation_audit": {r: v["verdict"] for r, v in (report or {}).get("regions", {}).items()} or None,
        "audit_log": (report or {}).get("audit_log"),
        "evidence_anchors": (manifest or {}).get("evidence_anchors"),
        "organisational": to_fill(
            "access control, staff training, incident response and other measures (Art. 30(1)(g), 32)"
        ),
    }


def _measured_risks(report: dict | None) -> dict[str, Any] | str:
    if report is None:
        return "no privacy report: run `fedsov report <run_dir>`, then write this record again"
    out: dict[str, Any] = {"bound_violations": report.get("bound_violations", [])}
    for name, r in report.get("regions", {}).items():
        audit = r.get("audit") or {}
        exposure = [e["max_bits"] for e in audit.get("exposure", {}).values()]
        out[name] = {
            "verdict": r["verdict"]["status"],
            "signals": r["verdict"]["signals"],
            "max_exposure_bits": max(exposure, default=None),
            "mia_auc": (audit.get("mia") or {}).get("calibrated-auc"),
            "empirical_epsilon_lower_bound": (audit.get("one_run") or {}).get("epsilon_lower_bound"),
            "accounted_epsilon": r.get("epsilon"),
        }
    return out


# -- rendering --------------------------------------------------------------------------------


def _unfilled(node: Any, path: str = "") -> list[dict[str, str]]:
    if isinstance(node, dict):
        if set(node) == {"to_fill"}:
            return [{"field": path, "what": node["to_fill"]}]
        return [f for k, v in node.items() for f in _unfilled(v, f"{path}.{k}" if path else k)]
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in _unfilled(v, f"{path}[{i}]")]
    return []


def _cell(value: Any) -> str:
    if isinstance(value, dict) and set(value) == {"to_fill"}:
        return f"**TO FILL:** {value['to_fill']}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "none"
    return "n/a" if value is None else str(value).replace("|", "/")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return (
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        + [""]
    )


def render_markdown(r: dict[str, Any]) -> str:
    """The record for people: the main facts as tables, every field to fill named; the JSON holds everything."""
    out = [
        f"# Record of processing and DPIA inputs: run {r['run_id']}",
        "",
        f"Written {r['generated_at']} by `fedsov dpo-record` from the run's own files. Run status: {r['status']}; "
        f"{r['rounds_completed']} round(s). Sections follow GDPR Art. 30(1) and 35(7); everything below, and each "
        "region's full transfer rules, is also in `dpo-record.json`.",
        "",
        f"*{r['notice']}*",
        "",
        "## Fields the DPO must fill",
        "",
    ]
    out += [f"- `{f['field']}`: {f['what']}" for f in r["to_fill"]]
    out += [
        "",
        "## Controller and contacts (Art. 30(1)(a))",
        "",
        f"- Controller: {_cell(r['controller'])}",
        f"- DPO: {_cell(r['dpo'])}",
        f"- Coordinator operator: {_cell(r['coordinator_operator'])}",
        "",
        "## Purposes (Art. 30(1)(b), 35(7)(a))",
        "",
        f"- Declared purpose: {_cell(r['purposes']['declared'])}",
        "- Processing operations:",
    ]
    out += [f"  - {op}" for op in r["purposes"]["processing_operations"]]
    out += [f"- Legal basis, {region}: {_cell(v)}" for region, v in r["legal_basis"].items()]
    out += [
        "",
        "## People and data (Art. 30(1)(c))",
        "",
        f"- Categories of people: {_cell(r['data_subjects']['categories'])}",
        f"- Categories of data: {_cell(r['personal_data']['categories'])}",
        "",
    ]
    counted, used = r["data_subjects"]["counted"], r["personal_data"]["processed_by_fedsov"]
    out += _table(
        [
            "region",
            "nodes",
            "people",
            "privacy units",
            "records left out: no consent",
            "records left out: special category or field",
            "special categories excluded",
            "identifiers scrubbed",
        ],
        [
            [
                name,
                c.get("nodes", "excluded"),
                c["people"],
                f"{c.get('privacy_units', 0)} ({c.get('unit', '-')})",
                c.get("records_excluded_without_consent"),
                c.get("records_excluded_special_category_or_field"),
                used.get(name, {}).get("special_categories_excluded"),
                used.get(name, {}).get("identifiers_scrubbed_before_training"),
            ]
            for name, c in counted.items()
        ],
    )
    out += [
        "People are the distinct user ids in the nodes' training and held-out data; privacy units include the "
        "memorisation audit's canary copies where it ran.",
        "",
        "## Recipients (Art. 30(1)(d))",
        "",
    ]
    for rec in r["recipients"]:
        where = f" ({rec['jurisdiction']})" if "jurisdiction" in rec else ""
        extra = "; ".join(
            f"{k.replace('_', ' ')}: {_cell(v)}" for k, v in rec.items() if k not in ("who", "jurisdiction", "receives")
        )
        out.append(
            f"- {rec['who']}{where}: {rec.get('receives', '')}{'; ' if extra and 'receives' in rec else ''}{extra}"
        )
    out += ["", "## Transfers (Art. 30(1)(e))", ""]
    out += _table(
        [
            "region",
            "law",
            "from",
            "to",
            "another jurisdiction",
            "updates sent",
            "basis, as evaluated on the run's date",
        ],
        [
            [
                name,
                t["law"],
                t["from"],
                t["to"],
                "yes" if t["to_another_jurisdiction"] else "no",
                "yes" if t["took_place"] else "no",
                t["basis_as_evaluated"],
            ]
            for name, t in r["transfers"].items()
        ],
    )
    out += [f"- {name}: volume rules {t['volume_rules']}" for name, t in r["transfers"].items() if "volume_rules" in t]
    out += [
        f"- Assessment, {name}: {_cell(t['assessment'])}" for name, t in r["transfers"].items() if "assessment" in t
    ]
    keep = r["retention"]
    run_rule = keep["this_run_checkpoints"]
    out += ["", "## Retention (Art. 30(1)(f))", ""]
    out += _table(
        ["region", "checkpoints kept (days)", "ledger backups kept (days)"],
        [[name, v["checkpoint_days"], v["ledger_backup_days"]] for name, v in keep["by_region"].items()],
    )
    out += [
        f"- This run's checkpoints: {run_rule['days']} days ({run_rule['rule']}); kept now: "
        f"{_cell(run_rule['kept_now'])}; enforced by {run_rule['enforced_by']}",
        f"- Ledger backups: {keep['ledger_backups']}",
        f"- Never deleted: {keep['never_deleted']}",
        f"- Final adapter: {_cell(keep['final_adapter'])}",
        f"- Source data: {_cell(keep['source_data'])}",
    ]
    m = r["security_measures"]
    dp = m["differential_privacy"]
    out += [
        "",
        "## Security measures (Art. 30(1)(g), 32)",
        "",
        f"- Differential privacy: {'on' if dp['enabled'] else 'OFF'} (coordinator's target epsilon "
        f"{_cell(dp['target_epsilon'])}, noise multiplier {_cell(dp['noise_multiplier'])}); {dp['accounting']}",
        "",
    ]
    out += _table(
        [
            "region",
            "epsilon spent",
            "delta",
            "unit",
            "lifetime budget",
            "noise multiplier at least",
            "clip norm at most",
            "rounds",
        ],
        [
            [
                name,
                v["epsilon_spent"],
                v["delta"],
                v["unit"],
                v["lifetime_budget"],
                v["min_noise_multiplier"],
                v["max_grad_norm"],
                v["rounds"],
            ]
            for name, v in dp["by_region"].items()
        ],
    )
    sa = m["secure_aggregation"]
    log = m["audit_log"]
    out += [
        f"- Secure aggregation: {'on' if sa['enabled'] else 'OFF'} (unmasking needs "
        f"{sa['threshold_fraction']:g} of a round's clients; at least {sa['min_clients']} updates per sum; "
        "smallest cohort by region: " + ", ".join(f"{k} {v}" for k, v in sa["min_cohort_by_region"].items()) + ")",
        f"- Residency: {m['residency']}",
        f"- Egress guard: {m['egress_guard']}",
        "- Coordinator's audit log: "
        + (
            "not checked (no privacy report)"
            if log is None
            else f"verified, {log['entries']} entries"
            if log["ok"]
            else f"FAILED verification: {log['problem']}"
        ),
        f"- Evidence anchors kept for nodes: {_cell(sorted(m['evidence_anchors'] or {}))}",
        f"- Organisational measures: {_cell(m['organisational'])}",
        "",
        "## DPIA (Art. 35(7))",
        "",
    ]
    d = r["dpia"]
    out += [
        f"- (a) Description: {d['description']}",
        f"- (b) Necessity and proportionality: {_cell(d['necessity_and_proportionality'])}",
        "- (c) Risks measured by fedsov (memorisation audit):",
        "",
    ]
    measured = d["risks_measured_by_fedsov"]
    if isinstance(measured, str):
        out += [f"  {measured}", ""]
    else:
        out += _table(
            [
                "region",
                "verdict",
                "signals",
                "max canary exposure (bits)",
                "MIA AUC (calibrated)",
                "empirical epsilon lower bound",
                "accounted epsilon",
            ],
            [
                [
                    name,
                    v["verdict"],
                    v["signals"],
                    v["max_exposure_bits"],
                    v["mia_auc"],
                    v["empirical_epsilon_lower_bound"],
                    v["accounted_epsilon"],
                ]
                for name, v in measured.items()
                if name != "bound_violations"
            ],
        )
        out += [f"  Lower bounds above the accounted epsilon: {_cell(measured['bound_violations'])}", ""]
    out += [
        f"- (c) Risks to the people: {_cell(d['risks'])}",
        f"- (d) Measures: {d['measures']}",
        f"- Residual risk and consultation: {_cell(d['residual_risk_and_consultation'])}",
        "",
        "## Erasure requests",
        "",
        r["erasure"],
        "",
        "## Sources",
        "",
    ]
    out += [f"- {k}: {v or 'absent'}" for k, v in r["sources"].items()]
    return "\n".join(out) + "\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise FedsovError(f"{path} is not valid JSON ({err}); restore it from a copy of the run directory.") from err
