"""The egress guard: nothing leaves a node unless it matches the protocol's allow-list.

Every reply is checked against the exact shape its message type allows (record names,
keys, value types and sizes; for a plaintext update, exactly the adapter tensors the plan
trains, float32). Anything else, such as text, token ids, embeddings, per-example values,
unexpected keys or oversized payloads, is replaced by a refusal. Message types the protocol
does not use are refused before any handler runs. Each decision goes to the node's audit log
with the bytes sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from common.schema import SchemaError, check_record
from common.secagg.identity import SIGNATURE_BYTES
from common.secagg.protocol import MAX_SLOTS
from common.wire import (
    AUDIT,
    DATA_COUNTS,
    DESCRIBE,
    EVALUATE,
    EVALUATE_METRICS,
    EVIDENCE,
    EVIDENCE_FIELDS,
    EXAMPLES,
    GLOBAL_ADAPTER,
    METRICS,
    NODE,
    PLAN,
    SECAGG,
    SECAGG_KEYS,
    SECAGG_STAGES,
    SECURE_TRAIN_METRICS,
    TRAIN,
    TRAIN_METRICS,
    UPDATE,
    record_to_state,
)

ALLOWED_MESSAGE_TYPES = frozenset(
    [DESCRIBE, TRAIN, EVALUATE, AUDIT] + [f"{c}.{s}" for c in (TRAIN, EVALUATE) for s in SECAGG_STAGES]
)
AUDIT_METRIC = re.compile(
    r"(exposure-rep\d+-(mean|max)|extracted-(greedy|beam)-rep\d+|canaries-rep\d+|mia-(loss|calibrated)-(auc|tpr-at-1pct-fpr)"
    r"|mia-(members|nonmembers)|one-run-(canaries|guesses|correct|repetitions)|generations|pii-spans"
    r"|canaries-never-inserted|exposure-never-inserted-mean"
    r"|epsilon|delta)"
)
# A redacted canary prompt: no digit runs, no addresses, short.
REDACTED_EXAMPLE = re.compile(r"[^@]{1,300}")
MAX_EXAMPLES = 32
DESCRIBE_METRICS = (
    "num-units",
    "people",
    *DATA_COUNTS,
    "delta",
    "epsilon-budget",
    "epsilon",
)
KEY_BYTES = 32
MAX_TEXT = 64
MAX_REASON = 4096
MAX_PEERS = 4096
# header 16 + mask-key share 32 + one 32-byte share per self-mask seed + AES-GCM nonce and tag 28
MAX_SHARE_CIPHERTEXT = 16 + 32 + 32 * (1 + MAX_SLOTS) + 28


class EgressBlocked(Exception):
    """The reply does not match what this message type may send."""


def check_reply(request, reply_content, state) -> None:
    """Raise EgressBlocked unless `reply_content` is exactly what `request` may be answered with."""
    kind = request.metadata.message_type
    secure = _secure(request)
    if kind == DESCRIBE:
        _records(reply_content, {NODE: "config", METRICS: "metric", EVIDENCE: "config"})
        _evidence(reply_content[EVIDENCE])
        _config(
            reply_content[NODE],
            {"region": str, "node-name": str, "law": str, "policy-hash": str, "unit": str, "allowed-deployment": list},
        )
        for value in reply_content[NODE]["allowed-deployment"]:
            _text(value, "allowed-deployment")
        _metrics(reply_content[METRICS], DESCRIBE_METRICS)
    elif kind == TRAIN and secure:
        _records(reply_content, {SECAGG_KEYS: "config", METRICS: "metric", EVIDENCE: "config"})
        _keys(reply_content[SECAGG_KEYS])
        _metrics(reply_content[METRICS], SECURE_TRAIN_METRICS)
        _evidence(reply_content[EVIDENCE])
    elif kind == TRAIN:
        _records(reply_content, {UPDATE: "array", METRICS: "metric", EVIDENCE: "config"})
        _update(reply_content[UPDATE], request)
        _metrics(reply_content[METRICS], TRAIN_METRICS)
        _evidence(reply_content[EVIDENCE])
    elif kind == EVALUATE and secure:
        _records(reply_content, {SECAGG_KEYS: "config"})
        _keys(reply_content[SECAGG_KEYS])
    elif kind == EVALUATE:
        _records(reply_content, {METRICS: "metric"})
        _metrics(reply_content[METRICS], EVALUATE_METRICS)
    elif kind == AUDIT:
        _records(reply_content, {METRICS: "metric", EXAMPLES: "config"})
        for key in reply_content[METRICS].keys():
            if not AUDIT_METRIC.fullmatch(key):
                raise EgressBlocked(f"audit metric {key!r} is not on the allow-list")
        _metrics(reply_content[METRICS], tuple(reply_content[METRICS].keys()))
        _config(reply_content[EXAMPLES], {"examples": list})
        examples = reply_content[EXAMPLES]["examples"]
        if len(examples) > MAX_EXAMPLES:
            raise EgressBlocked("too many audit examples")
        for text in examples:
            if not isinstance(text, str) or not REDACTED_EXAMPLE.fullmatch(text) or re.search(r"\d{3,}", text):
                raise EgressBlocked("an audit example carries what looks like a secret (digits or an address)")
    elif kind.endswith(".secagg_shares"):
        _records(reply_content, {SECAGG: "config"})
        c = reply_content[SECAGG]
        _config(c, {"receivers": list, "ciphertexts": list, "commitment": bytes})
        if len(c["commitment"]) % KEY_BYTES or not 0 < len(c["commitment"]) <= KEY_BYTES * (1 + MAX_SLOTS):
            raise EgressBlocked("the commitment is not one 32-byte hash per self-mask seed")
        if len(c["receivers"]) != len(c["ciphertexts"]) or len(c["receivers"]) > MAX_PEERS:
            raise EgressBlocked("share lists are malformed or too long")
        if not all(isinstance(b, bytes) and len(b) <= MAX_SHARE_CIPHERTEXT for b in c["ciphertexts"]):
            raise EgressBlocked("a share ciphertext is larger than a share can be")
    elif kind.endswith(".secagg_confirm"):
        _records(reply_content, {SECAGG: "config"})
        _config(reply_content[SECAGG], {"signature": bytes})
        if len(reply_content[SECAGG]["signature"]) != SIGNATURE_BYTES:
            raise EgressBlocked("a survivor-set signature is not 64 bytes")
    elif kind.endswith(".secagg_mask"):
        _records(reply_content, {SECAGG: "config"})
        _config(reply_content[SECAGG], {"masked": bytes})
        expected = _masked_size(request, state)
        if len(reply_content[SECAGG]["masked"]) != expected:
            raise EgressBlocked(f"masked input is {len(reply_content[SECAGG]['masked'])} bytes, expected {expected}")
    elif kind.endswith(".secagg_unmask"):
        _records(reply_content, {SECAGG: "config"})
        c = reply_content[SECAGG]
        _config(c, {"owners": list, "shares": list})
        if len(c["owners"]) != len(c["shares"]) or len(c["owners"]) > MAX_PEERS:
            raise EgressBlocked("unmask lists are malformed or too long")
        if not all(
            isinstance(b, bytes) and b and len(b) % KEY_BYTES == 0 and len(b) <= KEY_BYTES * (1 + MAX_SLOTS)
            for b in c["shares"]
        ):
            raise EgressBlocked("an unmask share is not a whole number of 32-byte shares")
    else:
        raise EgressBlocked(f"message type {kind!r} is not part of the protocol")


def _secure(request) -> bool:
    return PLAN in request.content and bool(request.content[PLAN].get("secure-aggregation", False))


def _records(content, expected: dict[str, str]) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    types = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}
    names = set(content.keys())
    if names != set(expected):
        raise EgressBlocked(f"records {sorted(names)} instead of {sorted(expected)}")
    for name, kind in expected.items():
        if not isinstance(content[name], types[kind]):
            raise EgressBlocked(f"record {name!r} is not a {kind} record")


def _config(record, fields: dict[str, type]) -> None:
    if set(record.keys()) != set(fields):
        raise EgressBlocked(f"keys {sorted(record.keys())} instead of {sorted(fields)}")
    for key, kind in fields.items():
        value = record[key]
        if not isinstance(value, kind):
            raise EgressBlocked(f"{key!r} is {type(value).__name__}, not {kind.__name__}")
        if kind is str:
            _text(value, key)


def _text(value: Any, key: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise EgressBlocked(f"{key!r} must be a short string (at most {MAX_TEXT} characters)")


def _metrics(record, allowed: tuple[str, ...]) -> None:
    if set(record.keys()) != set(allowed):
        raise EgressBlocked(f"metrics {sorted(record.keys())} instead of {sorted(allowed)}")
    for key, value in record.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise EgressBlocked(f"metric {key!r} is not a single number (lists are per-example values)")
        if isinstance(value, float) and math.isnan(value):
            raise EgressBlocked(f"metric {key!r} is NaN")


def _evidence(record) -> None:
    """Chain heads only: counts and 64-hex hashes, nothing else."""
    try:
        check_record(record, EVIDENCE_FIELDS, "evidence")
    except SchemaError as err:
        raise EgressBlocked(str(err)) from err


def _keys(record) -> None:
    _config(record, {"c-pk": bytes, "s-pk": bytes, "name": str, "signature": bytes})
    if any(len(record[k]) != KEY_BYTES for k in ("c-pk", "s-pk")):
        raise EgressBlocked("public keys are not 32 bytes")
    if len(record["signature"]) != SIGNATURE_BYTES:
        raise EgressBlocked("the key signature is not 64 bytes")


def _update(record, request) -> None:
    """Exactly the tensors the plan trains, with the global adapter's shapes, as float32."""
    try:
        update, expected = record_to_state(record), record_to_state(request.content[GLOBAL_ADAPTER])
    except SchemaError as err:
        raise EgressBlocked(f"the update is not a well-formed adapter: {err}") from err
    ffa = bool(request.content[PLAN].get("lora-ffa", False))
    names = {n for n in expected if not (ffa and "lora_A" in n)}
    if set(update) != names:
        extra, missing = sorted(set(update) - names), sorted(names - set(update))
        raise EgressBlocked(f"update tensors differ from the plan: unexpected {extra[:3]}, missing {missing[:3]}")
    for name in names:
        if update[name].shape != expected[name].shape:
            raise EgressBlocked(
                f"update tensor {name} has shape {tuple(update[name].shape)}, expected {tuple(expected[name].shape)}"
            )


