"""Retention rules applied to folders: what has outlived a region's limit is deleted, each deletion logged.

A folder's age is the newest modification time of anything in it, i.e. when it was last written: checkpoints
and backups are written once, so that is when they were made. Shared by the node (ledger backups,
`client.retention`) and the coordinator (checkpoints, `server.retention`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.audit import AuditLog
from common.errors import RetentionError

DAY = 86400.0


@dataclass(frozen=True)
class Due:
    """A folder a retention rule says must go."""

    path: Path
    kind: str  # what it is, e.g. "checkpoint", "ledger backup"
    age_days: float
    limit_days: int
    rule: str  # the rule in the policy's words, e.g. "eu (GDPR): retention.checkpoint_days = 30"

    def describe(self) -> str:
        return f"{self.kind} {self.path}: {self.age_days:.1f} days old, over the {self.limit_days} days of {self.rule}"


def age_days(folder: Path, now: float) -> float:
    """Days since anything in `folder` (or the folder itself) was last written."""
    newest = max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.rglob("*")])
    return max(0.0, (now - newest) / DAY)


def due(folders: Iterable[Path], kind: str, limit_days: int, rule: str, now: float | None = None) -> list[Due]:
    """The folders older than `limit_days`, oldest first."""
    now = time.time() if now is None else now
    aged = [(age_days(f, now), f) for f in folders]
    return [Due(f, kind, age, limit_days, rule) for age, f in sorted(aged, reverse=True) if age > limit_days]


def delete(items: Iterable[Due], audit: AuditLog) -> None:
    """Delete each folder, then record it in `audit`; a folder that cannot be deleted stops the pass, naming it."""
    audit.entries()  # a damaged audit log stops the pass before anything is deleted unrecorded
    for item in items:
        try:
            shutil.rmtree(item.path)
        except FileNotFoundError:
            continue  # a node sharing the ledger folder deleted it first, and logged it
        except OSError as err:
            raise RetentionError(
                f"Retention: could not delete {item.describe()} ({err}). Fix the folder's permissions "
                "(or remove it yourself) and run `fedsov retention enforce` again."
            ) from err
        audit.record(
            "retention",
            "deleted",
            reason=item.describe(),
            path=str(item.path),
            kind=item.kind,
            age_days=round(item.age_days, 2),
            limit_days=item.limit_days,
        )
