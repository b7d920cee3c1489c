"""Append-only, keyed hash-chained JSONL logs: the audit log, and the storage of the privacy ledger.

Every entry carries `prev` (the previous entry's hash) and `hash`, an HMAC-SHA256 of the entry's
canonical JSON (without `hash`) under the log owner's evidence key, so editing, reordering or
removing an entry breaks the chain at that entry, and nobody without the key can rewrite the
chain and re-hash it. A sidecar `<file>.head` records the entry count and last hash after every
append, so cutting entries off the end is detected too. The key lives apart from the logs (a
key folder, mode 0700, file mode 0600); what the chain cannot show by itself (the whole log and
head deleted or rolled back together) is caught by anchors: heads the node reports in its
replies, which the coordinator keeps and checks in the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import FedsovError

GENESIS = "0" * 64
KEY_FILE = "evidence.key"


class TamperedLog(FedsovError):
    """A hash-chained log was edited, reordered or truncated."""


class EvidenceKeyError(FedsovError):
    """The secret that keys a log's chain is missing, unreadable or not the one the log was written with."""


@dataclass(frozen=True)
class EvidenceKey:
    """The secret keying a log's chain, and where it lives (apart from the logs)."""

    secret: bytes
    folder: Path

    @property
    def key_id(self) -> str:
        """A public name for the key (a hash of it), recorded in every entry to tell 'wrong key' from 'edited'."""
        return hashlib.sha256(b"fedsov-evidence-key-id|" + self.secret).hexdigest()[:16]

    def pseudonymiser(self, purpose: str) -> Callable[[str], str]:
        """A keyed pseudonym for identifiers (e.g. user ids) under this key, separate per purpose.

        User ids are often guessable (an e-mail address, a customer number): a plain or salted hash
        stored beside its salt is reversed by hashing candidates. Keyed with this secret, which lives
        apart from the logs, only the holder of the key (the node, which holds the data anyway) can
        match an id to its pseudonym.
        """
        derived = hmac.new(self.secret, b"fedsov-pseudonym|" + purpose.encode(), hashlib.sha256).digest()
        return lambda identifier: hmac.new(derived, identifier.encode(), hashlib.sha256).hexdigest()[:32]

    @classmethod
    def load(cls, folder: Path | str) -> EvidenceKey:
        folder = Path(folder).expanduser()
        path = folder / KEY_FILE
        try:
            secret = bytes.fromhex(path.read_text().strip())
        except FileNotFoundError as err:
            raise EvidenceKeyError(
                f"No evidence key at {path}. The logs keyed with it cannot be verified or extended without it: "
                "restore the key folder from its backup (a new key would make the old evidence unverifiable)."
            ) from err
        except (OSError, ValueError) as err:
            raise EvidenceKeyError(
                f"The evidence key {path} is unreadable ({err}); restore it from its backup."
            ) from err
        if len(secret) != 32:
            raise EvidenceKeyError(f"The evidence key {path} is not 32 bytes; restore it from its backup.")
        return cls(secret, folder)

    @classmethod
    def load_or_create(cls, folder: Path | str, *, logs: tuple[Path, ...] = ()) -> EvidenceKey:
        """The key in `folder`; a new one only while none of `logs` exists yet (else it would reset them)."""
        folder = Path(folder).expanduser()
        if (folder / KEY_FILE).exists() or any(HashChainLog.files_exist(p) for p in logs):
            return cls.load(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        secret = secrets.token_bytes(32)
        fd = os.open(folder / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return cls(secret, folder)


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


def entry_hash(entry: dict[str, Any], key: EvidenceKey) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    message = json.dumps(body, sort_keys=True, ensure_ascii=False).encode()
    return hmac.new(key.secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainHead:
    """Where a log stands: its first and last hashes and its length. Anchors are heads kept elsewhere."""

    genesis: str
    entries: int
    head: str

    def text(self) -> str:
        return f"{self.entries}:{self.head}"


class HashChainLog:
    def __init__(self, path: Path | str, key: EvidenceKey):
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.key = key
        # The last (count, hash) this object read or wrote: a log rolled back, deleted or replaced under a
        # running process (say, a node kept warm between messages) is caught at its next read.
        self._seen: tuple[int, str] | None = None

    @staticmethod
    def files_exist(path: Path | str) -> bool:
        path = Path(path)
        return path.exists() or path.with_name(path.name + ".head").exists()

    def exists(self) -> bool:
        return self.files_exist(self.path)

    def chain_head(self) -> ChainHead:
        entries = self.entries()
        if not entries:
            return ChainHead(GENESIS, 0, GENESIS)
        return ChainHead(entries[0]["hash"], len(entries), entries[-1]["hash"])

    def check_anchor(self, entries_count: int, head: str) -> None:
        """Raise TamperedLog unless entry `entries_count` of this log has hash `head` (an anchor kept elsewhere)."""
        entries = self.entries()
        if entries_count > len(entries):
            raise _tampered(
                len(entries) + 1,
                f"an anchor recorded outside this log (by the coordinator or the node's audit log) records "
                f"{entries_count} entries, "
                f"the log holds {len(entries)} (it was cut or replaced)",
            )
        if entries_count > 0 and entries[entries_count - 1]["hash"] != head:
            raise _tampered(entries_count, "entry does not match the anchor recorded outside this log (rewritten)")

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
            entry = {"seq": len(entries) + 1, "time": _now(), **fields, "key_id": self.key.key_id, "prev": prev}
            entry["hash"] = entry_hash(entry, self.key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._write_head(entry["seq"], entry["hash"])
            self._seen = (entry["seq"], entry["hash"])
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
            if entry.get("key_id") != self.key.key_id:
                raise _tampered(
                    number,
                    f"it was written under evidence key {entry.get('key_id')}, not under this "
                    f"key ({self.key.key_id} in {self.key.folder}): wrong key folder, or a forgery",
                )
            if not hmac.compare_digest(str(entry.get("hash")), entry_hash(entry, self.key)):
                raise _tampered(number, "its content does not match its keyed hash (it was edited)")
            prev = entry["hash"]
            entries.append(entry)
        head = self._read_head()
        if head is None:
            if entries:
                raise _tampered(len(entries), f"the head file {self.head_path.name} is missing")
        elif head["count"] > len(entries):
            raise _tampered(
                len(entries) + 1,
                f"the log ends at entry {len(entries)} but its head records {head['count']} (truncated)",
            )
        elif head["count"] < len(entries) - 1 or (
            head["count"] > 0 and entries[head["count"] - 1]["hash"] != head["hash"]
        ):
            raise _tampered(max(head["count"], 1), "the head does not match the chain")
        elif head["count"] == len(entries) - 1:
            # Crash between appending an entry and moving the head: the entry is chained, keep it.
            self._write_head(len(entries), entries[-1]["hash"])
        if self._seen is not None:
            count, last = self._seen
            if count > len(entries) or (count and entries[count - 1]["hash"] != last):
                raise _tampered(
                    min(count, len(entries) + 1),
                    f"the log changed under this process: it had {count} "
                    f"entries, it now has {len(entries)} that do not extend them (rolled back or replaced)",
                )
        self._seen = (len(entries), entries[-1]["hash"]) if entries else None
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
            # key_dir only says where the key is, for `fedsov audit verify`; it proves nothing.
            json.dump({"count": count, "hash": last_hash, "key_dir": str(self.key.folder)}, f)
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


def key_dir_hint(path: Path | str) -> Path | None:
    """The key folder a log's head file names (for verification tools), if any."""
    head = Path(path).with_name(Path(path).name + ".head")
    try:
        hint = json.loads(head.read_text()).get("key_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(hint) if isinstance(hint, str) and hint else None


class KeyedRegister:
    """A keyed log whose first entry names its kind and format, and whose every integrity failure becomes one
    domain error saying what is refused and how to restore it: the privacy ledger and the ledger folder's
    registers (erasures, transfer scope) are all this."""

    kind = ""
    format = ""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._chain: HashChainLog | None = None

    def _key(self) -> EvidenceKey:
        raise NotImplementedError

    def damaged(self, err: TamperedLog) -> FedsovError:
        raise NotImplementedError

    def header(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format}

    def exists(self) -> bool:
        return HashChainLog.files_exist(self.path)

    @property
    def chain(self) -> HashChainLog:
        # One object per register: it remembers the last head it saw, so a rollback under it is caught.
        if self._chain is None:
            self._chain = HashChainLog(self.path, self._key())
        return self._chain

    @property
    def head(self) -> ChainHead:
        with self._guard():
            return self.chain.chain_head()

    def check_anchor(self, entries: int, head: str) -> None:
        with self._guard():
            self.chain.check_anchor(entries, head)

    def entries(self) -> list[dict[str, Any]]:
        with self._guard():
            entries = self.chain.entries()
            if entries and (entries[0].get("kind") != self.kind or entries[0].get("format") != self.format):
                raise _tampered(1, f"it is not a {self.kind} log ({self.format}): the wrong file is in its place")
        return entries

    def append(self, fields: dict[str, Any] | Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
        """Append one entry (writing the header first into a new log)."""
        with self._guard():
            if not self.chain.exists():
                self.chain.append(self.header())
            return self.chain.append(fields)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except TamperedLog as err:
            raise self.damaged(err) from err


def open_log(path: Path | str, key_dir: Path | str | None = None) -> HashChainLog:
    """A log with its key, from `key_dir` or the folder its head names (for verification tools and tests)."""
    folder = key_dir or key_dir_hint(path)
    if folder is None:
        raise EvidenceKeyError(f"{path}: no key folder given and its .head file names none; pass --key-dir.")
    return HashChainLog(path, EvidenceKey.load(folder))


class AuditLog:
    """Who decided what, when and why: one per node and one per coordinator run."""

    def __init__(self, path: Path | str, actor: str, key: EvidenceKey):
        self.chain = HashChainLog(path, key)
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
