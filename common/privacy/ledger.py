"""The privacy ledger: each node's durable record of the epsilon its data has spent.

One JSON file on the node's own disk. It lists the datasets the node trained on (by content
fingerprint, with salted digests of their privacy units) and every round charged against
them. A dataset's epsilon composes the charges of every dataset that shares a unit with it,
so retraining the same data, or data that grew or changed a little, continues from the
spent budget instead of starting from zero. Like Opacus's accountants, the ledger keeps the
history and derives epsilon from it; the history, not an epsilon, is the source of truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from common.config import PrivacyUnitKind
from common.errors import BudgetExhausted, LedgerError, PrivacyError
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
    """Read-modify-write access to one ledger file, under an exclusive file lock."""

    def __init__(self, path: Path | str, *, delta: float, unit: PrivacyUnitKind):
        self.path = Path(path)
        self.delta = delta
        self.unit = unit
        with self._locked() as state:
            self._check_settings(state)

    # -- queries -----------------------------------------------------------------------
    def register(self, units: Sequence[PrivacyUnit]) -> str:
        """Record a training set (if new) and return its fingerprint."""
        fingerprint = dataset_fingerprint(units, self.unit)
        with self._locked(write=True) as state:
            if fingerprint not in state["datasets"]:
                salt = bytes.fromhex(state["salt"])
                state["datasets"][fingerprint] = {
                    "units": len(units),
                    "registered_at": _now(),
                    "unit_digests": sorted({u.digest(salt) for u in units}),
                }
        return fingerprint

    def history(self, fingerprint: str) -> list[RoundCharge]:
        """Every charge that touched a unit of this dataset, oldest first."""
        with self._locked() as state:
            return self._history(state, fingerprint)

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
                "To continue: raise privacy.epsilon_budget if your policy allows it, train on new "
                "data, or lower the spend per round (fewer steps, smaller batch, more noise)."
            )
        return projected

    # -- the one write that matters -----------------------------------------------------
    def charge(
        self, fingerprint: str, planned: DpSgdSteps, *, budget: float | None, run_id: str, round_number: int
    ) -> RoundCharge:
        """Durably record a round's steps, re-checking the budget under the lock.

        budget=None records training without DP (noise 0): it is never refused here, but
        it leaves the dataset with infinite epsilon, so later DP runs on it are refused.
        """
        with self._locked(write=True) as state:
            if fingerprint not in state["datasets"]:
                raise LedgerError(
                    f"Dataset {fingerprint[:12]} is not registered in ledger {self.path}; "
                    "register it before charging."
                )
            past = [c.dp_steps for c in self._history(state, fingerprint)]
            epsilon = epsilon_spent(past + [planned], self.delta)
            if budget is not None and epsilon > budget:
                raise BudgetExhausted(
                    f"Privacy budget exhausted for dataset {fingerprint[:12]}: epsilon would reach "
                    f"{epsilon:.3f} > budget {budget:g} at delta={self.delta:g} (ledger {self.path})."
                )
            charge = RoundCharge(
                dataset=fingerprint,
                run_id=run_id,
                round=round_number,
                noise_multiplier=planned.noise_multiplier,
                sample_rate=planned.sample_rate,
                steps=planned.steps,
                epsilon_after=epsilon,
                recorded_at=_now(),
            )
            state["charges"].append(asdict(charge))
        return charge

    # -- storage ------------------------------------------------------------------------
    def _history(self, state: dict[str, Any], fingerprint: str) -> list[RoundCharge]:
        datasets = state["datasets"]
        if fingerprint not in datasets:
            return []
        mine = set(datasets[fingerprint]["unit_digests"])
        related = {
            fp for fp, ds in datasets.items() if fp == fingerprint or mine.intersection(ds["unit_digests"])
        }
        return [RoundCharge(**c) for c in state["charges"] if c["dataset"] in related]

    def _check_settings(self, state: dict[str, Any]) -> None:
        if state["delta"] != self.delta:
            raise PrivacyError(
                f"Ledger {self.path} accounts at delta={state['delta']:g}, but this run asks for "
                f"delta={self.delta:g}. Delta cannot change for a ledger (it would restate the epsilon "
                f"already spent). Use privacy.delta={state['delta']:g}."
            )
        if state["unit"] != self.unit.value:
            raise PrivacyError(
                f"Ledger {self.path} accounts per {state['unit']}, but this run asks for privacy unit "
                f"'{self.unit.value}'. The unit cannot change for data already charged. Use "
                f"privacy.unit={state['unit']}, or a separate node state folder for a new dataset."
            )

    @contextlib.contextmanager
    def _locked(self, write: bool = False) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._load()
                yield state
                if write or not self.path.exists():
                    self._store(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {
                "format": LEDGER_FORMAT,
                "delta": self.delta,
                "unit": self.unit.value,
                "salt": secrets.token_hex(16),
                "datasets": {},
                "charges": [],
            }
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            if state.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format is {state.get('format')!r}, expected {LEDGER_FORMAT!r}")
            for key in ("delta", "unit", "salt", "datasets", "charges"):
                if key not in state:
                    raise ValueError(f"missing '{key}'")
            for charge in state["charges"]:
                RoundCharge(**charge)
        except (OSError, ValueError, TypeError) as err:
            raise LedgerError(
                f"Privacy ledger {self.path} is unreadable or damaged ({err}). Training is refused: "
                "a damaged ledger must never reset the spent budget. Restore the file from a backup."
            ) from err
        return state

    def _store(self, state: dict[str, Any]) -> None:
        # Write-then-rename with fsync: a crash leaves the old ledger or the new one, never half.
        fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
