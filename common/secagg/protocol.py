"""Secure aggregation (Bonawitz et al. 2017) over all of a round's clients, in four stages.

1. advertise  each client makes two X25519 key pairs (c: to encrypt shares, s: for masks)
              and sends the public halves.
2. share      with everyone's public keys, each client draws a self-mask seed b, Shamir-shares
              b and its mask key s_sk among all clients (threshold t), encrypts each peer's
              shares to that peer (AES-GCM, key from X25519 on the c keys), commits to b.
3. mask       with the ciphertexts addressed to it, a client sends
              y = x + PRG(b) + sum over peers v of +-PRG(s_uv)   (mod 2**32, resp. 2**64)
              where s_uv is the X25519 agreement of the s keys: pairwise masks cancel in the sum.
4. unmask     the coordinator names who sent y (survivors) and who dropped; each client returns
              its share of b for every survivor and of s_sk for every dropped client, never both
              for the same peer. With t shares the coordinator removes the self masks of the
              survivors and the pairwise masks the dropped clients left behind.

Threat model: an honest-but-curious coordinator learns only the sum, as long as fewer than t
clients collude with it; clients refuse inconsistent unmask requests (a peer both survived and
dropped, too few survivors, a second unmask). A coordinator that actively substitutes keys is out
of scope (it would need signed keys and a consistency round); DP noise added on each client before
masking still bounds what any single update reveals.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

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
from common.secagg.encoding import DATA_DTYPE, METRIC_DTYPE

SEED_BYTES = 32


@dataclass
class Payload:
    """What one client contributes to the sum: a uint32 data segment and a uint64 metric segment."""

    data: np.ndarray
    metrics: np.ndarray

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=DATA_DTYPE)
        self.metrics = np.asarray(self.metrics, dtype=METRIC_DTYPE)

    def plus(self, other: "Payload", sign: int = 1) -> "Payload":
        if sign > 0:
            return Payload(self.data + other.data, self.metrics + other.metrics)
        return Payload(self.data - other.data, self.metrics - other.metrics)

    def to_bytes(self) -> bytes:
        return self.data.astype("<u4").tobytes() + self.metrics.astype("<u8").tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, n_data: int, n_metrics: int) -> "Payload":
        if len(blob) != 4 * n_data + 8 * n_metrics:
            raise SecAggError(f"Masked input has {len(blob)} bytes, expected {4 * n_data + 8 * n_metrics}.")
        return cls(np.frombuffer(blob[: 4 * n_data], dtype="<u4"), np.frombuffer(blob[4 * n_data :], dtype="<u8"))


def mask_for(key_material: bytes, n_data: int, n_metrics: int) -> Payload:
    return Payload(
        mask_stream(derive_key(key_material, b"data"), n_data, np.uint32),
        mask_stream(derive_key(key_material, b"metrics"), n_metrics, np.uint64),
    )


def _pack_shares(sender: int, receiver: int, s_share: bytes, b_share: bytes) -> bytes:
    return struct.pack(">QQ", sender, receiver) + s_share + b_share


def _aad(tag: bytes, sender: int, receiver: int) -> bytes:
    return tag + struct.pack(">QQ", sender, receiver)


@dataclass
class ClientSession:
    """One client's side of one secure aggregation; survives between messages as a record."""

    tag: bytes
    node_id: int
    c_sk: bytes
    c_pk: bytes
    s_sk: bytes
    s_pk: bytes
    threshold: int = 0
    peer_ids: list[int] = field(default_factory=list)
    peer_c_pks: list[bytes] = field(default_factory=list)
    peer_s_pks: list[bytes] = field(default_factory=list)
    seed: bytes = b""
    inbound_ids: list[int] = field(default_factory=list)
    inbound: list[bytes] = field(default_factory=list)
    stage: str = "advertised"

    @classmethod
    def start(cls, tag: bytes, node_id: int) -> "ClientSession":
        c_sk, c_pk = new_keypair()
        s_sk, s_pk = new_keypair()
        return cls(tag=tag, node_id=node_id, c_sk=c_sk, c_pk=c_pk, s_sk=s_sk, s_pk=s_pk)

    # stage 2
    def share(self, peer_ids: list[int], c_pks: list[bytes], s_pks: list[bytes], threshold: int) -> tuple[dict[int, bytes], bytes]:
        """Encrypted shares for every peer (self included), and a commitment to the self-mask seed."""
        self._expect("advertised")
        if len(set(peer_ids)) != len(peer_ids) or not len(peer_ids) == len(c_pks) == len(s_pks):
            raise SecAggError("The key list from the coordinator is malformed (duplicates or length mismatch).")
        if self.node_id not in peer_ids:
            raise SecAggError("The coordinator's key list leaves out this node.")
        mine = peer_ids.index(self.node_id)
        if c_pks[mine] != self.c_pk or s_pks[mine] != self.s_pk:
            raise SecAggError("The coordinator relayed keys for this node that it never sent.")
        if not 2 <= threshold <= len(peer_ids):
            raise SecAggError(f"Threshold {threshold} is impossible for {len(peer_ids)} clients.")
        order = sorted(range(len(peer_ids)), key=lambda i: peer_ids[i])
        self.peer_ids = [peer_ids[i] for i in order]
        self.peer_c_pks = [c_pks[i] for i in order]
        self.peer_s_pks = [s_pks[i] for i in order]
        self.threshold = threshold
        self.seed = os.urandom(SEED_BYTES)
        s_shares = split_secret(self.s_sk, threshold, len(self.peer_ids))
        b_shares = split_secret(self.seed, threshold, len(self.peer_ids))
        out = {}
        for i, peer in enumerate(self.peer_ids):
            key = agree(self.c_sk, self.peer_c_pks[i], self.tag + b"|share")
            out[peer] = encrypt(key, _pack_shares(self.node_id, peer, s_shares[i], b_shares[i]), _aad(self.tag, self.node_id, peer))
        self.stage = "shared"
        return out, hashlib.sha256(self.seed).digest()

    # stage 3
    def mask(self, sender_ids: list[int], ciphertexts: list[bytes], payload: Payload) -> Payload:
        self._expect("shared")
        if self.node_id not in sender_ids or not set(sender_ids) <= set(self.peer_ids):
            raise SecAggError("The shares relayed to this node come from unknown clients or leave this node out.")
        if len(sender_ids) < self.threshold:
            raise SecAggError(f"Only {len(sender_ids)} clients shared keys; at least {self.threshold} are needed.")
        masked = payload.plus(mask_for(derive_key(self.seed, self.tag + b"|self"), payload.data.size, payload.metrics.size))
        for peer in sender_ids:
            if peer == self.node_id:
                continue
            pairwise = mask_for(
                agree(self.s_sk, self.peer_s_pks[self.peer_ids.index(peer)], self.tag + b"|mask"),
                payload.data.size,
                payload.metrics.size,
            )
            masked = masked.plus(pairwise, 1 if self.node_id < peer else -1)
        self.inbound_ids, self.inbound = list(sender_ids), list(ciphertexts)
        self.stage = "masked"
        return masked

    # stage 4
    def unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        self._expect("masked")
        if set(survivors) & set(dropped):
            raise SecAggError("Refusing to unmask: a client is named both survivor and dropped (would reveal its input).")
        if set(survivors) | set(dropped) != set(self.inbound_ids) or self.node_id not in survivors:
            raise SecAggError("Refusing to unmask: the survivor and dropout lists do not match the clients that shared keys.")
        if len(survivors) < self.threshold:
            raise SecAggError(f"Refusing to unmask: {len(survivors)} survivors, fewer than the threshold {self.threshold}.")
        out = {}
        for sender, blob in zip(self.inbound_ids, self.inbound):
            key = agree(self.c_sk, self.peer_c_pks[self.peer_ids.index(sender)], self.tag + b"|share")
            plain = decrypt(key, blob, _aad(self.tag, sender, self.node_id))
            if struct.unpack(">QQ", plain[:16]) != (sender, self.node_id):
                raise SecAggError("A share's header does not match its sender and receiver.")
            s_share, b_share = plain[16:48], plain[48:80]
            out[sender] = b_share if sender in survivors else s_share
        self.stage = "unmasked"
        return out

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"Secure-aggregation message out of order: this node is at '{self.stage}', not '{stage}'.")

    # persistence between Flower messages (context.state)
    def to_record(self) -> dict:
        return {
            "tag": self.tag, "node-id": self.node_id, "c-sk": self.c_sk, "c-pk": self.c_pk, "s-sk": self.s_sk,
            "s-pk": self.s_pk, "threshold": self.threshold, "peer-ids": self.peer_ids, "peer-c-pks": self.peer_c_pks,
            "peer-s-pks": self.peer_s_pks, "seed": self.seed, "inbound-ids": self.inbound_ids,
            "inbound": self.inbound, "stage": self.stage,
        }

    @classmethod
    def from_record(cls, r) -> "ClientSession":
        return cls(
            tag=r["tag"], node_id=int(r["node-id"]), c_sk=r["c-sk"], c_pk=r["c-pk"], s_sk=r["s-sk"], s_pk=r["s-pk"],
            threshold=int(r["threshold"]), peer_ids=[int(x) for x in r.get("peer-ids", [])],
            peer_c_pks=list(r.get("peer-c-pks", [])), peer_s_pks=list(r.get("peer-s-pks", [])), seed=r["seed"],
            inbound_ids=[int(x) for x in r.get("inbound-ids", [])], inbound=list(r.get("inbound", [])), stage=r["stage"],
        )


