"""Erasure requests: a person's records leave everything a region's nodes train on from then on.

fedsov does not own a region's source data, so it cannot delete the person's records there; what it
controls is what its nodes read. `request_erasure` records the request in the erasure register, a keyed
hash-chained log in the ledger folder (shared by the nodes that split one region's data, so a re-sharding
cannot bring the person back), and in the node's own audit log, which anchors the register's head: a
register that later goes missing or is cut stops the node instead of quietly training on the person again.
Every node drops the person's records before any cache, split or privacy unit sees them
(`client.nodedata.load_node_data`), deletes its cached copies of them, and a running node reloads its data
before its next message.

What cannot be undone is reported instead: the privacy ledger names every run that trained on a dataset
holding the person, with the rounds and the DP guarantee (epsilon at delta, per privacy unit) that covered
them. Whether to retrain from a checkpoint that predates them (`fedsov run branch`) is the operator's call.

Identifiers: the register and the audit log hold a keyed pseudonym of the user id (HMAC under a key derived
from the ledger's evidence key, `EvidenceKey.pseudonymiser`), never the id itself: the node must recognise
the person's records in future data, so it needs a deterministic function of the id, and user ids are often
guessable (e-mail addresses, customer numbers), so a plain or salted hash kept beside its salt could be
reversed by hashing candidates. With the key apart from the logs, only the node, which holds the source data
anyway, can tell whom a pseudonym stands for. The pseudonym is still personal data (pseudonymised, GDPR
Art. 4(5)); it is kept because the register must outlive the request for the exclusion to hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.settings import LEDGER_FILE, NodeFolders, NodeSettings, node_audit
from client.transfers import PERSON
from common.audit import ChainHead, EvidenceKey, HashChainLog, KeyedRegister, TamperedLog
from common.config import load_region_file
from common.errors import ConfigError, LedgerError
from common.privacy.accounting import epsilon_spent
from common.privacy.ledger import PrivacyLedger

ERASURES_FILE = "erasures.jsonl"
ERASURES_FORMAT = "fedsov-erasures/1"


class ErasureRegister(KeyedRegister):
    """The pseudonyms of the people whose erasure was requested, in the ledger folder."""

    kind = "erasures"
    format = ERASURES_FORMAT

    def __init__(self, folder: Path, key_dir: Path):
        super().__init__(Path(folder) / ERASURES_FILE)
        self.key_dir = Path(key_dir)

    def _key(self) -> EvidenceKey:
        return EvidenceKey.load(self.key_dir)  # only once there is a register: nobody erased needs no key

    def current_head(self) -> ChainHead | None:
        return self.head if self.exists() else None

    def erased(self) -> set[str]:
        """Pseudonyms of every person whose erasure was requested."""
        if not self.exists():
            return set()
        return {e["person"] for e in self.entries() if e.get("kind") == "erasure"}

    def matcher(self) -> Callable[[str], bool] | None:
        """A test for 'was this user_id erased?', or None when nobody was (no key needed then)."""
        erased = self.erased()
        if not erased:
            return None
        pseudonym = EvidenceKey.load(self.key_dir).pseudonymiser(PERSON)
        return lambda user_id: pseudonym(user_id) in erased

    def add(self, person: str, reference: str, node: str) -> tuple[bool, ChainHead]:
        """Record a request (once per person); return whether it is new, and the register's head."""
        new = person not in self.erased()
        if new:
            self.append({"kind": "erasure", "person": person, "reference": reference, "node": node})
        return new, self.head

    def damaged(self, err: TamperedLog) -> LedgerError:
        return LedgerError(
            f"The erasure register {self.path} failed its integrity check ({err}). Training is refused: people whose "
            "erasure was requested could otherwise be trained on again. Restore it (and its .head file) from a ledger "
            "backup (`fedsov ledger backup`)."
        )


def check_register(register: ErasureRegister, audit_entries: list[dict[str, Any]]) -> None:
    """A register the node's audit log anchored must still be there and still hold what it held."""
    anchored = [e for e in audit_entries if e["action"] == "erasure" and e.get("register_entries")]
    if not anchored:
        return
    if not register.exists():
        raise LedgerError(
            f"The erasure register {register.path} is missing, but this node's audit log records {len(anchored)} "
            "erasure request(s). Training is refused: restore the register (and its .head file) from a ledger backup."
        )
    register.check_anchor(int(anchored[-1]["register_entries"]), str(anchored[-1]["register_head"]))


@dataclass
class RunTrained:
    """One run that trained on data holding the person, as the ledger recorded it."""

    run: str  # the run directory's name (the coordinator's run id without its session)
    sessions: list[str]
    rounds: list[int]
    nodes: list[str]
    first_recorded: str
    last_recorded: str
    epsilon: float  # this run's steps on the person's data alone, at the ledger's delta

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "epsilon": _number(self.epsilon)}


