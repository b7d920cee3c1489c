"""Who may take part in secure aggregation: long-term node identities and the federation roster.

Each node has an Ed25519 identity key in its key folder and signs its per-round secure-aggregation
keys with it. The roster lists every node of the federation (name, region, identity public key); each
region's operator installs it in their nodes' config, so the coordinator cannot add a fake peer or
swap a node's keys. Operators compare the roster's fingerprint out of band (`fedsov roster show`):
nodes whose rosters differ cannot complete a round, because the peers' regions are part of the
round's transcript.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import ConfigError
from common.secagg.crypto import SecAggError

IDENTITY_FILE = "identity.key"
ROSTER_FORMAT = "fedsov-roster/1"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class RosterEntry:
    name: str
    region: str
    public_key: bytes  # raw Ed25519, 32 bytes


class Identity:
    """A node's long-term signing key (kept in its key folder, mode 0600)."""

    def __init__(self, private: Ed25519PrivateKey, folder: Path):
        self._private = private
        self.folder = folder

    @classmethod
    def load_or_create(cls, folder: Path | str) -> Identity:
        folder = Path(folder).expanduser()
        path = folder / IDENTITY_FILE
        if path.exists():
            try:
                return cls(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(path.read_text().strip())), folder)
            except ValueError as err:
                raise ConfigError(
                    f"The node identity key {path} is unreadable ({err}); restore it from its backup."
                ) from err
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        private = Ed25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this node made it first
            return cls.load_or_create(folder)
        with os.fdopen(fd, "w") as f:
            f.write(raw.hex() + "\n")
        return cls(private, folder)

    @property
    def public_key(self) -> bytes:
        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


class Roster:
    """The federation's nodes as every region's operator installed them."""

    def __init__(self, entries: Iterable[RosterEntry]):
        self.entries: dict[str, RosterEntry] = {}
        for entry in entries:
            if entry.name in self.entries:
                raise ConfigError(f"The roster lists node '{entry.name}' twice; each node appears once.")
            self.entries[entry.name] = entry
        keys = [e.public_key for e in self.entries.values()]
        if len(set(keys)) != len(keys):
            raise ConfigError("The roster gives two nodes the same identity key; each node has its own.")

    @classmethod
    def load(cls, path: Path | str) -> Roster:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(
                f"No federation roster at {path}. Secure aggregation needs the list of nodes the regions trust: "
                "create it with `fedsov roster add` and install the same file on every node."
            ) from err
        except (OSError, ValueError) as err:
            raise ConfigError(f"The roster {path} is unreadable ({err}); reinstall it.") from err
        if not isinstance(raw, dict) or raw.get("format") != ROSTER_FORMAT or not isinstance(raw.get("nodes"), list):
            raise ConfigError(f"{path} is not a fedsov roster ({ROSTER_FORMAT}); reinstall it.")
        return cls(_entry(path, i, item) for i, item in enumerate(raw["nodes"]))

    def save(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": ROSTER_FORMAT,
            "nodes": [
                {"name": e.name, "region": e.region, "identity": e.public_key.hex()}
                for e in sorted(self.entries.values(), key=lambda e: e.name)
            ],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)

    def fingerprint(self) -> str:
        canonical = json.dumps(sorted((e.name, e.region, e.public_key.hex()) for e in self.entries.values()))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def entry(self, name: str) -> RosterEntry:
        if name not in self.entries:
            raise SecAggError(f"Node '{name}' is not in this node's federation roster: its keys cannot be trusted.")
        return self.entries[name]

    def verify(self, name: str, message: bytes, signature: bytes) -> RosterEntry:
        """The roster entry of `name`, if `signature` on `message` is its identity's; else SecAggError."""
        entry = self.entry(name)
        try:
            Ed25519PublicKey.from_public_bytes(entry.public_key).verify(signature, message)
        except (InvalidSignature, ValueError) as err:
            raise SecAggError(f"A signature claimed by node '{name}' does not verify against its roster key.") from err
        return entry


def _entry(path: Path, index: int, item: object) -> RosterEntry:
    if not isinstance(item, dict) or set(item) != {"name", "region", "identity"}:
        raise ConfigError(f"{path}: nodes[{index}] must have exactly name, region and identity.")
    name, region, identity = str(item["name"]), str(item["region"]), str(item["identity"])
    if not NAME.fullmatch(name) or not NAME.fullmatch(region):
        raise ConfigError(
            f"{path}: nodes[{index}]: name and region must be short identifiers (got {name!r}, {region!r})."
        )
    try:
        key = bytes.fromhex(identity)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{path}: nodes[{index}] ({name}): identity must be a 32-byte Ed25519 key in hex.")
    return RosterEntry(name, region, key)


def add_to_roster(path: Path | str, name: str, region: str, public_key: bytes) -> Roster:
    """Add (or confirm) a node in the roster file at `path`, under a lock; a changed key is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        roster = Roster.load(path) if path.exists() else Roster([])
        current = roster.entries.get(name)
        if current is not None:
            if (current.region, current.public_key) != (region, public_key):
                raise ConfigError(
                    f"The roster {path} already lists node '{name}' with another region or identity key. A node's "
                    "identity never changes silently: remove the old entry by hand if the node was really replaced."
                )
            return roster
        roster = Roster([*roster.entries.values(), RosterEntry(name, region, public_key)])
        roster.save(path)
        return roster
