"""A node's side of secure aggregation across Flower messages.

Between messages the session and what will be summed live in the node's Flower context state (in
simulation and deployment alike, later messages may run in another process). Every stage's request
is checked by one schema before the protocol (common.secagg.protocol) sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from common.schema import Blob, Float, Int, Items, Text, check_record
from common.secagg.encoding import MIN_LEVELS, Quantization, flatten, metric_vector
from common.secagg.identity import NAME, SIGNATURE_BYTES, Identity, Roster
from common.secagg.protocol import Advert, ClientSession, Payload
from common.wire import MAX_PEERS

if TYPE_CHECKING:
    import torch

SESSION = "fedsov-secagg-session"
UPDATE = "fedsov-secagg-update"
CONTRIBUTION = "fedsov-secagg-contribution"

NODE_ID = Int(0, 2**64 - 1)
NODES = Items(NODE_ID, max_items=MAX_PEERS, distinct=True)
KEY = Blob(size=32)
SIGNATURE = Blob(size=SIGNATURE_BYTES)
SHARES_FIELDS = {
    "node-ids": NODES,
    "names": Items(Text(64, NAME.pattern), max_items=MAX_PEERS, distinct=True),
    "c-pks": Items(KEY, max_items=MAX_PEERS),
    "s-pks": Items(KEY, max_items=MAX_PEERS),
    "signatures": Items(SIGNATURE, max_items=MAX_PEERS),
    "threshold": Int(2, MAX_PEERS),
}
INBOUND_FIELDS = {"senders": NODES, "ciphertexts": Items(Blob(max_size=16 + 32 + 32 * 65 + 28), max_items=MAX_PEERS)}
TRAIN_MASK_FIELDS = {
    **INBOUND_FIELDS,
    "layout": Items(Text(512, r"[A-Za-z0-9_.-]+"), max_items=1 << 16, min_items=1, distinct=True),
    "clip-range": Float(0.0, 1e6, open_lo=True),
    "levels": Int(MIN_LEVELS, 2**32 - 1),
}
CONFIRM_FIELDS = {"survivors": NODES}
UNMASK_FIELDS = {
    "survivors": NODES,
    "dropped": NODES,
    "signers": NODES,
    "signatures": Items(SIGNATURE, max_items=MAX_PEERS),
}


def begin(
    state,
    tag: bytes,
    node_id: int,
    kind: str,
    identity: Identity,
    name: str,
    plan_digest: str,
    values: Mapping[str, float],
    update: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Keep what this node will contribute, start a session, return its signed public keys."""
    from flwr.app import ConfigRecord

    clear(state)
    session = ClientSession.start(tag, node_id, name, plan_digest)
    state[SESSION] = ConfigRecord(session.to_record())
    state[CONTRIBUTION] = ConfigRecord({"kind": kind, **{k: float(v) for k, v in values.items()}})
    if update is not None:
        from common.wire import state_to_record

        state[UPDATE] = state_to_record(update)
    advert = session.advert(identity)
    return {"c-pk": advert.c_pk, "s-pk": advert.s_pk, "name": advert.name, "signature": advert.signature}


def share(state, content, roster: Roster, min_cohort: int) -> dict:
    c = check_record(content, SHARES_FIELDS, "key list")
    if not len(c["node-ids"]) == len(c["names"]) == len(c["c-pks"]) == len(c["s-pks"]) == len(c["signatures"]):
        raise _error("The key list's columns have different lengths.")
    adverts = [
        Advert(*row) for row in zip(c["node-ids"], c["names"], c["c-pks"], c["s-pks"], c["signatures"], strict=True)
    ]
    session = _session(state)
    encrypted, commitment = session.share(adverts, c["threshold"], roster, min_cohort)
    _save(state, session)
    receivers = sorted(encrypted)
    return {"receivers": receivers, "ciphertexts": [encrypted[r] for r in receivers], "commitment": commitment}


def mask(state, content) -> dict:
    """Quantise this node's contribution into the layout the coordinator set, and mask it."""
    session = _session(state)
    contribution = state[CONTRIBUTION]
    kind = str(contribution["kind"])
    values = {k: float(v) for k, v in contribution.items() if k != "kind"}
    data, counter, params = np.zeros(0, dtype=np.uint32), 1, {}  # evaluation: metrics only, counting clients
    if kind == "train":
        c = check_record(content, TRAIN_MASK_FIELDS, "mask request")
        # numpy straight from the record: the masking stage never needs torch.
        update = {name: array.numpy() for name, array in state[UPDATE].items()}
        if set(c["layout"]) != set(update):
            raise _error("The aggregation layout names other tensors than this node's update.")
        layout = [(n, tuple(update[n].shape)) for n in c["layout"]]
        quantization = Quantization(c["clip-range"], c["levels"])
        data, counter = quantization.encode(flatten(update, layout), int(values["units"]))  # counter: clipped values
        params = {
            "layout": [[n, list(shape)] for n, shape in layout],
            "clip-range": c["clip-range"],
            "levels": c["levels"],
        }
    else:
        c = check_record(content, INBOUND_FIELDS, "mask request")
    slots, slot = session.slots()
    payload = Payload(data, metric_vector(kind, slots, slot, values, counter))
    masked = session.mask(c["senders"], c["ciphertexts"], payload, params)
    _save(state, session)
    return {"masked": masked.to_bytes()}


def confirm(state, content, identity: Identity) -> dict:
    c = check_record(content, CONFIRM_FIELDS, "survivor list")
    session = _session(state)
    signature = session.confirm(c["survivors"], identity)
    _save(state, session)
    return {"signature": signature}


def unmask(state, content, roster: Roster) -> dict:
    c = check_record(content, UNMASK_FIELDS, "unmask request")
    if len(c["signers"]) != len(c["signatures"]):
        raise _error("The unmask request's signers and signatures differ in length.")
    session = _session(state)
    shares = session.unmask(c["survivors"], c["dropped"], dict(zip(c["signers"], c["signatures"], strict=True)), roster)
    clear(state)  # the round is over for this node: drop keys, seed and update
    owners = sorted(shares)
    return {"owners": owners, "shares": [shares[o] for o in owners]}


def expected_masked_bytes(state, content) -> int:
    """What a mask reply must weigh (for the egress guard): 4 bytes per update value, 8 per metric."""
    from common.secagg.encoding import metric_length

    session = _session(state)
    kind = str(state[CONTRIBUTION]["kind"])
    n_values = sum(int(np.prod(a.shape)) for a in state[UPDATE].values()) if kind == "train" else 0
    return 4 * n_values + 8 * metric_length(kind, session.slots()[0])


def clear(state) -> None:
    for key in (SESSION, UPDATE, CONTRIBUTION):
        if key in state:
            del state[key]


def _error(message: str):
    from common.secagg.crypto import SecAggError

    return SecAggError(message)


def _session(state) -> ClientSession:
    if SESSION not in state:
        raise _error("No secure-aggregation session on this node: the messages arrived out of order.")
    return ClientSession.from_record(state[SESSION])


def _save(state, session: ClientSession) -> None:
    from flwr.app import ConfigRecord

    state[SESSION] = ConfigRecord(session.to_record())
