import hashlib
import json
import math
from pathlib import Path

import pytest

from common.audit import EvidenceKey
from common.config import PrivacyUnitKind
from common.data.records import Record
from common.errors import BudgetExhausted, LedgerError, PrivacyError
from common.privacy.accounting import DpSgdSteps, epsilon_spent
from common.privacy.ledger import PrivacyLedger
from common.privacy.units import dataset_fingerprint, group_units

# The node's evidence key (a test key: the folder is never read).
KEY = EvidenceKey(bytes(range(32)), Path("/keys/test-node"))


def records(n, prefix="u", region="eu"):
    return [
        Record(text=f"message {i} from {prefix}", region=region, user_id=f"{prefix}{i % 7}", consent=True)
        for i in range(n)
    ]


def test_ledger_persists_across_instances_and_continues(tmp_path):
    path = tmp_path / "ledger.jsonl"
    units = group_units(records(50), PrivacyUnitKind.record)
    ledger = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    fp = ledger.register(units)
    step = DpSgdSteps(1.1, 0.1, 10)
    first = ledger.charge(fp, step, budget=10, run_id="r1", round_number=1, max_grad_norm=1.0, node="n1").epsilon_after
    # A restart (new process, new object) sees the same spend and adds to it.
    again = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    assert again.spent(fp) == pytest.approx(first)
    second = again.charge(fp, step, budget=10, run_id="r2", round_number=1, max_grad_norm=1.0, node="n1").epsilon_after
    assert second > first
    assert second == pytest.approx(epsilon_spent([step, step], 1e-5))
    assert [c.run_id for c in again.history(fp)] == ["r1", "r2"]


def test_a_round_that_adds_almost_nothing_is_charged_and_epsilon_does_not_fall(tmp_path):
    # Composing with a near no-op step moves the PLD's estimate by FFT noise, here about 2e-12 downwards.
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    fp = ledger.register(group_units(records(50), PrivacyUnitKind.record))
    first = ledger.charge(
        fp, DpSgdSteps(1.0, 0.1, 17), budget=10, run_id="r", round_number=1, max_grad_norm=1.0, node="n1"
    ).epsilon_after
    almost_nothing = DpSgdSteps(1e4, 1e-6, 1)
    assert epsilon_spent([DpSgdSteps(1.0, 0.1, 17), almost_nothing], 1e-5) < first
    second = ledger.charge(
        fp, almost_nothing, budget=10, run_id="r", round_number=2, max_grad_norm=1.0, node="n1"
    ).epsilon_after
    assert second == first


def test_over_budget_round_is_refused_before_anything_is_recorded(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    fp = ledger.register(group_units(records(50), PrivacyUnitKind.record))
    big = DpSgdSteps(0.7, 0.2, 100)
    before = path.read_bytes()
    with pytest.raises(BudgetExhausted) as err:
        ledger.check_budget(fp, big, budget=2.0)
    assert "lifetime budget 2" in str(err.value) and "Nothing was trained or sent" in str(err.value)
    with pytest.raises(BudgetExhausted):
        ledger.charge(fp, big, budget=2.0, run_id="r", round_number=1, max_grad_norm=1.0, node="n1")
    assert path.read_bytes() == before
    assert ledger.spent(fp) == 0.0


def test_changed_dataset_inherits_the_spend_of_the_units_it_shares(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.user, key=KEY)
    old = group_units(records(40, "a"), PrivacyUnitKind.user)
    grown = group_units(records(40, "a") + records(10, "b"), PrivacyUnitKind.user)
    unrelated = group_units(records(40, "z"), PrivacyUnitKind.user)
    fp_old = ledger.register(old)
    ledger.charge(fp_old, DpSgdSteps(1.0, 0.2, 20), budget=10, run_id="r", round_number=1, max_grad_norm=1.0, node="n1")
    fp_grown, fp_unrelated = ledger.register(grown), ledger.register(unrelated)
    assert fp_grown != fp_old
    assert ledger.spent(fp_old) > 0
    assert ledger.spent(fp_grown) == pytest.approx(ledger.spent(fp_old))
    assert ledger.spent(fp_unrelated) == 0.0


def test_training_without_dp_leaves_infinite_epsilon_and_blocks_dp_claims(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    fp = ledger.register(group_units(records(30), PrivacyUnitKind.record))
    ledger.charge(fp, DpSgdSteps(0.0, 0.1, 5), budget=None, run_id="nodp", round_number=1, max_grad_norm=1.0, node="n1")
    assert math.isinf(ledger.spent(fp))
    with pytest.raises(BudgetExhausted):
        ledger.check_budget(fp, DpSgdSteps(5.0, 0.01, 1), budget=100)
    assert ledger.history(fp)[0].epsilon_after == math.inf


def test_delta_and_unit_are_fixed_for_a_ledger(tmp_path):
    PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    with pytest.raises(PrivacyError, match="delta=1e-05"):
        PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-4, unit=PrivacyUnitKind.record, key=KEY)
    with pytest.raises(PrivacyError, match="per record"):
        PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.user, key=KEY)


