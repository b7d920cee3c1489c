"""Hash-chained audit logs: tamper evidence, and the command that verifies them."""

import itertools
import json

import pytest

from common.audit import AuditLog, EvidenceKey, EvidenceKeyError, HashChainLog, TamperedLog
from common.cli import main


def filled_log(tmp_path, n=5):
    key = EvidenceKey.load_or_create(tmp_path / "keys", logs=(tmp_path / "audit.jsonl",))
    log = AuditLog(tmp_path / "audit.jsonl", actor="node:eu-1", key=key)
    for i in range(n):
        log.record(
            "plan",
            "accepted",
            reason=f"round {i + 1} within policy",
            round=i + 1,
            policy_hash="ab" * 32,
            bytes_sent=1000 + i,
            epsilon=0.5 * (i + 1),
        )
    return log


def test_entries_carry_the_required_fields_and_chain(tmp_path):
    log = filled_log(tmp_path)
    entries = log.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    for field in ("time", "round", "decision", "reason", "policy_hash", "bytes_sent", "epsilon", "prev", "hash"):
        assert field in entries[0]
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(entries))


@pytest.mark.parametrize(
    "damage, first_bad",
    [
        (lambda rows: rows[:2] + [{**rows[2], "epsilon": 0.01}] + rows[3:], 3),  # an edited entry
        (lambda rows: rows[:1] + rows[2:], 2),  # a removed entry
        (lambda rows: [rows[1], rows[0]] + rows[2:], 1),  # reordered entries
        (lambda rows: rows[:3], 4),  # the newest entries cut off
    ],
)
def test_tampering_is_found_at_the_first_bad_entry(tmp_path, damage, first_bad):
    log = filled_log(tmp_path)
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    log.path.write_text("".join(json.dumps(r) + "\n" for r in damage(rows)))
    result = HashChainLog(log.path, log.chain.key).verify()
    assert not result.ok and result.first_bad == first_bad
    with pytest.raises(TamperedLog):
        log.record("plan", "accepted", reason="an append must not paper over tampering")


def test_a_crash_between_append_and_head_is_not_tampering(tmp_path):
    log = filled_log(tmp_path, 3)
    head = log.chain.head_path.read_text()
    log.record("plan", "accepted", reason="fourth")
    log.chain.head_path.write_text(head)  # the head was not yet moved when the process died
    assert HashChainLog(log.path, log.chain.key).verify().ok
    assert len(log.entries()) == 4


def test_verify_command_reports_the_first_tampered_entry(tmp_path, capsys):
    good = filled_log(tmp_path / "a")
    bad = filled_log(tmp_path / "b")
    rows = bad.path.read_text().splitlines()
    rows[3] = rows[3].replace('"accepted"', '"refused"')
    bad.path.write_text("\n".join(rows) + "\n")
    assert main(["audit", "verify", str(good.path)]) == 0
    assert "OK, 5 entries" in capsys.readouterr().out
    assert main(["audit", "verify", str(good.path), str(bad.path)]) == 1
    out = capsys.readouterr().out
    assert f"{bad.path}: TAMPERED at entry 4" in out and "edited" in out


def test_the_evidence_key_is_private_and_never_silently_replaced(tmp_path):
    log = filled_log(tmp_path)
    key_file = tmp_path / "keys" / "evidence.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and oct(key_file.parent.stat().st_mode & 0o777) == "0o700"
    key_file.unlink()
    # With the log still there, a new key would silently restart the evidence: refused.
    with pytest.raises(EvidenceKeyError, match="restore the key folder"):
        EvidenceKey.load_or_create(tmp_path / "keys", logs=(log.path,))
    other = EvidenceKey.load_or_create(tmp_path / "other-keys")
    result = HashChainLog(log.path, other).verify()
    assert not result.ok and "written under evidence key" in result.problem


def test_verify_command_checks_a_log_against_an_anchor(tmp_path, capsys):
    log = filled_log(tmp_path)
    head = log.chain.chain_head()
    assert main(["audit", "verify", str(log.path), "--anchor", head.text()]) == 0
    assert "contains the anchor" in capsys.readouterr().out
    # Rolled back to an older copy (entries and head both cut back): only the anchor tells.
    lines = log.path.read_text().splitlines()[:3]
    log.path.write_text("\n".join(lines) + "\n")
    head_file = json.loads(log.chain.head_path.read_text())
    log.chain.head_path.write_text(json.dumps({**head_file, "count": 3, "hash": json.loads(lines[-1])["hash"]}))
    assert main(["audit", "verify", str(log.path)]) == 0
    assert main(["audit", "verify", str(log.path), "--anchor", head.text()]) == 1
    assert "ANCHOR MISSING" in capsys.readouterr().out


def test_policy_commands(tmp_path, capsys):
    from common.config import default_config_dir

    regions = default_config_dir() / "regions"
    files = sorted(regions.glob("*.yaml"))
    assert main(["policy", "validate", *map(str, files)]) == 0
    assert capsys.readouterr().out.count("OK ") == len(files)
    broken = tmp_path / "eu.yaml"
    broken.write_text((regions / "eu.yaml").read_text().replace("raw_data_export: false", "raw_data_export: true"))
    assert main(["policy", "validate", str(broken)]) == 2
    assert "raw data export is never possible" in capsys.readouterr().out
    assert main(["policy", "explain", "eu"]) == 0
    explained = capsys.readouterr().out
    assert "GDPR" in explained and "only in EU" in explained and "not legal advice" in explained
    assert main(["policy", "dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.strip().startswith("eu") and "ACCEPT" in line for line in lines)
    assert any(line.strip().startswith("cn") and "REFUSE" in line and "PIPL" in line for line in lines)


def test_a_log_rolled_back_under_a_running_process_is_caught(tmp_path):
    log = filled_log(tmp_path)
    saved = log.path.read_text(), log.chain.head_path.read_text()
    log.record("plan", "accepted", reason="sixth")
    log.path.write_text(saved[0])  # an older copy of log and head put back while the process runs
    log.chain.head_path.write_text(saved[1])
    with pytest.raises(TamperedLog, match="changed under this process"):
        log.entries()
