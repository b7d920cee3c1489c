"""How many people a region's transfers abroad have covered in the counting period, kept where it cannot be
edited quietly.

Volume rules (China's 2024 Provisions: `transfers.volume_rules` in a policy) set the safeguard a transfer needs
by the number of people whose personal information went abroad since 1 January (or in the last 12 months), not
by one run's data. So each time a node releases something derived from its data to a coordinator outside the
policy's domestic jurisdictions, it adds the people that release covered to this register, and every check
counts the union of the period's entries and the node's current people: the same person trained in five
rounds and three runs counts once, and people trained on in March still count in November.

Where the count lives: a keyed hash-chained log (common.audit) in the ledger folder, which the nodes that split
one region's data share (their people add up, as they do for the handler the law counts), keyed with the
ledger's evidence key; every append's head goes into the appending node's own audit log, and a node refuses to
start when its audit log anchors a register that is missing, cut or rewritten. Chosen over a plain JSON count,
which could neither be unioned nor protected from a quiet edit. People are stored as keyed pseudonyms
(`EvidenceKey.pseudonymiser`), never as user ids.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.audit import EvidenceKey, KeyedRegister, TamperedLog
from common.errors import LedgerError
from common.policy import CountingPeriod, RegionPolicy, SafeguardDecision, VolumeRules, transfer_safeguard

SCOPE_FILE = "transfer-scope.jsonl"
SCOPE_FORMAT = "fedsov-transfer-scope/1"
PERSON = "person"  # the pseudonym purpose shared by the ledger folder's registers (this one and erasures)


class TransferScope(KeyedRegister):
    """The people earlier releases to cross-border coordinators covered, by date."""

    kind = "transfer-scope"
    format = SCOPE_FORMAT

    def __init__(self, folder: Path, key: EvidenceKey):
        super().__init__(Path(folder) / SCOPE_FILE)
        self._evidence_key = key
        self.pseudonym = key.pseudonymiser(PERSON)

    def _key(self) -> EvidenceKey:
        return self._evidence_key

    def in_period(self, rules: VolumeRules, on: datetime.date) -> tuple[set[str], set[str]]:
        """Pseudonyms of the people, and of the people with sensitive data, recorded in the period ending `on`."""
        return _covered(self.entries() if self.exists() else [], rules, on)

    def record(
        self,
        people: Iterable[str],
        sensitive: Iterable[str],
        *,
        rules: VolumeRules,
        on: datetime.date,
        details: dict[str, Any],
    ) -> tuple[int, int]:
        """Add the people (pseudonyms) the period does not hold yet; return how many people and sensitive were new."""
        known, known_sensitive = self.in_period(rules, on)
        if known.issuperset(people) and known_sensitive.issuperset(sensitive):
            return 0, 0
        counted: list[tuple[int, int]] = []

        def entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
            known, known_sensitive = _covered(entries, rules, on)
            new = sorted(set(people) - known)
            new_sensitive = sorted(set(sensitive) - known_sensitive)
            counted.append((len(new), len(new_sensitive)))
            return {"kind": "transfer", "date": on.isoformat(), **details, "people": new, "sensitive": new_sensitive}

        self.append(entry)
        return counted[0]

    def damaged(self, err: TamperedLog) -> LedgerError:
        return LedgerError(
            f"The transfer-scope register {self.path} failed its integrity check ({err}). Transfers abroad are "
            "refused: without it the people already sent abroad this period cannot be counted. Restore it (and its "
            ".head file) from a ledger backup (`fedsov ledger backup`)."
        )


class TransferVolume:
    """A node's people, counted with the period's earlier releases, against its policy's volume rules."""

    def __init__(self, policy: RegionPolicy, jurisdiction: str, scope: TransferScope):
        self.policy, self.jurisdiction, self.scope = policy, jurisdiction, scope
        rules = policy.transfers.volume_rules
        # Only a cross-border destination under volume rules needs counts; elsewhere the rules alone decide.
        self.rules = rules if rules is not None and jurisdiction not in rules.domestic_jurisdictions else None
        self._people: tuple[object, frozenset[str], frozenset[str]] | None = None

    def decision(
        self, people: Iterable[str], sensitive: Iterable[str], on: datetime.date | None = None
    ) -> SafeguardDecision:
        """The safeguard needed for a release covering these people (user ids), and whether it is recorded."""
        on = on or today()
        if self.rules is None:
            return transfer_safeguard(self.policy, self.jurisdiction, 0, 0, on)
        mine, mine_sensitive = self._pseudonyms(people, sensitive)
        recorded, recorded_sensitive = self.scope.in_period(self.rules, on)
        return transfer_safeguard(
            self.policy, self.jurisdiction, len(recorded | mine), len(recorded_sensitive | mine_sensitive), on
        )

    def record(
        self, people: Iterable[str], sensitive: Iterable[str], details: dict[str, Any]
    ) -> tuple[SafeguardDecision, int, int]:
        """Before a release leaves: the decision on the period's count, and (if allowed) the people added to it."""
        on = today()
        decision = self.decision(people, sensitive, on)
        if self.rules is None or not decision.allowed:
            return decision, 0, 0
        added = self.scope.record(*self._pseudonyms(people, sensitive), rules=self.rules, on=on, details=details)
        return (decision, *added)

    def _pseudonyms(self, people, sensitive) -> tuple[frozenset[str], frozenset[str]]:
        if self._people is None or self._people[0] is not people:  # computed once per loaded dataset
            self._people = (
                people,
                frozenset(map(self.scope.pseudonym, people)),
                frozenset(map(self.scope.pseudonym, sensitive)),
            )
        return self._people[1], self._people[2]


def today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


def check_scope(scope: TransferScope, audit_entries: list[dict[str, Any]]) -> None:
    """A register the node's audit log anchored must still be there and still hold what it held."""
    anchored = [e for e in audit_entries if e["action"] == "transfer_scope"]
    if not anchored:
        return
    if not scope.exists():
        raise LedgerError(
            f"The transfer-scope register {scope.path} is missing, but this node's audit log records {len(anchored)} "
            "release(s) abroad counted in it. The node refuses to start, as it could no longer count the people "
            "already sent abroad: restore the register (and its .head file) from a ledger backup (`fedsov ledger "
            "backup`)."
        )
    scope.check_anchor(int(anchored[-1]["scope_entries"]), str(anchored[-1]["scope_head"]))


def _covered(entries: list[dict[str, Any]], rules: VolumeRules, on: datetime.date) -> tuple[set[str], set[str]]:
    start = period_start(rules.counting_period, on)
    people: set[str] = set()
    sensitive: set[str] = set()
    for e in entries:
        if e.get("kind") == "transfer" and start <= datetime.date.fromisoformat(e["date"]) <= on:
            people.update(e["people"])
            sensitive.update(e["sensitive"])
    return people, sensitive


def period_start(period: CountingPeriod, on: datetime.date) -> datetime.date:
    """The first day of the counting period that ends on `on`."""
    if period == CountingPeriod.calendar_year:
        return datetime.date(on.year, 1, 1)
    # Twelve months back, the day after: 29 February falls back to the 28th.
    day = min(on.day, 28) if on.month == 2 else on.day
    return on.replace(year=on.year - 1, day=day) + datetime.timedelta(days=1)
