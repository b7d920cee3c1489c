"""Issue 19, part 2: transfer safeguards on a node's own counts, retention enforced, erasure requests, run
branches and the DPO record.

Nodes, ledgers and run folders are driven directly; two tests run the real coordinator and ClientApps in
process (a node training for a coordinator abroad; a run that is branched, resumed and recorded for the DPO).
"""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest

from client.settings import LEDGER_FILE, NodeFolders
from common.audit import AuditLog, EvidenceKey, HashChainLog
from common.cli import main
from common.config import config_to_yaml
from common.data.prepare import ensure_synthetic_data
from common.errors import LedgerError, PolicyViolation
from common.policy import PrivacyUnitKind
from common.privacy.accounting import DpSgdSteps, epsilon_spent
from common.privacy.ledger import PrivacyLedger
from common.privacy.units import PrivacyUnit
from server.rundir import RunDirectory
from server.simulation import resolve_run_config
from tests.conftest import edit_policy
from tests.inprocess import Federation, node_audit_entries, region_ledger, run_federation

DAY = 86400


def age(path, days: float) -> None:
    """Set the modification time of `path` and everything in it to `days` ago."""
    when = time.time() - days * DAY
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (when, when))


def decision(n, on=None):
    """The node's transfer decision for its coordinator on its current data (and the period's earlier releases)."""
    return n.transfers.decision(n.data.people, n.data.sensitive_people, on)


def node(cfg, partition: int):
    from client.node import RegionNode, simulation_settings

    return RegionNode(simulation_settings(cfg, partition))


# -- transfers abroad: volume rules on the node's own counts ----------------------------------


def cn_abroad(config_dir, people_below: int, sensitive_below: int, safeguard: str | None = None) -> None:
    """The CN preset with a coordinator in the EU allowed, its first band bounded as given (the second at 10x)."""
    edit_policy(config_dir, "cn", "transfers.allowed_coordinator_jurisdictions", ["CN", "EU"])
    edit_policy(
        config_dir,
        "cn",
        "transfers.volume_rules.bands",
        [
            {"people_below": people_below, "sensitive_people_below": sensitive_below, "requires": []},
            {
                "people_below": people_below * 10,
                "sensitive_people_below": sensitive_below * 10,
                "requires": ["standard_contract", "certification"],
            },
            {"people_below": None, "sensitive_people_below": None, "requires": ["security_assessment"]},
        ],
    )
    edit_policy(
        config_dir,
        "cn",
        "transfers.safeguards",
        []
        if safeguard is None
        else [
            {
                "kind": safeguard,
                "reference": "CN-2026-0042 (filed with the provincial CAC)",
                "jurisdictions": ["EU"],
                "recorded_on": "2026-01-05",
                "expires": "2029-01-05",
            }
        ],
    )


@pytest.fixture
def cn_cfg(small_overrides):
    cfg = resolve_run_config(small_overrides + ["regions=[eu,cn]"])
    ensure_synthetic_data(cfg, log=lambda m: None)
    return cfg