@dataclass
class ServerAggregation:
    """The coordinator's side: relays, then removes the masks from the sum of survivors' inputs."""

    tag: bytes
    threshold: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (c_pk, s_pk), U1
    commitments: dict[int, bytes] = field(default_factory=dict)  # node -> sha256(seed), U2
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> blob

    def key_lists(self) -> tuple[list[int], list[bytes], list[bytes]]:
        ids = sorted(self.keys)
        return ids, [self.keys[i][0] for i in ids], [self.keys[i][1] for i in ids]

    def add_shares(self, sender: int, encrypted: dict[int, bytes], commitment: bytes) -> None:
        if set(encrypted) != set(self.keys):
            raise SecAggError(f"Node {sender} sent shares for a different set of clients.")
        self.commitments[sender] = commitment
        for receiver, blob in encrypted.items():
            self.ciphertexts.setdefault(receiver, {})[sender] = blob

    def inbound_for(self, receiver: int) -> tuple[list[int], list[bytes]]:
        """Ciphertexts for `receiver` from every client that completed stage 2."""
        senders = sorted(s for s in self.ciphertexts.get(receiver, {}) if s in self.commitments)
        return senders, [self.ciphertexts[receiver][s] for s in senders]

    def unmask(self, masked: dict[int, Payload], shares: dict[int, dict[int, bytes]]) -> Payload:
        """Sum of the survivors' inputs, from their masked inputs and the unmask shares."""
        survivors = sorted(masked)
        dropped = sorted(set(self.commitments) - set(masked))
        holders = sorted(self.keys)
        if len(shares) < self.threshold:
            raise SecAggError(f"Only {len(shares)} clients returned unmask shares; {self.threshold} are needed.")
        first = masked[survivors[0]]
        total = Payload(np.zeros_like(first.data), np.zeros_like(first.metrics))
        for node in survivors:
            total = total.plus(masked[node])

        def secret_of(owner: int) -> bytes:
            parts = {holders.index(h) + 1: s[owner] for h, s in shares.items() if owner in s}
            if len(parts) < self.threshold:
                raise SecAggError(f"Only {len(parts)} shares for node {owner}; {self.threshold} are needed.")
            return combine_secret(dict(list(parts.items())[: self.threshold]))

        for node in survivors:
            seed = secret_of(node)
            if hashlib.sha256(seed).digest() != self.commitments[node]:
                raise SecAggError(f"The shares of node {node}'s mask seed do not match its commitment; the sum would be wrong.")
            total = total.plus(mask_for(derive_key(seed, self.tag + b"|self"), first.data.size, first.metrics.size), -1)
        for gone in dropped:
            s_sk = secret_of(gone)
            if public_of(s_sk) != self.keys[gone][1]:
                raise SecAggError(f"The shares of node {gone}'s mask key do not match its public key; the sum would be wrong.")
            for node in survivors:
                pairwise = mask_for(agree(s_sk, self.keys[node][1], self.tag + b"|mask"), first.data.size, first.metrics.size)
                # The survivor added +mask if its id is smaller than the dropped client's, else -mask.
                total = total.plus(pairwise, -1 if node < gone else 1)
        return total
