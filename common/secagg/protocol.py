"""Secure aggregation that holds against a coordinator that deviates (Bonawitz et al. 2017, the
actively secure variant), in five stages.

1. advertise  each client makes two X25519 key pairs (c: to encrypt shares, s: for masks) and signs
              (tag, its node id, its name, both public keys) with its long-term identity key, which the
              federation roster installed on every node lists (the coordinator cannot write the roster).
2. share      with the signed key list, each client checks every signature against its own roster, that
              no node id or identity appears twice, and that the threshold t is more than half the list
              and at least its policy's minimum cohort; then it draws a self-mask seed b, Shamir-shares b
              and s_sk among all (threshold t), encrypts each peer's shares to it (AES-GCM), commits to b.
3. mask       every public parameter of the round (tag, threshold, the signed key list with each peer's
              region from the roster, layout, quantisation, metric slots, the plan) is hashed into a
              transcript T that keys every mask:
              y = x + PRG(b, T) + sum over peers v of +-PRG(s_uv, T)   (mod 2**32 resp. 2**64).
              Parameters that differ between clients make the masks fail to cancel: a failed round,
              never a leak.
4. confirm    the coordinator names the survivors U3 (who sent y); each client checks U3 (distinct, known,
              at least t, no metric slot left with a single survivor) and signs (T, U3).
5. unmask     shown at least t valid signatures on the same U3 by distinct survivors, a client returns its
              share of b for every survivor and of s_sk for every client that shared keys but dropped;
              never both for one peer, never twice.

Threat model: a coordinator that deviates arbitrarily and colludes with fewer than t clients learns only
the sum of at least t updates, and per-slot metric sums of at least two clients, as long as the roster is
honest. Every count is over distinct roster-verified nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.secagg.crypto import (
    SecAggError,
    agree,
    combine_secret,
    decrypt,
    derive_key,
    encrypt,
    mask_stream,
    new_keypair,
    public_of,
    split_secret,
)
from common.secagg.encoding import DATA_DTYPE, METRIC_DTYPE, metric_slots
from common.secagg.identity import Identity, Roster

SEED_BYTES = 32
MAX_SLOTS = 64  # metric slots (regions) in one aggregation: bounds every share and commitment


@dataclass
class Payload:
    """What one client contributes to the sum: a uint32 data segment and a uint64 metric segment."""

    data: np.ndarray
    metrics: np.ndarray

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=DATA_DTYPE)
        self.metrics = np.asarray(self.metrics, dtype=METRIC_DTYPE)

    def plus(self, other: Payload, sign: int = 1) -> Payload:
        if sign > 0:
            return Payload(self.data + other.data, self.metrics + other.metrics)
        return Payload(self.data - other.data, self.metrics - other.metrics)

    def to_bytes(self) -> bytes:
        return self.data.astype("<u4").tobytes() + self.metrics.astype("<u8").tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, n_data: int, n_metrics: int) -> Payload:
        if len(blob) != 4 * n_data + 8 * n_metrics:
            raise SecAggError(f"Masked input has {len(blob)} bytes, expected {4 * n_data + 8 * n_metrics}.")
        return cls(np.frombuffer(blob[: 4 * n_data], dtype="<u4"), np.frombuffer(blob[4 * n_data :], dtype="<u8"))


def mask_for(key_material: bytes, n_data: int, n_metrics: int) -> Payload:
    return Payload(
        mask_stream(derive_key(key_material, b"data"), n_data, np.uint32),
        mask_stream(derive_key(key_material, b"metrics"), n_metrics, np.uint64),
    )


def self_mask(seeds: Sequence[bytes | None], info: bytes, n_data: int, n_metrics: int, n_slots: int) -> Payload:
    """A client's self mask: seed 0 masks the update and the global counter, seed 1+i metric slot i.

    Separate seeds let clients withhold one slot's seeds at unmasking: a slot left with one survivor stays
    masked while the update and every other slot are unmasked (None: a withheld seed, masks nothing here).
    """
    width = (n_metrics - 1) // n_slots if n_slots else 0
    if n_slots * width + 1 != n_metrics:
        raise SecAggError(f"{n_metrics} metric values do not make {n_slots} slots and a counter.")

    def stream(seed: bytes | None, purpose: bytes, count: int, dtype) -> np.ndarray:
        return (
            np.zeros(count, dtype=dtype)
            if seed is None
            else mask_stream(derive_key(seed, info + purpose), count, dtype)
        )

    metrics = [stream(seeds[1 + i], b"|slot", width, np.uint64) for i in range(n_slots)]
    metrics.append(stream(seeds[0], b"|counter", 1, np.uint64))
    return Payload(stream(seeds[0], b"|data", n_data, np.uint32), np.concatenate(metrics))


def revealed_seeds(regions: list[str], survivors: set[int], peer_ids: list[int]) -> list[int]:
    """Which self-mask seeds survivors' shares may reveal: the update's, and every slot's but a lone survivor's."""
    slots, slot_of = metric_slots(regions)
    counts = {slot: 0 for slot in slots}
    for peer, slot in zip(peer_ids, slot_of, strict=True):
        counts[slot] += peer in survivors
    return [0] + [1 + i for i, slot in enumerate(slots) if counts[slot] != 1]


def _pack_shares(sender: int, receiver: int, s_share: bytes, b_shares: list[bytes]) -> bytes:
    return struct.pack(">QQ", sender, receiver) + s_share + b"".join(b_shares)


def _aad(tag: bytes, sender: int, receiver: int) -> bytes:
    return tag + struct.pack(">QQ", sender, receiver)


@dataclass(frozen=True)
class Advert:
    """Stage 1: a client's public keys for one aggregation, signed with its long-term identity."""

    node_id: int
    name: str
    c_pk: bytes
    s_pk: bytes
    signature: bytes


