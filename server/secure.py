"""The coordinator's side of secure aggregation: stages 2-5 over the Message API.

Stage 1 rides on the round's train/evaluate message (its reply carries the signed public keys).
Anything short of the threshold, or an inconsistent reply, raises SecAggError: the caller skips the
round and keeps the global adapter; a wrong sum is never produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.secagg.crypto import SecAggError
from common.secagg.encoding import metric_length
from common.secagg.protocol import Advert, Payload, ServerAggregation, minimum_threshold
from common.wire import SECAGG

# (node ids, message type, per-node content builder, timeout) -> replies (as in Coordinator._exchange)
Exchange = Callable[[Iterable[int], str, Callable[[int], object], float], list]


@dataclass
class SecureSumResult:
    total: Payload
    survivors: list[int]
    dropped: list[int]
    slots: list[str]  # every metric slot of the aggregation, in vector order
    revealed: list[str]  # the slots whose sums were unmasked (not a slot left with one survivor)


def threshold_for(n_clients: int, fraction: float, min_cohort: int = 2) -> int:
    """At least `fraction` of the clients, and never less than every node itself accepts."""
    return max(math.ceil(fraction * n_clients), minimum_threshold(n_clients, min_cohort))


@dataclass
class SecureRound:
    """One secure sum's public inputs: who advertised which signed keys, their regions, the plan."""

    category: str  # train | evaluate
    tag: bytes
    adverts: Mapping[int, Advert]
    regions: Mapping[int, str]
    threshold: int
    plan_digest: str
    params: dict[str, Any]  # what the transcript binds: layout with shapes, clip range, levels (train)
    n_data: int
    timeout: float


def secure_sum(exchange: Exchange, r: SecureRound) -> SecureSumResult:
    """Run stages 2-5 with the clients that advertised keys; return the unmasked sum."""
    from flwr.app import ConfigRecord, RecordDict

    if len(r.adverts) < r.threshold:
        raise SecAggError(f"{len(r.adverts)} clients sent keys; the threshold is {r.threshold}.")
    agg = ServerAggregation(r.tag, r.threshold, r.plan_digest, {n: r.regions[n] for n in r.adverts}, dict(r.adverts))
    ids = sorted(agg.adverts)
    a = [agg.adverts[n] for n in ids]
    key_list = ConfigRecord(
        {
            "node-ids": ids,
            "names": [x.name for x in a],
            "c-pks": [x.c_pk for x in a],
            "s-pks": [x.s_pk for x in a],
            "signatures": [x.signature for x in a],
            "threshold": r.threshold,
        }
    )
    for reply in exchange(ids, f"{r.category}.secagg_shares", lambda _: RecordDict({SECAGG: key_list}), r.timeout):
        if reply.ok:
            c = reply.content[SECAGG]
            # A node's reply: if its columns differ in length, the receivers left out make add_shares refuse
            # it by name (a ValueError from zip would not say which node or why).
            receivers = (int(x) for x in c["receivers"])
            agg.add_shares(reply.node_id, dict(zip(receivers, c["ciphertexts"], strict=False)), c["commitment"])
    shared = sorted(agg.commitments)
    if len(shared) < r.threshold:
        raise SecAggError(f"Only {len(shared)} clients shared their keys; the threshold is {r.threshold}.")

    agg.set_params(r.params)
    slots = agg.slots()
    request = {k: v for k, v in r.params.items() if k != "layout"}
    if "layout" in r.params:
        request["layout"] = [name for name, _ in r.params["layout"]]

    def mask_request(node: int):
        senders, blobs = agg.inbound_for(node)
        return RecordDict({SECAGG: ConfigRecord({**request, "senders": senders, "ciphertexts": blobs})})

    masked = {}
    n_metrics = metric_length(r.category, slots)
    for reply in exchange(shared, f"{r.category}.secagg_mask", mask_request, r.timeout):
        if reply.ok:
            masked[reply.node_id] = Payload.from_bytes(reply.content[SECAGG]["masked"], r.n_data, n_metrics)
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(masked))
    if len(survivors) < r.threshold:
        raise SecAggError(
            f"{len(dropped)} of {len(shared)} clients dropped before sending their masked input; "
            f"{len(survivors)} left, fewer than the threshold {r.threshold}."
        )
    signatures = _confirm(exchange, r, survivors)
    unmask = ConfigRecord(
        {
            "survivors": survivors,
            "dropped": dropped,
            "signers": sorted(signatures),
            "signatures": [signatures[n] for n in sorted(signatures)],
        }
    )
    shares = {}
    for reply in exchange(
        sorted(signatures), f"{r.category}.secagg_unmask", lambda _: RecordDict({SECAGG: unmask}), r.timeout
    ):
        if reply.ok:
            c = reply.content[SECAGG]
            # As above: owners left out by a short column count as shares not returned (unmask names them).
            shares[reply.node_id] = dict(zip((int(o) for o in c["owners"]), c["shares"], strict=False))
    total, revealed = agg.unmask(masked, shares)
    return SecureSumResult(total, survivors, dropped, slots, revealed)


def _confirm(exchange: Exchange, r: SecureRound, survivors: list[int]) -> dict[int, bytes]:
    """Stage 4: every survivor signs the survivor set; unmasking needs at least t signatures on it."""
    from flwr.app import ConfigRecord, RecordDict

    request = ConfigRecord({"survivors": survivors})
    signatures = {}
    for reply in exchange(
        survivors, f"{r.category}.secagg_confirm", lambda _: RecordDict({SECAGG: request}), r.timeout
    ):
        if reply.ok:
            signatures[reply.node_id] = reply.content[SECAGG]["signature"]
    if len(signatures) < r.threshold:
        raise SecAggError(
            f"Only {len(signatures)} survivors confirmed the survivor set; the threshold is {r.threshold}."
        )
    return signatures
