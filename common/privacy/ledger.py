"""The privacy ledger: the durable record of the epsilon each person's data has spent.

A keyed hash-chained log (see common.audit) kept with the data, not with one node: the nodes
that split one region's data share one ledger, so a person moved to another node by a
re-sharding keeps their history. It lists the datasets trained on (by content fingerprint,
with salted digests of their privacy units) and every round charged against them, with the
steps, sampling rate, noise and clip norm that actually ran. A person's epsilon composes the
charges of every dataset holding their unit; a dataset's epsilon is the largest over its
people, so retraining the same data, or data that grew, shrank or moved between nodes,
continues from the spent budget instead of starting from zero. Like Opacus's accountants,
the ledger keeps the history and derives epsilon from it; the history is the source of truth.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.audit import EvidenceKey, KeyedRegister, TamperedLog
from common.errors import BudgetExhausted, LedgerError, PrivacyError
from common.policy import PrivacyUnitKind
from common.privacy.accounting import MONOTONE_SLACK, DpSgdSteps, epsilon_spent
from common.privacy.units import PrivacyUnit, dataset_fingerprint, person_digest

LEDGER_FORMAT = "fedsov-privacy-ledger/2"


@dataclass(frozen=True)
class RoundCharge:
    """One federated round's DP-SGD steps on one dataset, as they ran, and the epsilon after it."""

    dataset: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    node: str
    epsilon_after: float
    recorded_at: str

    @property
    def dp_steps(self) -> DpSgdSteps:
        return DpSgdSteps(self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger(KeyedRegister):
    """The node's ledger, stored as a keyed hash-chained log: every read verifies it first."""

    kind = "ledger"
    format = LEDGER_FORMAT

    def __init__(self, path: Path | str, *, delta: float, unit: PrivacyUnitKind, key: EvidenceKey):
        super().__init__(path)
        self.delta = delta
        self.unit = unit
        self._evidence_key = key
        if not self.exists():
            with self._guard():
                self.chain.append(self.header())
        self._check_settings(self._state())

    def _key(self) -> EvidenceKey:
        return self._evidence_key

    def header(self) -> dict[str, Any]:
        return {**super().header(), "delta": self.delta, "unit": self.unit.value, "salt": secrets.token_hex(16)}

    def damaged(self, err: TamperedLog) -> LedgerError:
        return LedgerError(
            f"Privacy ledger {self.path} failed its integrity check ({err}). Training is refused: a tampered "
            "or truncated ledger must never reset the spent budget. Restore the ledger and its .head file "
            "from a backup."
        )

    def charges(self) -> list[RoundCharge]:
        """Every charge in this ledger, in the order it was recorded."""
        return list(self._state()["charges"])

    def rounds_charged(self, run_id: str, node: str) -> list[int]:
        """The rounds of run `run_id` that `node` charged to this ledger, oldest first."""
        return [c.round for c in self._state()["charges"] if c.run_id == run_id and c.node == node]

    # -- queries -----------------------------------------------------------------------
    def datasets(self) -> list[str]:
        """Fingerprints of every dataset this ledger has seen, oldest first."""
        return list(self._state()["datasets"])

    def register(self, units: Sequence[PrivacyUnit]) -> str:
        """Record a training set (if new) and return its fingerprint."""
        fingerprint = dataset_fingerprint(units, self.unit)
        state = self._state()
        if fingerprint not in state["datasets"]:
            salt = bytes.fromhex(state["salt"])
            entry = {
                "kind": "dataset",
                "fingerprint": fingerprint,
                "units": len(units),
                "unit_digests": sorted({u.digest(salt) for u in units}),
            }
            if self.unit != PrivacyUnitKind.user:
                # Record digests cannot tell whose records they are once the text changed: keep who, for erasures.
                entry["people"] = sorted({person_digest(u.user_id, salt) for u in units})
            self.append(entry)
        return fingerprint

    def person_history(self, user_id: str) -> tuple[list[RoundCharge], list[str]]:
        """The charges on datasets that held this person's data, oldest first; and the datasets that cannot tell
        (record-unit datasets registered before the ledger kept people), whose charges may include them."""
        state = self._state()
        digest = person_digest(user_id, bytes.fromhex(state["salt"]))
        holding, unknown = set(), []
        for fingerprint, dataset in state["datasets"].items():
            people = dataset["unit_digests"] if state["unit"] == PrivacyUnitKind.user.value else dataset["people"]
            if people is None:
                unknown.append(fingerprint)
            elif digest in people:
                holding.add(fingerprint)
        return [c for c in state["charges"] if c.dataset in holding], unknown

    def history(self, fingerprint: str) -> list[RoundCharge]:
        """Every charge that touched a unit of this dataset, oldest first."""
        state = self._state()
        related = set().union(*self._unit_histories(state, fingerprint)) if fingerprint in state["datasets"] else set()
        return [c for c in state["charges"] if c.dataset in related]

    def spent(self, fingerprint: str) -> float:
        return self._epsilon(self._state(), fingerprint, None)

    def projected(self, fingerprint: str, planned: DpSgdSteps) -> float:
        """Epsilon after the planned steps, were they to run now."""
        return self._epsilon(self._state(), fingerprint, planned)

    def check_budget(self, fingerprint: str, planned: DpSgdSteps, budget: float) -> float:
        """Return the projected epsilon, or raise BudgetExhausted before anything trains."""
        spent = self.spent(fingerprint)
        projected = self.projected(fingerprint, planned)
        if projected > budget:
            raise BudgetExhausted(
                f"Privacy budget exhausted for dataset {fingerprint[:12]}: this round "
                f"({planned.steps} steps, q={planned.sample_rate:.4g}, sigma={planned.noise_multiplier:.3g}) "
                f"would take epsilon from {spent:.3f} to {projected:.3f} at delta={self.delta:g}, "
                f"over the lifetime budget {budget:g} (ledger {self.path}). Nothing was trained or sent. "
                "To continue: raise the region's policy.privacy.epsilon_budget if your law allows it, train on "
                "new data, or lower the spend per round (fewer steps, smaller batch, more noise)."
            )
        return projected

    # -- the one write that matters -----------------------------------------------------
    def charge(
        self,
        fingerprint: str,
        ran: DpSgdSteps,
        *,
        budget: float | None,
        run_id: str,
        round_number: int,
        max_grad_norm: float,
        node: str,
    ) -> RoundCharge:
        """Durably record the steps that ran (not the ones planned), re-checking the budget first.

        budget=None records training without DP (noise 0): it is never refused here, but
        it leaves the dataset with infinite epsilon, so later DP runs on it are refused.
        """
        if isinstance(ran.steps, bool) or not isinstance(ran.steps, int) or ran.steps < 1:
            raise LedgerError(f"A charge must be a whole number of steps >= 1, not {ran.steps!r}.")
        made: list[RoundCharge] = []

        def entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
            state = self._replay(entries)
            if fingerprint not in state["datasets"]:
                raise LedgerError(
                    f"Dataset {fingerprint[:12]} is not registered in ledger {self.path}; register it before charging."
                )
            before = self._epsilon(state, fingerprint, None)
            epsilon = self._epsilon(state, fingerprint, ran)
            if epsilon < before * (1 - MONOTONE_SLACK):  # composition only adds: a larger fall is a broken accountant
                raise LedgerError(f"Accounting error: epsilon would fall from {before} to {epsilon}; refusing.")
            # Both are upper bounds on this history's epsilon; the larger keeps the recorded epsilons from falling.
            epsilon = max(epsilon, before)
            if budget is not None and epsilon > budget:
                raise BudgetExhausted(
                    f"Privacy budget exhausted for dataset {fingerprint[:12]}: epsilon would reach "
                    f"{epsilon:.3f} > budget {budget:g} at delta={self.delta:g} (ledger {self.path})."
                )
            made.append(
                RoundCharge(
                    dataset=fingerprint,
                    run_id=run_id,
                    round=round_number,
                    noise_multiplier=ran.noise_multiplier,
                    sample_rate=ran.sample_rate,
                    steps=ran.steps,
                    max_grad_norm=max_grad_norm,
                    node=node,
                    epsilon_after=epsilon,
                    recorded_at=_now(),
                )
            )
            return {"kind": "charge", **asdict(made[0])}

        self.append(entry)
        return made[0]

    # -- storage ------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return self._replay(self.entries())

    def _replay(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if not entries or entries[0].get("kind") != "ledger" or entries[0].get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{self.path} is not a fedsov privacy ledger ({LEDGER_FORMAT}); restore the right file.")
        head = entries[0]
        state: dict[str, Any] = {
            "delta": head["delta"],
            "unit": head["unit"],
            "salt": head["salt"],
            "datasets": {},
            "charges": [],
        }
        for e in entries[1:]:
            if e.get("kind") == "dataset":
                state["datasets"][e["fingerprint"]] = {
                    "units": e["units"],
                    "unit_digests": e["unit_digests"],
                    "people": e.get("people"),
                }
            elif e.get("kind") == "charge":
                try:
                    state["charges"].append(RoundCharge(**{k: e[k] for k in RoundCharge.__dataclass_fields__}))
                except KeyError as err:
                    raise LedgerError(
                        f"{self.path}: charge entry {e.get('seq')} lacks {err}; restore the ledger."
                    ) from err
        return state

    @staticmethod
    def _unit_histories(state: dict[str, Any], fingerprint: str) -> set[frozenset[str]]:
        """The distinct sets of datasets that this dataset's units belong to (one set per kind of person)."""
        holders: dict[str, set[str]] = {}
        mine = set(state["datasets"][fingerprint]["unit_digests"])
        for fp, ds in state["datasets"].items():
            for digest in mine.intersection(ds["unit_digests"]):
                holders.setdefault(digest, set()).add(fp)
        return {frozenset(h) for h in holders.values()}

    def _epsilon(self, state: dict[str, Any], fingerprint: str, planned: DpSgdSteps | None) -> float:
        """The largest epsilon of any person in the dataset, after `planned` steps on the whole dataset."""
        extra = [planned] if planned is not None else []
        if fingerprint not in state["datasets"]:
            return epsilon_spent(extra, self.delta)
        worst = 0.0
        for datasets in self._unit_histories(state, fingerprint):
            past = [c.dp_steps for c in state["charges"] if c.dataset in datasets]
            worst = max(worst, epsilon_spent(past + extra, self.delta))
        return worst

    def _check_settings(self, state: dict[str, Any]) -> None:
        if state["delta"] != self.delta:
            raise PrivacyError(
                f"Ledger {self.path} accounts at delta={state['delta']:g}, but the policy now asks for "
                f"delta={self.delta:g}. Delta cannot change for a ledger (it would restate the epsilon already "
                f"spent). Set the region's policy.privacy.delta back to {state['delta']:g}."
            )
        if state["unit"] != self.unit.value:
            raise PrivacyError(
                f"Ledger {self.path} accounts per {state['unit']}, but the policy now asks for privacy unit "
                f"'{self.unit.value}'. The unit cannot change for data already charged. Set the region's "
                f"policy.privacy.unit back to {state['unit']}, or use a separate node state folder for new data."
            )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
