"""Privacy units: what one DP-SGD example stands for (a record, or everything of one user)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from common.data.records import Record
from common.policy import PrivacyUnitKind


@dataclass(frozen=True)
class PrivacyUnit:
    """One sampled, clipped unit of DP-SGD: `texts` are trained on together."""

    kind: PrivacyUnitKind
    user_id: str
    texts: tuple[str, ...]

    def digest(self, salt: bytes) -> str:
        """Salted identity, so a ledger can spot the same unit in another dataset.

        A user is the same unit whatever records they have; a record is its user and text.
        """
        identity = [self.user_id] if self.kind == PrivacyUnitKind.user else [self.user_id, *self.texts]
        return _digest(salt, identity)


def person_digest(user_id: str, salt: bytes) -> str:
    """Salted identity of a person: equal to the digest of their unit when the unit is a user."""
    return _digest(salt, [user_id])


def group_units(records: Sequence[Record], kind: PrivacyUnitKind) -> list[PrivacyUnit]:
    """One unit per record, or one per user_id holding all of that user's records in order."""
    if kind == PrivacyUnitKind.record:
        return [PrivacyUnit(kind, r.user_id, (r.text,)) for r in records]
    by_user: dict[str, list[str]] = {}
    for r in records:
        by_user.setdefault(r.user_id, []).append(r.text)
    return [PrivacyUnit(kind, user, tuple(texts)) for user, texts in sorted(by_user.items())]


def dataset_fingerprint(units: Sequence[PrivacyUnit], kind: PrivacyUnitKind) -> str:
    """Content hash of a training set, independent of file layout and record order."""
    records = sorted(_digest(b"", [u.user_id, text]) for u in units for text in u.texts)
    h = hashlib.sha256(kind.value.encode())
    for d in records:
        h.update(d.encode())
    return h.hexdigest()


def _digest(salt: bytes, parts: list[str]) -> str:
    h = hashlib.sha256(salt)
    h.update(json.dumps(parts, ensure_ascii=False).encode())
    return h.hexdigest()[:32]