@dataclass
class ErasureReport:
    person: str  # the pseudonym
    new: bool
    unit: str
    delta: float
    runs: list[RunTrained] = field(default_factory=list)
    lifetime_epsilon: float = 0.0  # every charge on the person's data, composed
    undetermined_runs: list[str] = field(default_factory=list)
    caches_deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "runs": [r.as_dict() for r in self.runs],
            "lifetime_epsilon": _number(self.lifetime_epsilon),
        }

    def lines(self) -> list[str]:
        head = (
            f"Erasure request recorded for person {self.person[:12]}"
            if self.new
            else f"Erasure of person {self.person[:12]} was already recorded"
        )
        out = [f"{head}: their records are left out of everything this region's nodes train on from now on."]
        if self.caches_deleted:
            out.append(f"  deleted {self.caches_deleted} cached file(s) holding this node's filtered records")
        if not self.runs and not self.undetermined_runs:
            out.append("  no run trained on their data (the ledger holds no charge on a dataset with them)")
        unit = "each of their records" if self.unit == "record" else "them as a whole"
        for r in self.runs:
            first = min(r.rounds)
            before = (
                f"its checkpoints up to round {first - 1} predate them"
                if first > 1
                else "none of its checkpoints predates them"
            )
            out.append(
                f"  run {r.run}: trained on their data in round(s) {_ranges(r.rounds)} on {', '.join(r.nodes)} "
                f"({r.first_recorded[:10]} to {r.last_recorded[:10]}); its adapters and checkpoints from round "
                f"{first} on include them, protected at epsilon {r.epsilon:.3g}, delta {self.delta:g} for "
                f"{unit}; {before}"
            )
        if self.runs:
            out.append(
                f"  all runs together: epsilon {self.lifetime_epsilon:.3g} at delta {self.delta:g} for {unit}"
                + (" (a person with k records: up to k times that, by group privacy)" if self.unit == "record" else "")
            )
            out.append(
                "  To retrain without them: `fedsov run branch <run_dir> --round <a round before the first "
                "above>` on the coordinator, then resume the branch; or train a new run from round 0."
            )
        if self.undetermined_runs:
            out.append(
                f"  MAY include them (datasets registered before the ledger kept people): runs "
                f"{', '.join(self.undetermined_runs)}; treat them as including the person"
            )
        return out


def request_erasure(folders: NodeFolders | NodeSettings, user_id: str, reference: str) -> ErasureReport:
    """Record the request, drop this node's cached copies, log it, and report the runs that trained on the person."""
    if not user_id.strip():
        raise ConfigError("--user is empty: give the user_id the person's records carry.")
    if not reference.strip():
        raise ConfigError("--reference is empty: name the request (e.g. your ticket number), for the audit log.")
    policy = load_region_file(folders.policy_file).policy
    audit = node_audit(folders)
    ledger_path = folders.ledger_dir / LEDGER_FILE
    if not HashChainLog.files_exist(ledger_path):
        raise LedgerError(
            f"No privacy ledger at {ledger_path}: this node has never started with this state and ledger folder. "
            "Check --state-dir and --ledger-dir (the same as `fedsov node start`'s)."
        )
    key = EvidenceKey.load(folders.ledger_key_dir)
    ledger = PrivacyLedger(ledger_path, delta=policy.privacy.delta, unit=policy.privacy.unit, key=key)
    person = key.pseudonymiser(PERSON)(user_id)
    register = ErasureRegister(folders.ledger_dir, folders.ledger_key_dir)
    check_register(register, audit.entries())
    new, head = register.add(person, reference, folders.name)
    caches = sorted((folders.state_dir / "cache").glob("data-use-*.json"))
    for cache in caches:
        cache.unlink()
    report = trained_on(ledger, user_id, person, new)
    report.caches_deleted = len(caches)
    audit.record(
        "erasure",
        "recorded" if new else "repeated",
        reason=f"request {reference}: person {person[:12]} left out of training from now on; "
        f"{len(report.runs)} run(s) trained on them",
        person=person,
        reference=reference,
        register_entries=head.entries,
        register_head=head.head,
        report=report.as_dict(),
    )
    return report


def trained_on(ledger: PrivacyLedger, user_id: str, person: str, new: bool) -> ErasureReport:
    """The runs whose charges touched a dataset holding the person, with the epsilon that covered them."""
    charges, unknown = ledger.person_history(user_id)
    by_run: dict[str, list] = {}
    for c in charges:
        by_run.setdefault(c.run_id.split("#")[0], []).append(c)
    runs = [
        RunTrained(
            run=run,
            sessions=sorted({c.run_id for c in cs}),
            rounds=sorted({c.round for c in cs}),
            nodes=sorted({c.node for c in cs}),
            first_recorded=cs[0].recorded_at,
            last_recorded=cs[-1].recorded_at,
            epsilon=epsilon_spent([c.dp_steps for c in cs], ledger.delta),
        )
        for run, cs in by_run.items()
    ]
    undetermined = sorted({c.run_id.split("#")[0] for c in ledger.charges() if c.dataset in unknown} - set(by_run))
    return ErasureReport(
        person=person,
        new=new,
        unit=ledger.unit.value,
        delta=ledger.delta,
        runs=runs,
        lifetime_epsilon=epsilon_spent([c.dp_steps for c in charges], ledger.delta),
        undetermined_runs=undetermined,
    )


def _ranges(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _number(x: float) -> float | str:
    return "inf" if math.isinf(x) else x
