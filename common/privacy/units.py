"""Privacy units: what one DP-SGD example stands for (a record, or everything of one user)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from common.config import PrivacyUnitKind
from common.data.records import Record


@dataclass(frozen=True)
class PrivacyUnit:
    """One sampled, clipped unit of DP-SGD: `texts` are trained on together."""

    user_id: str
    texts: tuple[str, ...]

    def digest(self, salt: bytes) -> str:
        """Salted identity of the unit, so a ledger can spot the same unit in another dataset."""
        h = hashlib.sha256(salt)
        h.update(json.dumps([self.user_id, list(self.texts)], ensure_ascii=False).encode())
        return h.hexdigest()[:32]


def group_units(records: Sequence[Record], kind: PrivacyUnitKind) -> list[PrivacyUnit]:
    """One unit per record, or one per user_id holding all of that user's records in order."""
    if kind == PrivacyUnitKind.record:
        return [PrivacyUnit(r.user_id, (r.text,)) for r in records]
    by_user: dict[str, list[str]] = {}
    for r in records:
        by_user.setdefault(r.user_id, []).append(r.text)
    return [PrivacyUnit(user, tuple(texts)) for user, texts in sorted(by_user.items())]


def dataset_fingerprint(units: Sequence[PrivacyUnit], kind: PrivacyUnitKind) -> str:
    """Content hash of a training set, independent of file layout and record order."""
    unit_hashes = sorted(u.digest(b"") for u in units)
    h = hashlib.sha256(kind.value.encode())
    for d in unit_hashes:
        h.update(d.encode())
    return h.hexdigest()
