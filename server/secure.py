"""The coordinator's side of secure aggregation: stages 2-4 over the Message API.

Stage 1 rides on the round's train/evaluate message (its reply carries the public keys).
Anything short of the threshold, or an inconsistent reply, raises SecAggError: the caller
skips the round and keeps the global adapter; a wrong sum is never produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from common.secagg.crypto import SecAggError
from common.secagg.protocol import Payload, ServerAggregation
from common.wire import SECAGG

# (node ids, message type, per-node content builder, timeout) -> replies (as in Coordinator._exchange)
Exchange = Callable[[Iterable[int], str, Callable[[int], object], float], list]


@dataclass
class SecureSumResult:
    total: Payload
    survivors: list[int]
    dropped: list[int]


def threshold_for(n_clients: int, fraction: float) -> int:
    return max(2, math.ceil(fraction * n_clients))


def secure_sum(
    exchange: Exchange,
    category: str,
    tag: bytes,
    keys: Mapping[int, tuple[bytes, bytes]],
    threshold: int,
    mask_content: Mapping[str, object],
    n_data: int,
    n_metrics: int,
    timeout: float,
) -> SecureSumResult:
    """Run stages 2-4 with the clients that advertised `keys`; return the unmasked sum."""
    from flwr.app import ConfigRecord, RecordDict

    if len(keys) < threshold:
        raise SecAggError(f"{len(keys)} clients sent keys; the threshold is {threshold}.")
    aggregation = ServerAggregation(tag, threshold)
    aggregation.keys = dict(keys)
    ids, c_pks, s_pks = aggregation.key_lists()
    key_content = ConfigRecord({"node-ids": ids, "c-pks": c_pks, "s-pks": s_pks, "threshold": threshold})

    for reply in exchange(ids, f"{category}.secagg_shares", lambda _: RecordDict({SECAGG: key_content}), timeout):
        if reply.ok:
            c = reply.content[SECAGG]
            aggregation.add_shares(
                reply.node_id, dict(zip((int(r) for r in c["receivers"]), c["ciphertexts"])), c["commitment"]
            )
    shared = sorted(aggregation.commitments)
    if len(shared) < threshold:
        raise SecAggError(f"Only {len(shared)} clients shared their keys; the threshold is {threshold}.")

    def mask_request(node: int):
        senders, blobs = aggregation.inbound_for(node)
        return RecordDict({SECAGG: ConfigRecord({**mask_content, "senders": senders, "ciphertexts": blobs})})

    masked = {}
    for reply in exchange(shared, f"{category}.secagg_mask", mask_request, timeout):
        if reply.ok:
            masked[reply.node_id] = Payload.from_bytes(reply.content[SECAGG]["masked"], n_data, n_metrics)
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(masked))
    if len(survivors) < threshold:
        raise SecAggError(
            f"{len(dropped)} of {len(shared)} clients dropped before sending their masked input; "
            f"{len(survivors)} left, fewer than the threshold {threshold}."
        )
    lists = ConfigRecord({"survivors": survivors, "dropped": dropped})
    shares = {}
    for reply in exchange(survivors, f"{category}.secagg_unmask", lambda _: RecordDict({SECAGG: lists}), timeout):
        if reply.ok:
            c = reply.content[SECAGG]
            shares[reply.node_id] = dict(zip((int(o) for o in c["owners"]), c["shares"]))
    return SecureSumResult(aggregation.unmask(masked, shares), survivors, dropped)