def _masked_size(request, state) -> int:
    from client import secure

    return secure.expected_masked_bytes(state, request.content[SECAGG])


def guard(audit_for: Callable[[Any], Any], refusal: Callable[[Any, str], Any]):
    """A Flower mod: check each reply on its way out; log what was sent or blocked."""
    from common.wire import payload_bytes

    def mod(message, context, call_next):
        reply = call_next(message, context)
        audit = audit_for(context)
        round_number = int(message.metadata.group_id) if message.metadata.group_id.isdigit() else None
        if reply.has_error():
            reason = reply.error.reason[:MAX_REASON]
            audit.record(
                "egress",
                "refusal_sent",
                reason=reason,
                round=round_number,
                message_type=message.metadata.message_type,
                bytes_sent=len(reason.encode()),
            )
            return reply if len(reply.error.reason) <= MAX_REASON else refusal(message, reason)
        try:
            check_reply(message, reply.content, context.state)
        except EgressBlocked as err:
            audit.record(
                "egress", "blocked", reason=str(err), round=round_number, message_type=message.metadata.message_type
            )
            return refusal(message, f"egress guard blocked the reply: {err}")
        audit.record(
            "egress",
            "sent",
            reason="reply matches the protocol allow-list",
            round=round_number,
            message_type=message.metadata.message_type,
            bytes_sent=payload_bytes(reply.content),
        )
        return reply

    return mod
