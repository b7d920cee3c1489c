"""Append-only, hash-chained JSONL logs: the audit log, and the storage of the privacy ledger.

Every entry carries `prev` (the previous entry's hash) and `hash` (SHA-256 of the entry's
canonical JSON without `hash`), so editing, reordering or removing an entry breaks the chain
at that entry. A sidecar `<file>.head` records the entry count and last hash after every
append, so cutting entries off the end is detected too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from common.errors import FedsovError

GENESIS = "0" * 64


class TamperedLog(FedsovError):
    """A hash-chained log was edited, reordered or truncated."""


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    first_bad: int | None  # 1-based entry (line) number of the first entry that fails
    problem: str

    def describe(self, path: Path) -> str:
        if self.ok:
            return f"{path}: OK, {self.entries} entries, hash chain and head intact"
        return f"{path}: TAMPERED at entry {self.first_bad}: {self.problem}"


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class HashChainLog:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    def exists(self) -> bool:
        return self.path.exists() or self.head_path.exists()

    def append(self, fields: dict[str, Any] | Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
        """Verify the chain, then add one entry (durably) and move the head.

        `fields` may be a function of the verified entries, computed under the lock (so a
        check-then-write such as a budget check cannot race another process).
        """
        with self._locked():
            entries = self._read_verified()
            if callable(fields):
                fields = fields(entries)
            prev = entries[-1]["hash"] if entries else GENESIS
            entry = {"seq": len(entries) + 1, "time": _now(), **fields, "prev": prev}
            entry["hash"] = entry_hash(entry)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._write_head(entry["seq"], entry["hash"])
            return entry

    def entries(self) -> list[dict[str, Any]]:
        """All entries, after verifying the chain and the head; raises TamperedLog otherwise."""
        with self._locked():
            return self._read_verified()

    def verify(self) -> Verification:
        try:
            entries = self.entries()
        except TamperedLog as err:
            return Verification(False, 0, getattr(err, "entry", None), str(err))
        return Verification(True, len(entries), None, "")

    def _read_verified(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        prev = GENESIS
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise _tampered(number, f"not valid JSON ({err})") from err
            if entry.get("seq") != number:
                raise _tampered(number, f"sequence number {entry.get('seq')} where {number} was expected")
            if entry.get("prev") != prev:
                raise _tampered(number, "it does not chain to the entry before it (an entry was removed or reordered)")
            if entry.get("hash") != entry_hash(entry):
                raise _tampered(number, "its content does not match its hash (it was edited)")
            prev = entry["hash"]
            entries.append(entry)
        head = self._read_head()
        if head is None:
            if entries:
                raise _tampered(len(entries), f"the head file {self.head_path.name} is missing")
        elif head["count"] > len(entries):
            raise _tampered(
                len(entries) + 1, f"the log ends at entry {len(entries)} but its head records {head['count']} (truncated)"
            )
        elif head["count"] < len(entries) - 1 or (head["count"] > 0 and entries[head["count"] - 1]["hash"] != head["hash"]):
            raise _tampered(max(head["count"], 1), "the head does not match the chain")
        elif head["count"] == len(entries) - 1:
            # Crash between appending an entry and moving the head: the entry is chained, keep it.
            self._write_head(len(entries), entries[-1]["hash"])
        return entries

    def _read_head(self) -> dict[str, Any] | None:
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text())
            return {"count": int(head["count"]), "hash": str(head["hash"])}
        except (ValueError, KeyError, TypeError) as err:
            raise _tampered(0, f"the head file {self.head_path.name} is unreadable ({err})") from err

    def _write_head(self, count: int, last_hash: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".head-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"count": count, "hash": last_hash}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _tampered(entry: int, problem: str) -> TamperedLog:
    err = TamperedLog(f"entry {entry}: {problem}")
    err.entry = entry  # type: ignore[attr-defined]
    return err


class AuditLog:
    """Who decided what, when and why: one per node and one per coordinator run."""

    def __init__(self, path: Path | str, actor: str):
        self.chain = HashChainLog(path)
        self.actor = actor

    @property
    def path(self) -> Path:
        return self.chain.path

    def record(
        self,
        action: str,
        decision: str,
        *,
        reason: str,
        round: int | None = None,
        policy_hash: str | None = None,
        bytes_sent: int = 0,
        epsilon: float | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        return self.chain.append(
            {
                "actor": self.actor,
                "round": round,
                "action": action,
                "decision": decision,
                "reason": reason,
                "policy_hash": policy_hash,
                "bytes_sent": bytes_sent,
                "epsilon": None if epsilon is None else (epsilon if epsilon != float("inf") else "inf"),
                **details,
            }
        )

    def entries(self) -> list[dict[str, Any]]:
        return self.chain.entries()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
