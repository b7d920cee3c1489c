"""Splitting a region's records by user: held-out evaluation users, and one share per client.

Splits hash the user_id, so one person's records always land together and the assignment is stable
across runs, machines and data order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from common.data.records import Record


def unit_bucket(user_id: str, salt: str) -> float:
    """Map (salt, user_id) to a stable number in [0, 1) via sha256."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    # 53 bits fit a float exactly, so the result can never round up to 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def split_heldout(
    records: Iterable[Record], *, fraction: float, salt: str = "heldout"
) -> tuple[list[Record], list[Record]]:
    """Return (train, heldout) with about `fraction` of the users held out, all of a user's records together."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f"held-out fraction must be in [0, 1), got {fraction}; set data.heldout_fraction to "
            f"e.g. 0.1 (0 keeps every user for training)."
        )
    train: list[Record] = []
    heldout: list[Record] = []
    for r in records:
        (heldout if unit_bucket(r.user_id, salt) < fraction else train).append(r)
    return train, heldout


def client_partition(
    records: Iterable[Record], *, client_index: int, num_clients: int, salt: str = "client"
) -> list[Record]:
    """The records of client `client_index` of `num_clients`; every user belongs to exactly one client."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}; set the region's clients to at least 1.")
    if not 0 <= client_index < num_clients:
        raise ValueError(
            f"client_index must be in [0, {num_clients}) for {num_clients} clients, got "
            f"{client_index}; number clients 0..{num_clients - 1}."
        )
    # min() guards the product rounding up to num_clients for buckets within one ulp of 1.
    return [r for r in records if min(int(unit_bucket(r.user_id, salt) * num_clients), num_clients - 1) == client_index]