def advert_message(tag: bytes, node_id: int, name: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"fedsov/secagg/advert/v2|" + tag + b"|" + struct.pack(">Q", node_id) + name.encode() + b"|" + c_pk + s_pk


def confirm_message(transcript: bytes, survivors: list[int]) -> bytes:
    return b"fedsov/secagg/confirm/v2|" + transcript + b"".join(struct.pack(">Q", n) for n in sorted(survivors))


def transcript_of(
    tag: bytes,
    threshold: int,
    peers: list[tuple[int, str, str, bytes, bytes]],
    params: dict[str, Any],
    plan_digest: str,
) -> bytes:
    """The hash of every public parameter of one aggregation; it keys the masks (see stage 3)."""
    body = {
        "tag": tag.hex(),
        "threshold": threshold,
        "plan": plan_digest,
        "peers": [[n, name, region, c.hex(), s.hex()] for n, name, region, c, s in sorted(peers)],
        "slots": metric_slots([p[2] for p in sorted(peers)])[0],
        "params": params,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


def commitment_of(seeds: list[bytes]) -> bytes:
    """One SHA-256 per self-mask seed: the coordinator checks each seed it rebuilds against its own hash."""
    return b"".join(hashlib.sha256(seed).digest() for seed in seeds)


def minimum_threshold(n_clients: int, min_cohort: int) -> int:
    """The smallest threshold a node accepts: more than half the clients (so two disjoint groups can never
    both unmask), at least its policy's minimum cohort, and at least 2."""
    return max(n_clients // 2 + 1, min_cohort, 2)


@dataclass
class ClientSession:
    """One client's side of one secure aggregation; survives between messages as a record."""

    tag: bytes
    node_id: int
    name: str
    plan_digest: str
    c_sk: bytes
    c_pk: bytes
    s_sk: bytes
    s_pk: bytes
    threshold: int = 0
    # U1, sorted by node id: (node id, name, region from the roster, c_pk, s_pk)
    peers: list[tuple[int, str, str, bytes, bytes]] = field(default_factory=list)
    seeds: list[bytes] = field(default_factory=list)  # self-mask seeds: the update's, then one per metric slot
    inbound_ids: list[int] = field(default_factory=list)  # U2 as this client saw it
    inbound: list[bytes] = field(default_factory=list)
    transcript: bytes = b""
    survivors: list[int] = field(default_factory=list)  # U3 this client confirmed
    stage: str = "advertised"

    @classmethod
    def start(cls, tag: bytes, node_id: int, name: str, plan_digest: str) -> ClientSession:
        c_sk, c_pk = new_keypair()
        s_sk, s_pk = new_keypair()
        return cls(
            tag=tag, node_id=node_id, name=name, plan_digest=plan_digest, c_sk=c_sk, c_pk=c_pk, s_sk=s_sk, s_pk=s_pk
        )

    def advert(self, identity: Identity) -> Advert:
        message = advert_message(self.tag, self.node_id, self.name, self.c_pk, self.s_pk)
        return Advert(self.node_id, self.name, self.c_pk, self.s_pk, identity.sign(message))

    # stage 2
    def share(
        self, adverts: list[Advert], threshold: int, roster: Roster, min_cohort: int
    ) -> tuple[dict[int, bytes], bytes]:
        """Encrypted shares for every peer (self included), and a commitment to the self-mask seed."""
        self._expect("advertised")
        ids, names = [a.node_id for a in adverts], [a.name for a in adverts]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise SecAggError(
                "The key list names a node or an identity twice: every count must be over distinct nodes."
            )
        mine = [a for a in adverts if a.node_id == self.node_id]
        if not mine or (mine[0].name, mine[0].c_pk, mine[0].s_pk) != (self.name, self.c_pk, self.s_pk):
            raise SecAggError("The coordinator's key list leaves out this node or relays keys it never sent.")
        peers = []
        for a in adverts:
            entry = roster.verify(a.name, advert_message(self.tag, a.node_id, a.name, a.c_pk, a.s_pk), a.signature)
            peers.append((a.node_id, a.name, entry.region, a.c_pk, a.s_pk))
        floor = minimum_threshold(len(peers), min_cohort)
        if not floor <= threshold <= len(peers):
            raise SecAggError(
                f"Threshold {threshold} for {len(peers)} clients is refused: this node requires at least "
                f"{floor} (more than half, and its policy's minimum cohort {min_cohort})."
            )
        self.peers, self.threshold = sorted(peers), threshold
        if len(self.slots()[0]) > MAX_SLOTS:
            raise SecAggError(f"{len(self.slots()[0])} metric slots in one aggregation; at most {MAX_SLOTS}.")
        self.seeds = [os.urandom(SEED_BYTES) for _ in range(1 + len(self.slots()[0]))]
        s_shares = split_secret(self.s_sk, threshold, len(self.peers))
        b_shares = [split_secret(seed, threshold, len(self.peers)) for seed in self.seeds]
        out = {}
        for i, (peer, _, _, peer_c_pk, _) in enumerate(self.peers):
            key = agree(self.c_sk, peer_c_pk, self.tag + b"|share")
            out[peer] = encrypt(
                key,
                _pack_shares(self.node_id, peer, s_shares[i], [b[i] for b in b_shares]),
                _aad(self.tag, self.node_id, peer),
            )
        self.stage = "shared"
        return out, commitment_of(self.seeds)

    def slots(self) -> tuple[list[str], str]:
        """The metric slots of this aggregation and this client's own, from the roster-verified peers."""
        slots, slot_of = metric_slots([p[2] for p in self.peers])
        return slots, slot_of[[p[0] for p in self.peers].index(self.node_id)]

    # stage 3
    def mask(
        self, sender_ids: list[int], ciphertexts: list[bytes], payload: Payload, params: dict[str, Any]
    ) -> Payload:
        self._expect("shared")
        known = {p[0] for p in self.peers}
        if len(set(sender_ids)) != len(sender_ids) or not set(sender_ids) <= known or self.node_id not in sender_ids:
            raise SecAggError("The shares relayed to this node repeat or come from unknown clients, or leave it out.")
        if len(ciphertexts) != len(sender_ids):
            raise SecAggError(
                f"The coordinator relayed {len(ciphertexts)} shares for {len(sender_ids)} senders: one share per "
                "sender is expected."
            )
        if len(sender_ids) < self.threshold:
            raise SecAggError(f"Only {len(sender_ids)} clients shared keys; at least {self.threshold} are needed.")
        self.transcript = transcript_of(self.tag, self.threshold, self.peers, params, self.plan_digest)
        masked = payload.plus(
            self_mask(self.seeds, self._info(b"self"), payload.data.size, payload.metrics.size, len(self.slots()[0]))
        )
        for peer, _, _, _, peer_s_pk in self.peers:
            if peer == self.node_id or peer not in sender_ids:
                continue
            pairwise = mask_for(
                agree(self.s_sk, peer_s_pk, self._info(b"mask")), payload.data.size, payload.metrics.size
            )
            masked = masked.plus(pairwise, 1 if self.node_id < peer else -1)
        self.inbound_ids, self.inbound = list(sender_ids), list(ciphertexts)
        self.stage = "masked"
        return masked

    # stage 4
    def confirm(self, survivors: list[int], identity: Identity) -> bytes:
        """Sign the survivor set, after checking it could not single out anyone's input."""
        self._expect("masked")
        if len(set(survivors)) != len(survivors) or not set(survivors) <= set(self.inbound_ids):
            raise SecAggError("Refusing to confirm: the survivor list repeats nodes or names nodes that never shared.")
        if self.node_id not in survivors or len(survivors) < self.threshold:
            raise SecAggError(
                f"Refusing to confirm: {len(set(survivors))} survivors, fewer than the threshold "
                f"{self.threshold} (or without this node)."
            )
        self.survivors = sorted(survivors)
        self.stage = "confirmed"
        return identity.sign(confirm_message(self.transcript, self.survivors))

    # stage 5
    def unmask(
        self, survivors: list[int], dropped: list[int], signatures: dict[int, bytes], roster: Roster
    ) -> dict[int, bytes]:
        self._expect("confirmed")
        if len(set(survivors)) != len(survivors) or sorted(survivors) != self.survivors:
            raise SecAggError("Refusing to unmask: the survivor list differs from the one this node confirmed.")
        expected_dropped = sorted(set(self.inbound_ids) - set(self.survivors))
        if len(set(dropped)) != len(dropped) or sorted(dropped) != expected_dropped:
            raise SecAggError(
                "Refusing to unmask: the dropout list is not exactly the clients that shared but did "
                "not survive (a client named both survivor and dropped would reveal its input)."
            )
        names = {p[0]: p[1] for p in self.peers}
        message = confirm_message(self.transcript, self.survivors)
        valid = {
            n for n, sig in signatures.items() if n in self.survivors and _verifies(roster, names[n], message, sig)
        }
        if len(valid) < self.threshold:
            raise SecAggError(
                f"Refusing to unmask: {len(valid)} survivors signed this survivor set, fewer than the "
                f"threshold {self.threshold} (the coordinator may be showing clients different sets)."
            )
        ids = [p[0] for p in self.peers]
        reveal = revealed_seeds([p[2] for p in self.peers], set(self.survivors), ids)
        out = {}
        for sender, blob in zip(self.inbound_ids, self.inbound, strict=True):
            key = agree(self.c_sk, self._peer(sender)[3], self.tag + b"|share")
            plain = decrypt(key, blob, _aad(self.tag, sender, self.node_id))
            if struct.unpack(">QQ", plain[:16]) != (sender, self.node_id) or (len(plain) - 48) % SEED_BYTES:
                raise SecAggError("A share's header does not match its sender and receiver.")
            s_share, b_shares = plain[16:48], [plain[i : i + SEED_BYTES] for i in range(48, len(plain), SEED_BYTES)]
            out[sender] = b"".join(b_shares[i] for i in reveal) if sender in self.survivors else s_share
        self.stage = "unmasked"
        return out

    def _peer(self, node: int) -> tuple[int, str, str, bytes, bytes]:
        return next(p for p in self.peers if p[0] == node)

    def _info(self, purpose: bytes) -> bytes:
        return self.tag + b"|" + purpose + b"|" + self.transcript

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"Secure-aggregation message out of order: this node is at '{self.stage}', not '{stage}'."
            )

    # persistence between Flower messages (context.state)
    def to_record(self) -> dict:
        return {
            "tag": self.tag,
            "node-id": self.node_id,
            "name": self.name,
            "plan-digest": self.plan_digest,
            "c-sk": self.c_sk,
            "c-pk": self.c_pk,
            "s-sk": self.s_sk,
            "s-pk": self.s_pk,
            "threshold": self.threshold,
            "peer-ids": [p[0] for p in self.peers],
            "peer-names": [p[1] for p in self.peers],
            "peer-regions": [p[2] for p in self.peers],
            "peer-c-pks": [p[3] for p in self.peers],
            "peer-s-pks": [p[4] for p in self.peers],
            "seeds": self.seeds,
            "inbound-ids": self.inbound_ids,
            "inbound": self.inbound,
            "transcript": self.transcript,
            "survivors": self.survivors,
            "stage": self.stage,
        }

    @classmethod
    def from_record(cls, r) -> ClientSession:
        peers = list(
            zip(
                [int(x) for x in r.get("peer-ids", [])],
                [str(x) for x in r.get("peer-names", [])],
                [str(x) for x in r.get("peer-regions", [])],
                list(r.get("peer-c-pks", [])),
                list(r.get("peer-s-pks", [])),
                strict=True,
            )
        )
        return cls(
            tag=r["tag"],
            node_id=int(r["node-id"]),
            name=str(r["name"]),
            plan_digest=str(r["plan-digest"]),
            c_sk=r["c-sk"],
            c_pk=r["c-pk"],
            s_sk=r["s-sk"],
            s_pk=r["s-pk"],
            threshold=int(r["threshold"]),
            peers=peers,
            seeds=list(r.get("seeds", [])),
            inbound_ids=[int(x) for x in r.get("inbound-ids", [])],
            inbound=list(r.get("inbound", [])),
            transcript=r.get("transcript", b""),
            survivors=[int(x) for x in r.get("survivors", [])],
            stage=r["stage"],
        )


def _verifies(roster: Roster, name: str, message: bytes, signature: bytes) -> bool:
    try:
        roster.verify(name, message, signature)
    except SecAggError:
        return False
    return True


@dataclass
class ServerAggregation:
    """The coordinator's side: relays, then removes the masks from the sum of survivors' inputs."""

    tag: bytes
    threshold: int
    plan_digest: str
    regions: dict[int, str]  # node -> region, as each node described itself (honest nodes agree with the roster)
    adverts: dict[int, Advert] = field(default_factory=dict)  # U1
    commitments: dict[int, bytes] = field(default_factory=dict)  # node -> sha256(seed), U2
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> blob
    transcript: bytes = b""

    def peers(self) -> list[tuple[int, str, str, bytes, bytes]]:
        return sorted((n, a.name, self.regions[n], a.c_pk, a.s_pk) for n, a in self.adverts.items())

    def slots(self) -> list[str]:
        return metric_slots([p[2] for p in self.peers()])[0]

    def add_shares(self, sender: int, encrypted: dict[int, bytes], commitment: bytes) -> None:
        if set(encrypted) != set(self.adverts):
            raise SecAggError(f"Node {sender} sent shares for a different set of clients.")
        self.commitments[sender] = commitment
        for receiver, blob in encrypted.items():
            self.ciphertexts.setdefault(receiver, {})[sender] = blob

    def inbound_for(self, receiver: int) -> tuple[list[int], list[bytes]]:
        """Ciphertexts for `receiver` from every client that completed stage 2."""
        senders = sorted(s for s in self.ciphertexts.get(receiver, {}) if s in self.commitments)
        return senders, [self.ciphertexts[receiver][s] for s in senders]

    def set_params(self, params: dict[str, Any]) -> None:
        self.transcript = transcript_of(self.tag, self.threshold, self.peers(), params, self.plan_digest)

    def unmask(self, masked: dict[int, Payload], shares: dict[int, dict[int, bytes]]) -> tuple[Payload, list[str]]:
        """Sum of the survivors' inputs, and the metric slots it reveals (a slot left with one survivor stays
        masked: its seeds were withheld)."""
        survivors = sorted(masked)
        dropped = sorted(set(self.commitments) - set(masked))
        peers = self.peers()
        holders = [p[0] for p in peers]
        slots = metric_slots([p[2] for p in peers])[0]
        reveal = revealed_seeds([p[2] for p in peers], set(survivors), holders)
        if len(shares) < self.threshold:
            raise SecAggError(f"Only {len(shares)} clients returned unmask shares; {self.threshold} are needed.")
        first = masked[survivors[0]]
        total = Payload(np.zeros_like(first.data), np.zeros_like(first.metrics))
        for node in survivors:
            total = total.plus(masked[node])

        def secret_of(owner: int, size: int) -> bytes:
            parts = {holders.index(h) + 1: s[owner] for h, s in shares.items() if len(s.get(owner, b"")) == size}
            if len(parts) < self.threshold:
                raise SecAggError(f"Only {len(parts)} shares for node {owner}; {self.threshold} are needed.")
            return combine_secret(dict(list(parts.items())[: self.threshold]))

        info = lambda purpose: self.tag + b"|" + purpose + b"|" + self.transcript  # noqa: E731
        for node in survivors:
            joined = secret_of(node, SEED_BYTES * len(reveal))
            seeds: list[bytes | None] = [None] * (1 + len(slots))
            for k, index in enumerate(reveal):
                seed = joined[k * SEED_BYTES : (k + 1) * SEED_BYTES]
                if hashlib.sha256(seed).digest() != self.commitments[node][index * 32 : (index + 1) * 32]:
                    raise SecAggError(
                        f"The shares of node {node}'s mask seed do not match its commitment; the sum would be wrong."
                    )
                seeds[index] = seed
            total = total.plus(self_mask(seeds, info(b"self"), first.data.size, first.metrics.size, len(slots)), -1)
        for gone in dropped:
            s_sk = secret_of(gone, SEED_BYTES)
            if public_of(s_sk) != self.adverts[gone].s_pk:
                raise SecAggError(
                    f"The shares of node {gone}'s mask key do not match its public key; the sum would be wrong."
                )
            for node in survivors:
                pairwise = mask_for(
                    agree(s_sk, self.adverts[node].s_pk, info(b"mask")), first.data.size, first.metrics.size
                )
                # The survivor added +mask if its id is smaller than the dropped client's, else -mask.
                total = total.plus(pairwise, -1 if node < gone else 1)
        return total, [slots[i - 1] for i in reveal if i > 0]