def charged_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    fp = ledger.register(group_units(records(10), PrivacyUnitKind.record))
    for r in range(3):
        ledger.charge(
            fp, DpSgdSteps(1.0, 0.1, 10), budget=10, run_id="r", round_number=r + 1, max_grad_norm=1.0, node="n1"
        )
    return path


def lower_first_charge(lines):
    # The attack that matters: make past rounds look cheaper than they were.
    entry = json.loads(lines[2])
    entry["noise_multiplier"] = 50.0
    return lines[:2] + [json.dumps(entry)] + lines[3:]


@pytest.mark.parametrize(
    "damage, where",
    [
        (lower_first_charge, "entry 3"),  # an edited charge
        (lambda lines: lines[:2] + lines[3:], "entry 3"),  # a charge removed from the middle
        (lambda lines: lines[:-2], "truncated"),  # the newest charges cut off
        (lambda lines: [], "truncated"),  # emptied
        (lambda lines: ["{not json"] + lines[1:], "entry 1"),
    ],
)
def test_tampered_or_truncated_ledger_refuses_and_is_left_as_found(tmp_path, damage, where):
    path = charged_ledger(tmp_path)
    lines = path.read_text().splitlines()
    damaged = "\n".join(damage(lines)) + ("\n" if damage(lines) else "")
    path.write_text(damaged)
    with pytest.raises(LedgerError, match="never reset the spent budget") as err:
        PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    assert where in str(err.value)
    assert path.read_text() == damaged


def test_deleted_ledger_is_detected_by_its_head(tmp_path):
    path = charged_ledger(tmp_path)
    path.unlink()
    with pytest.raises(LedgerError, match="truncated"):
        PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)


def test_user_units_group_everything_of_one_person():
    recs = records(21)  # user ids u0..u6, three records each
    units = group_units(recs, PrivacyUnitKind.user)
    assert len(units) == 7 and all(len(u.texts) == 3 for u in units)
    assert len(group_units(recs, PrivacyUnitKind.record)) == 21
    # The fingerprint ignores record order but not content.
    assert dataset_fingerprint(units, PrivacyUnitKind.user) == dataset_fingerprint(
        group_units(list(reversed(recs)), PrivacyUnitKind.user)[::-1], PrivacyUnitKind.user
    )


def rehash(lines: list[str], digest) -> list[str]:
    """Rewrite a chain the way an attacker without the key would: recompute every hash with `digest`."""
    out, prev = [], "0" * 64
    for line in lines:
        entry = json.loads(line)
        entry["prev"] = prev
        body = {k: v for k, v in entry.items() if k != "hash"}
        entry["hash"] = digest(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())
        prev = entry["hash"]
        out.append(json.dumps(entry))
    return out


