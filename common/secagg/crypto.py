"""Cryptographic primitives of secure aggregation, all from well-kept libraries.

- Key agreement: X25519, keys derived with HKDF-SHA256 (`cryptography`).
- Share encryption between two clients: AES-256-GCM (`cryptography`).
- Masks: the ChaCha20 keystream keyed by a full 256-bit derived key (`cryptography`). Every
  4 (or 8) keystream bytes are one uint32 (uint64), so masks are exactly uniform over the
  2**32 (2**64) modulus. This replaces Flower 1.42's `pseudo_rand_gen`, which folds its seed
  to 32 bits and draws from numpy's RandomState (brute-forceable, slightly biased).
- Secret sharing: Shamir over GF(2^128) (`pycryptodome`), on 16-byte chunks.
"""

from __future__ import annotations

import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import FedsovError

KEY_BYTES = 32
CHUNK = 16  # Shamir in pycryptodome shares 16-byte secrets


class SecAggError(FedsovError):
    """A secure-aggregation message is inconsistent, unauthentic or arrives too late."""


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw (private, public) bytes."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        ),
        private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )


def public_of(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def derive_key(secret: bytes, info: bytes) -> bytes:
    """A 256-bit key bound to `info` (protocol, round and purpose) from secret material."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """X25519 shared secret with a peer, through HKDF."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise SecAggError(f"Invalid public key from a peer ({err}).") from err
    return derive_key(secret, info)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag as err:
        raise SecAggError(
            "A secret share failed authentication: it was altered or is not addressed to this node."
        ) from err


def mask_stream(key: bytes, count: int, dtype: type = np.uint32) -> np.ndarray:
    """`count` uniform integers of `dtype` from the ChaCha20 keystream under `key`.

    Each key is used for one stream only (it is derived per round, pair and segment), so a
    fixed nonce is safe.
    """
    width = np.dtype(dtype).itemsize
    if count == 0:
        return np.zeros(0, dtype=dtype)
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (count * width))
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir-share `secret` (a multiple of 16 bytes); share i is for holder index i+1."""
    if len(secret) % CHUNK:
        raise ValueError("secret length must be a multiple of 16 bytes")
    per_holder = [bytearray() for _ in range(holders)]
    for start in range(0, len(secret), CHUNK):
        for index, share in Shamir.split(threshold, holders, secret[start : start + CHUNK], ssss=False):
            per_holder[index - 1] += share
    return [bytes(s) for s in per_holder]


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """Rebuild a secret from {holder index (1-based): share}; needs the threshold number of shares."""
    length = len(next(iter(shares.values())))
    out = bytearray()
    for start in range(0, length, CHUNK):
        out += Shamir.combine([(index, share[start : start + CHUNK]) for index, share in shares.items()], ssss=False)
    return bytes(out)