def test_a_node_over_the_exempt_band_refuses_a_coordinator_abroad_until_the_safeguard_is_recorded(cn_cfg, config_dir):
    cn = node(cn_cfg, 2)  # partitions 0, 1 are eu-1, eu-2
    people, sensitive = cn.data.counts["people"], cn.data.counts["sensitive_people"]
    assert people == len(cn.data.people) >= 10 and 0 < sensitive == len(cn.data.sensitive_people) < people
    assert cn.data.sensitive_people <= cn.data.people
    cn_abroad(config_dir, people + 1, sensitive + 1)  # everyone fits the exempt band
    accepted = node(cn_cfg, 2)
    accepted.describe("EU")
    assert decision(accepted).band == 0
    cn_abroad(config_dir, people, sensitive + 1)  # one person too many for it
    refused = node(cn_cfg, 2)
    with pytest.raises(
        PolicyViolation,
        match=f"PIPL: {people} people and {sensitive} with sensitive data "
        r"\(calendar_year\) to EU need a standard contract or certification",
    ):
        refused.describe("EU")
    entry = node_audit_entries(cn_cfg, "cn-1")[-1]
    assert (entry["action"], entry["decision"]) == ("transfer", "refused") and "transfers.safeguards" in entry["reason"]
    cn_abroad(config_dir, people + 1, sensitive)  # the sensitive bound switches it the same way
    assert decision(node(cn_cfg, 2)).required == ("standard_contract", "certification")
    cn_abroad(config_dir, people, sensitive + 1, safeguard="standard_contract")
    contracted = node(cn_cfg, 2)
    contracted.describe("EU")
    contract = decision(contracted)
    assert contract.allowed and contract.band == 1
    assert contract.recorded == "standard_contract CN-2026-0042 (filed with the provincial CAC)"
    cn_abroad(config_dir, people, sensitive + 1, safeguard="certification")
    assert decision(node(cn_cfg, 2)).allowed  # either kind the band names will do
    cn_abroad(config_dir, people // 10, 1, safeguard="standard_contract")  # a contract is not a security assessment
    with pytest.raises(PolicyViolation, match="need a security assessment"):
        node(cn_cfg, 2).describe("EU")


def test_people_sent_abroad_this_year_count_across_nodes_and_restarts(small_overrides, config_dir, capsys):
    cn_abroad(config_dir, 100_000, 1, safeguard="standard_contract")  # the preset's bounds, and a filed contract
    fed = Federation(small_overrides + ["regions=[eu,cn]", "federation.local_steps=2"])
    reply = fed.train("cn-1")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    cn1 = node(fed.cfg, 2)
    scope = [e for e in fed.audit("cn-1") if e["action"] == "transfer_scope"]
    assert len(scope) == 1 and scope[0]["people_added"] == len(cn1.data.people)
    assert scope[0]["sensitive_added"] == len(cn1.data.sensitive_people) and scope[0]["safeguard"]["band"] == 1
    register = fed.cfg.workdir + "/ledgers/cn/transfer-scope.jsonl"
    user = sorted(cn1.data.people)[0]
    assert user not in open(register).read()  # keyed pseudonyms, never user ids

    # cn-2 shares the region's ledger folder: the people cn-1 sent count for it too.
    cn2 = node(fed.cfg, 3)
    total = len(cn1.data.people) + len(cn2.data.people)
    both_sensitive = len(cn1.data.sensitive_people) + len(cn2.data.sensitive_people)
    cn_abroad(config_dir, 2, 1, safeguard="standard_contract")
    edit_policy(config_dir, "cn", "transfers.volume_rules.bands.1.people_below", total)  # cn-2 alone is below it
    edit_policy(config_dir, "cn", "transfers.volume_rules.bands.1.sensitive_people_below", both_sensitive + 1)
    cn2 = node(fed.cfg, 3)
    with pytest.raises(PolicyViolation, match=f"{total} people .* need a security assessment"):
        cn2.describe("EU")
    next_year = datetime.date(datetime.date.today().year + 1, 1, 1)
    assert decision(cn2, next_year).people == len(cn2.data.people)  # a new calendar year starts at 0

    # The erasure report names the run that trained on a person, with the epsilon that covered them.
    folders = [
        "--region",
        "cn",
        "--state-dir",
        f"{fed.cfg.workdir}/nodes/cn-1",
        "--key-dir",
        f"{fed.cfg.workdir}/keys/cn-1",
        "--ledger-dir",
        f"{fed.cfg.workdir}/ledgers/cn",
        "--ledger-key-dir",
        f"{fed.cfg.workdir}/keys/ledger-cn",
    ]
    trained = next(u.user_id for u in cn1.data.train_units if not u.user_id.startswith("canary-"))
    assert main(["node", "erase", *folders, "--user", trained, "--reference", "DSR-2026-17"]) == 0
    out = capsys.readouterr().out
    charge = region_ledger(fed.cfg, "cn").charges()[-1]
    assert charge.node == "cn-1" and "run hostile: trained on their data in round(s) 1 on cn-1" in out
    assert f"protected at epsilon {charge.epsilon_after:.3g}, delta 1e-05 for them as a whole" in out

    # A register deleted with its head does not reset the count: the node's audit log anchors it.
    os.remove(register)
    os.remove(register + ".head")
    with pytest.raises(LedgerError, match="transfer-scope register .* is missing"):
        node(fed.cfg, 2)


# -- erasure ----------------------------------------------------------------------------------


def test_an_erasure_request_leaves_the_person_out_of_the_next_round(small_overrides):
    from client.erasure import request_erasure
    from client.node import simulation_settings
    from client.retention import backup_ledger

    cfg = resolve_run_config(small_overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    settings = simulation_settings(cfg, 0)
    eu = node(cfg, 0)
    before = dict(eu.data.counts)
    user = next(u.user_id for u in eu.data.train_units if not u.user_id.startswith("canary-"))
    texts = [t for u in eu.data.train_units if u.user_id == user for t in u.texts]
    others = {t for u in eu.data.train_units if u.user_id != user for t in u.texts}
    own = [t for t in texts if t not in others]
    assert own  # their own texts, to look for in what the node keeps
    report = request_erasure(settings, user, "DSR-2026-3")
    assert report.new and not report.runs and report.caches_deleted == 1

    eu.describe("EU")  # the running node's next message
    after = eu.data.counts
    assert after["excluded_erased"] >= len(texts) > 0 and after["records"] == before["records"]
    assert after["people"] == before["people"] - 1 and after["train_units"] == before["train_units"] - len(texts)
    assert user not in eu.data.people and user not in {u.user_id for u in eu.data.train_units}
    reload = [e for e in node_audit_entries(cfg, "eu-1") if e["action"] == "data"]
    assert reload and reload[-1]["decision"] == "reloaded"
    erasure = [e for e in node_audit_entries(cfg, "eu-1") if e["action"] == "erasure"][-1]
    assert erasure["reference"] == "DSR-2026-3" and erasure["person"] == report.person
    for kept in (
        settings.state_dir / "audit.jsonl",
        settings.ledger_dir / "erasures.jsonl",
        *(settings.state_dir / "cache").glob("*.json"),
    ):
        text = kept.read_text()
        assert user not in text and not any(t in text for t in own), kept

    # Restarted, the node still leaves them out; its start also deletes ledger backups past their time.
    old = backup_ledger(settings)
    age(old, 3651)
    restarted = node(cfg, 0)
    assert restarted.data.counts == after and not old.exists()
    assert request_erasure(settings, user, "DSR-2026-3 (again)").new is False
    # A register cut behind the node's back stops it: its audit log anchors the register's head.
    os.remove(settings.ledger_dir / "erasures.jsonl")
    os.remove(settings.ledger_dir / "erasures.jsonl.head")
    with pytest.raises(LedgerError, match="erasure register .* is missing"):
        node(cfg, 0)


def test_the_erasure_report_names_every_run_with_the_guarantee_that_covered_the_person(tmp_path, config_dir):
    from client.erasure import request_erasure

    def charge(ledger, dataset, run, rounds):
        for r in rounds:
            ledger.charge(
                dataset, DpSgdSteps(1.0, 0.02, 10), budget=10, run_id=run, round_number=r, max_grad_norm=1.0, node="n-1"
            )

    def units(kind, *users):
        return [PrivacyUnit(kind, u, (f"a record of {u}",)) for u in users]

    folders = NodeFolders.of({"region": "cn", "state-dir": str(tmp_path / "cn-1"), "config-dir": str(config_dir)})
    key = EvidenceKey.load_or_create(folders.ledger_key_dir)
    ledger = PrivacyLedger(folders.ledger_dir / LEDGER_FILE, delta=1e-5, unit=PrivacyUnitKind.user, key=key)
    first = ledger.register(units(PrivacyUnitKind.user, "ana", "bo", "cy"))
    charge(ledger, first, "run-a#1", [1, 2, 3])
    second = ledger.register(units(PrivacyUnitKind.user, "bo", "dee"))
    charge(ledger, second, "run-b#1", [1])
    charge(ledger, second, "run-b#2", [2])  # the run resumed: a second session

    bo = request_erasure(folders, "bo", "DSR-1")
    assert [(r.run, r.rounds, r.sessions) for r in bo.runs] == [
        ("run-a", [1, 2, 3], ["run-a#1"]),
        ("run-b", [1, 2], ["run-b#1", "run-b#2"]),
    ]
    steps = [c.dp_steps for c in ledger.charges()]
    assert bo.runs[0].epsilon == pytest.approx(epsilon_spent(steps[:3], 1e-5))
    assert bo.lifetime_epsilon == pytest.approx(epsilon_spent(steps, 1e-5))
    assert bo.lifetime_epsilon > bo.runs[0].epsilon
    lines = "\n".join(bo.lines())
    assert "run run-a: trained on their data in round(s) 1-3" in lines and "none of its checkpoints predates" in lines
    assert [r.run for r in request_erasure(folders, "dee", "DSR-2").runs] == ["run-b"]
    nobody = request_erasure(folders, "zed", "DSR-3")
    assert not nobody.runs and "no run trained on their data" in nobody.lines()[1]
    charge(ledger, ledger.register(units(PrivacyUnitKind.user, "ana", "eve")), "run-a#1", [4])  # eve joined later
    eve = request_erasure(folders, "eve", "DSR-5")
    assert [(r.run, r.rounds) for r in eve.runs] == [("run-a", [4])]
    assert "its checkpoints up to round 3 predate them" in "\n".join(eve.lines())
    audit = AuditLog(folders.state_dir / "audit.jsonl", "test", EvidenceKey.load(folders.key_dir)).entries()
    assert [e["report"]["runs"][0]["run"] for e in audit if e["action"] == "erasure" and e["report"]["runs"]] == [
        "run-a",
        "run-b",
        "run-a",
    ]

    # Record units: the ledger keeps salted people beside the record digests; a dataset registered before it did
    # cannot tell, so its runs are reported as possibly including the person.
    eu = NodeFolders.of({"region": "eu", "state-dir": str(tmp_path / "eu-1"), "config-dir": str(config_dir)})
    key = EvidenceKey.load_or_create(eu.ledger_key_dir)
    records = PrivacyLedger(eu.ledger_dir / LEDGER_FILE, delta=1e-5, unit=PrivacyUnitKind.record, key=key)
    charge(records, records.register(units(PrivacyUnitKind.record, "ana", "bo")), "run-c#1", [1])
    records.append({"kind": "dataset", "fingerprint": "f" * 64, "units": 1, "unit_digests": ["0" * 32]})
    charge(records, "f" * 64, "run-old#1", [1])
    report = request_erasure(eu, "bo", "DSR-4")
    assert [r.run for r in report.runs] == ["run-c"] and report.undetermined_runs == ["run-old"]
    assert "each of their records" in "\n".join(report.lines())


# -- retention --------------------------------------------------------------------------------


def test_retention_deletes_the_ledger_backups_that_are_due_and_nothing_else(tmp_path, config_dir, capsys):
    from client.retention import backup_ledger

    folders = NodeFolders.of({"region": "eu", "state-dir": str(tmp_path / "eu-1"), "config-dir": str(config_dir)})
    key = EvidenceKey.load_or_create(folders.ledger_key_dir)
    ledger = PrivacyLedger(folders.ledger_dir / LEDGER_FILE, delta=1e-5, unit=PrivacyUnitKind.record, key=key)
    ledger.register([PrivacyUnit(PrivacyUnitKind.record, "ana", ("text",))])
    backups = [backup_ledger(folders) for _ in range(3)]
    assert len(set(backups)) == 3 and all(HashChainLog(b / LEDGER_FILE, key).verify().ok for b in backups)
    for backup, days in zip(backups, (3651, 3649, 0), strict=True):  # the EU preset keeps backups 3650 days
        age(backup, days)
    live = [folders.ledger_dir / LEDGER_FILE, folders.state_dir / "audit.jsonl"]
    for path in live:
        age(path, 5000)  # the live ledger and audit log are never due, however old
    flags = [
        "--config-dir",
        str(config_dir),
        "retention",
        "enforce",
        "--region",
        "eu",
        "--state-dir",
        str(folders.state_dir),
    ]
    assert main([*flags, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"due: ledger backup {backups[0]}: 3651.0 days old, over the 3650 days of eu (GDPR): "
        "retention.ledger_backup_days = 3650"
    ]
    assert all(b.exists() for b in backups)
    assert main(flags) == 0
    assert [b.exists() for b in backups] == [False, True, True] and all(p.exists() for p in live)
    deleted = [
        e for e in AuditLog(live[1], "test", EvidenceKey.load(folders.key_dir)).entries() if e["action"] == "retention"
    ]
    assert [(e["decision"], e["path"], e["limit_days"]) for e in deleted] == [("deleted", str(backups[0]), 3650)]
    assert main(flags) == 0 and "Nothing is due" in capsys.readouterr().out


def test_retention_deletes_checkpoints_past_the_strictest_contributing_region(small_overrides, config_dir, tmp_path):
    cfg = resolve_run_config(small_overrides)  # eu keeps checkpoints 30 days, us 90
    runs = tmp_path / "coordinator" / "runs"

    def make_run(name, checkpoint_ages, excluded=()):
        run = RunDirectory(runs / name)
        run.create()
        run.config_path.write_text(config_to_yaml(cfg))
        for region in excluded:
            run.event("region_excluded", region=region, reason="left out by planning")
        for number, days in checkpoint_ages.items():
            path = run.save_checkpoint(number, lambda d: (d / "adapter_model.safetensors").write_bytes(b"w"), {}, 10)
            age(path, days)
        run.adapter_dir.mkdir()
        (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"final")
        age(run.adapter_dir, 400)  # the run's product, not a checkpoint
        return run

    both = make_run("both", {1: 95, 2: 31, 3: 10})
    us_only = make_run("us-only", {1: 95, 2: 31}, excluded=["eu"])
    EvidenceKey.load_or_create(both.coordinator_key_dir)

    def kept(run):
        return [p.name for p in sorted(run.checkpoints_dir.iterdir())]

    assert main(["retention", "enforce", "--runs-dir", str(runs)]) == 0
    assert kept(both) == ["round-0003"] and kept(us_only) == ["round-0002"]
    assert both.adapter_dir.exists() and us_only.adapter_dir.exists()
    key = EvidenceKey.load(both.coordinator_key_dir)
    logged = [e["reason"] for e in AuditLog(both.path / "audit.jsonl", "t", key).entries()]
    assert len(logged) == 2 and all("eu (GDPR): retention.checkpoint_days = 30" in r for r in logged)
    logged = [e["reason"] for e in AuditLog(us_only.path / "audit.jsonl", "t", key).entries()]
    assert len(logged) == 1 and "round-0001" in logged[0]
    assert "us (CCPA/CPRA): retention.checkpoint_days = 90" in logged[0]
    # A region that shortened its period since the run applies it now.
    edit_policy(config_dir, "us", "retention.checkpoint_days", 20)
    assert main(["retention", "enforce", "--runs-dir", str(runs)]) == 0
    assert kept(us_only) == [] and kept(both) == ["round-0003"]


# -- branches and the DPO record -------------------------------------------------------------


@pytest.mark.heavy(seconds=19)
def test_a_run_resumes_from_an_earlier_checkpoint_and_its_dpo_record(small_overrides, capsys):
    cfg, run, summary, _ = run_federation(small_overrides + ["purpose=a support assistant for our customers"])
    assert summary["rounds_completed"] == 2

    assert main(["dpo-record", str(run.path)]) == 0
    record = json.loads((run.report_dir / "dpo-record.json").read_text())
    markdown = (run.report_dir / "dpo-record.md").read_text()
    assert record["purposes"]["declared"] == "a support assistant for our customers"
    fields = [f["field"] for f in record["to_fill"]]
    for field in (
        "controller",
        "dpo",
        "legal_basis.eu",
        "data_subjects.categories",
        "transfers.us.assessment",
        "dpia.necessity_and_proportionality",
        "retention.final_adapter",
    ):
        assert field in fields and f"- `{field}`: " in markdown
    joined = {e["node"]: e["people"] for e in run.read_events() if e["event"] == "node_joined"}
    eu_people = len(node(cfg, 0).data.people) + len(node(cfg, 1).data.people)
    assert record["data_subjects"]["counted"]["eu"]["people"] == joined["eu-1"] + joined["eu-2"] == eu_people
    assert record["transfers"]["eu"]["basis_as_evaluated"] == "GDPR allows a coordinator in EU"
    assert record["transfers"]["us"]["took_place"] and record["transfers"]["us"]["rules"]["prohibited"]
    assert record["retention"]["this_run_checkpoints"]["days"] == 30
    measures = record["security_measures"]
    assert (
        measures["secure_aggregation"]["enabled"]
        and measures["differential_privacy"]["by_region"]["us"]["epsilon_spent"] > 0
        and set(measures["memorisation_audit"]) == {"eu", "us"}
    )
    assert measures["audit_log"]["ok"] and "## Transfers (Art. 30(1)(e))" in markdown and "**TO FILL:**" in markdown
    assert "| eu | GDPR | EU | EU | no | yes | GDPR allows a coordinator in EU |" in markdown

    assert main(["run", "branch", str(run.path), "--round", "1"]) == 0
    branch = RunDirectory(f"{run.path}-from-round-1")
    assert str(branch.path) in capsys.readouterr().out
    assert branch.latest_checkpoint().round == 1 and [r["round"] for r in branch.read_metrics()] == [0, 1]
    assert main(["run", "branch", str(run.path), "--round", "7"]) == 2  # no such checkpoint: named, nothing made
    assert "keeps no checkpoint of round 7 (kept: 1, 2" in capsys.readouterr().err

    _, resumed, resumed_summary, _ = run_federation([f"resume={branch.path}"])
    assert resumed.path == branch.path and resumed_summary["rounds_completed"] == 2
    assert [r["round"] for r in branch.read_metrics()] == [0, 1, 2]
    trained = {c.round for c in region_ledger(cfg, "eu").charges() if c.run_id.startswith(branch.run_id + "#")}
    assert trained == {2}  # only the rounds after the checkpoint were trained again
