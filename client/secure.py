"""A node's side of secure aggregation across Flower messages.

Between messages the session and what will be summed live in the node's Flower context
state (in simulation and deployment alike, later messages may run in another process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from common.secagg.encoding import Quantization, flatten, metric_vector
from common.secagg.protocol import ClientSession, Payload

if TYPE_CHECKING:
    import torch

SESSION = "fedsov-secagg-session"
UPDATE = "fedsov-secagg-update"
CONTRIBUTION = "fedsov-secagg-contribution"


def begin(state, tag: bytes, node_id: int, kind: str, region: str, values: Mapping[str, float],
          update: Mapping[str, "torch.Tensor"] | None = None) -> dict[str, bytes]:
    """Keep what this node will contribute, start a session, return its public keys."""
    from flwr.app import ConfigRecord

    clear(state)
    session = ClientSession.start(tag, node_id)
    state[SESSION] = ConfigRecord(session.to_record())
    state[CONTRIBUTION] = ConfigRecord({"kind": kind, "region": region, **{k: float(v) for k, v in values.items()}})
    if update is not None:
        from common.wire import state_to_record

        state[UPDATE] = state_to_record(update)
    return {"c-pk": session.c_pk, "s-pk": session.s_pk}


def share(state, content) -> dict:
    session = _session(state)
    encrypted, commitment = session.share(
        [int(x) for x in content["node-ids"]], list(content["c-pks"]), list(content["s-pks"]), int(content["threshold"])
    )
    _save(state, session)
    receivers = sorted(encrypted)
    return {"receivers": receivers, "ciphertexts": [encrypted[r] for r in receivers], "commitment": commitment}


def mask(state, content) -> dict:
    """Quantise this node's contribution into the layout the coordinator set, and mask it."""
    session = _session(state)
    contribution = state[CONTRIBUTION]
    kind, region = str(contribution["kind"]), str(contribution["region"])
    regions = [str(r) for r in content["regions"]]
    values = {k: float(v) for k, v in contribution.items() if k not in ("kind", "region")}
    data, counter = np.zeros(0, dtype=np.uint32), 1  # evaluation: metrics only, counting clients
    if kind == "train":
        # numpy straight from the record: the masking stage never needs torch.
        update = {name: array.numpy() for name, array in state[UPDATE].items()}
        layout = [(str(n), tuple(update[str(n)].shape)) for n in content["layout"]]
        quantization = Quantization(float(content["clip-range"]), int(content["levels"]))
        data, counter = quantization.encode(flatten(update, layout), int(values["units"]))  # counter: clipped values
    metrics = metric_vector(kind, regions, region, values, counter)
    masked = session.mask([int(x) for x in content["senders"]], list(content["ciphertexts"]), Payload(data, metrics))
    _save(state, session)
    return {"masked": masked.to_bytes()}


def unmask(state, content) -> dict:
    session = _session(state)
    shares = session.unmask([int(x) for x in content["survivors"]], [int(x) for x in content["dropped"]])
    clear(state)  # the round is over for this node: drop keys, seed and update
    owners = sorted(shares)
    return {"owners": owners, "shares": [shares[o] for o in owners]}


def clear(state) -> None:
    for key in (SESSION, UPDATE, CONTRIBUTION):
        if key in state:
            del state[key]


def _session(state) -> ClientSession:
    from common.secagg.crypto import SecAggError

    if SESSION not in state:
        raise SecAggError("No secure-aggregation session on this node: the messages arrived out of order.")
    return ClientSession.from_record(state[SESSION])


def _save(state, session: ClientSession) -> None:
    from flwr.app import ConfigRecord

    state[SESSION] = ConfigRecord(session.to_record())
