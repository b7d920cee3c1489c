"""The privacy ledger: each node's durable record of the epsilon its data has spent.

A hash-chained log on the node's own disk (see common.audit). It lists the datasets the node trained on (by content
fingerprint, with salted digests of their privacy units) and every round charged against
them. A dataset's epsilon composes the charges of every dataset that shares a unit with it,
so retraining the same data, or data that grew or changed a little, continues from the
spent budget instead of starting from zero. Like Opacus's accountants, the ledger keeps the
history and derives epsilon from it; the history, not an epsilon, is the source of truth.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from common.audit import HashChainLog, TamperedLog
from common.errors import BudgetExhausted, LedgerError, PrivacyError
from common.policy import PrivacyUnitKind
from common.privacy.accounting import DpSgdSteps, epsilon_spent
from common.privacy.units import PrivacyUnit, dataset_fingerprint

LEDGER_FORMAT = "fedsov-privacy-ledger/1"


@dataclass(frozen=True)
class RoundCharge:
    """One federated round's DP-SGD steps on one dataset, and the epsilon after it."""

    dataset: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    recorded_at: str

    @property
    def dp_steps(self) -> DpSgdSteps:
        return DpSgdSteps(self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """The node's ledger, stored as a hash-chained log: every read verifies it first."""

    def __init__(self, path: Path | str, *, delta: float, unit: PrivacyUnitKind):
        self.path = Path(path)
        self.delta = delta
        self.unit = unit
        self._log = HashChainLog(self.path)
        if not self._log.exists():
            self._log.append({"kind": "ledger", "format": LEDGER_FORMAT, "delta": delta, "unit": unit.value,
                              "salt": secrets.token_hex(16)})
        self._check_settings(self._state())

    @property
    def head(self) -> tuple[int, str]:
        """(entries, last hash): what an audit log records to witness the ledger's length."""
        entries = self._entries()
        return len(entries), entries[-1]["hash"]

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
            self._log.append({"kind": "dataset", "fingerprint": fingerprint, "units": len(units),
                              "unit_digests": sorted({u.digest(salt) for u in units})})
        return fingerprint

    def history(self, fingerprint: str) -> list[RoundCharge]:
        """Every charge that touched a unit of this dataset, oldest first."""
        return self._history(self._state(), fingerprint)

    def spent(self, fingerprint: str) -> float:
        return epsilon_spent([c.dp_steps for c in self.history(fingerprint)], self.delta)

    def projected(self, fingerprint: str, planned: DpSgdSteps) -> float:
        """Epsilon after the planned steps, were they to run now."""
        past = [c.dp_steps for c in self.history(fingerprint)]
        return epsilon_spent(past + [planned], self.delta)

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
        self, fingerprint: str, planned: DpSgdSteps, *, budget: float | None, run_id: str, round_number: int
    ) -> RoundCharge:
        """Durably record a round's steps, re-checking the budget first.

        budget=None records training without DP (noise 0): it is never refused here, but
        it leaves the dataset with infinite epsilon, so later DP runs on it are refused.
        """
        made: list[RoundCharge] = []

        def entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
            state = self._replay(entries)
            if fingerprint not in state["datasets"]:
                raise LedgerError(
                    f"Dataset {fingerprint[:12]} is not registered in ledger {self.path}; register it before charging."
                )
            past = [c.dp_steps for c in self._history(state, fingerprint)]
            epsilon = epsilon_spent(past + [planned], self.delta)
            if budget is not None and epsilon > budget:
                raise BudgetExhausted(
                    f"Privacy budget exhausted for dataset {fingerprint[:12]}: epsilon would reach "
                    f"{epsilon:.3f} > budget {budget:g} at delta={self.delta:g} (ledger {self.path})."
                )
            made.append(RoundCharge(
                dataset=fingerprint,
                run_id=run_id,
                round=round_number,
                noise_multiplier=planned.noise_multiplier,
                sample_rate=planned.sample_rate,
                steps=planned.steps,
                epsilon_after=epsilon,
                recorded_at=_now(),
            ))
            return {"kind": "charge", **asdict(made[0])}

        try:
            self._log.append(entry)
        except TamperedLog as err:
            raise self._damaged(err) from err
        return made[0]

    # -- storage ------------------------------------------------------------------------
    def _entries(self) -> list[dict[str, Any]]:
        try:
            return self._log.entries()
        except TamperedLog as err:
            raise self._damaged(err) from err

    def _damaged(self, err: TamperedLog) -> LedgerError:
        return LedgerError(
            f"Privacy ledger {self.path} failed its integrity check ({err}). Training is refused: a tampered "
            "or truncated ledger must never reset the spent budget. Restore the ledger and its .head file "
            "from a backup."
        )

    def _state(self) -> dict[str, Any]:
        return self._replay(self._entries())

    def _replay(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if not entries or entries[0].get("kind") != "ledger" or entries[0].get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{self.path} is not a fedsov privacy ledger ({LEDGER_FORMAT}); restore the right file.")
        head = entries[0]
        state: dict[str, Any] = {"delta": head["delta"], "unit": head["unit"], "salt": head["salt"],
                                 "datasets": {}, "charges": []}
        for e in entries[1:]:
            if e.get("kind") == "dataset":
                state["datasets"][e["fingerprint"]] = {"units": e["units"], "unit_digests": e["unit_digests"]}
            elif e.get("kind") == "charge":
                state["charges"].append(RoundCharge(**{k: e[k] for k in RoundCharge.__dataclass_fields__}))
        return state

    def _history(self, state: dict[str, Any], fingerprint: str) -> list[RoundCharge]:
        datasets = state["datasets"]
        if fingerprint not in datasets:
            return []
        mine = set(datasets[fingerprint]["unit_digests"])
        related = {
            fp for fp, ds in datasets.items() if fp == fingerprint or mine.intersection(ds["unit_digests"])
        }
        return [c for c in state["charges"] if c.dataset in related]

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