@pytest.mark.parametrize(
    "digest",
    [
        lambda b: hashlib.sha256(b).hexdigest(),  # the chain's public hash, as the unkeyed ledger used
        lambda b: __import__("hmac").new(b"another key" * 3, b, hashlib.sha256).hexdigest(),  # a key of the attacker's
    ],
)
def test_a_ledger_rewritten_and_rehashed_without_the_key_is_refused(tmp_path, digest):
    path = charged_ledger(tmp_path)
    lines = lower_first_charge(path.read_text().splitlines())
    forged = rehash(lines, digest)
    path.write_text("\n".join(forged) + "\n")
    last = json.loads(forged[-1])
    (tmp_path / "ledger.jsonl.head").write_text(json.dumps({"count": len(forged), "hash": last["hash"]}))
    with pytest.raises(LedgerError, match="keyed hash|evidence key"):
        PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)


def test_charges_dropped_and_head_rewritten_are_refused(tmp_path):
    path = charged_ledger(tmp_path)
    lines = path.read_text().splitlines()[:-2]  # the newest charges dropped...
    path.write_text("\n".join(lines) + "\n")
    head = json.loads(lines[-1])["hash"]  # ...and the head moved back to the entry that is now last
    (tmp_path / "ledger.jsonl.head").write_text(json.dumps({"count": len(lines), "hash": head}))
    ledger = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    # The chain alone cannot tell a cut tail from a shorter history: the anchor kept off the node can.
    with pytest.raises(LedgerError, match="anchor recorded outside this log"):
        ledger.check_anchor(len(lines) + 2, "ab" * 32)


def test_a_deleted_and_restarted_ledger_fails_its_anchor(tmp_path):
    path = charged_ledger(tmp_path)
    old = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY).head
    path.unlink()
    (tmp_path / "ledger.jsonl.head").unlink()
    fresh = PrivacyLedger(path, delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    assert fresh.head.genesis != old.genesis  # a new first entry (random salt): the coordinator's check
    with pytest.raises(LedgerError, match="anchor"):
        fresh.check_anchor(old.entries, old.head)


def test_a_person_moved_to_another_node_keeps_their_history(tmp_path):
    """Re-sharding 2 -> 3 clients: every trained person's epsilon follows them to the node they land on."""
    from common.data.partition import client_partition

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.user, key=KEY)
    people = [Record(text=f"note {i}", region="eu", user_id=f"user{i}", consent=True) for i in range(90)]
    step = DpSgdSteps(1.0, 0.1, 20)
    for index in range(2):
        shard = group_units(client_partition(people, client_index=index, num_clients=2), PrivacyUnitKind.user)
        ledger.charge(
            ledger.register(shard),
            step,
            budget=10,
            run_id="r",
            round_number=1,
            max_grad_norm=1.0,
            node=f"eu-{index + 1}",
        )
    trained_once = epsilon_spent([step], 1e-5)
    for index in range(3):
        shard = group_units(client_partition(people, client_index=index, num_clients=3), PrivacyUnitKind.user)
        assert ledger.spent(ledger.register(shard)) == pytest.approx(trained_once)  # never an empty history
    # Exact per person: two disjoint shards trained in parallel are not added up for anyone.
    assert ledger.spent(ledger.register(group_units(people, PrivacyUnitKind.user))) == pytest.approx(trained_once)


def test_a_charge_records_what_ran_and_refuses_a_fractional_or_negative_step_count(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", delta=1e-5, unit=PrivacyUnitKind.record, key=KEY)
    fp = ledger.register(group_units(records(30), PrivacyUnitKind.record))
    for steps in (-202, 0, 2.5, True):
        with pytest.raises((LedgerError, PrivacyError)):
            ledger.charge(
                fp, DpSgdSteps(1.0, 0.1, steps), budget=10, run_id="r", round_number=1, max_grad_norm=1.0, node="n1"
            )
    assert ledger.charges() == []
    charge = ledger.charge(
        fp, DpSgdSteps(1.0, 0.1, 3), budget=10, run_id="r", round_number=1, max_grad_norm=0.5, node="n1"
    )
    assert (charge.steps, charge.max_grad_norm, charge.node) == (3, 0.5, "n1")
