"""A regional node's data at start: its files, residency, data-use rules, privacy units and tokens.

Plain functions (no Flower, no ledger, no model weights), so a test or a command can run the
node's data checks directly; `RegionNode` calls `load_node_data` when it starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.settings import NodeSettings
from client.training import encode_units
from common.data.partition import client_partition, split_heldout
from common.data.records import Record, load_records, scan_data_paths
from common.errors import PrivacyError, ResidencyViolation
from common.leakage.canaries import Canary, load_or_create
from common.pii import PiiDetector
from common.policy import DataUsePolicy, PrivacyUnitKind, RegionPolicy
from common.privacy.units import group_units


@dataclass
class NodeData:
    train_units: list
    train_examples: list[list[int]]
    heldout_examples: list[list[int]]
    counts: dict[str, int]
    # Files found in the data folders and deliberately not read, with why (also counted).
    skipped_files: list[tuple[Path, str]]
    # For the memorisation audit, which runs here, on this node: the canaries inserted, the
    # training records as they were on disk (for verbatim PII checks), and which training
    # examples are ordinary records (membership-inference members).
    canaries: list[Canary]
    train_raw_texts: list[str]
    record_examples: list[list[int]]
    # The people (user_ids) in this node's training and held-out data, and those of them with a record tagged with
    # one of the policy's special categories: what a transfer's volume rules count (client.transfers).
    people: frozenset[str] = frozenset()
    sensitive_people: frozenset[str] = frozenset()


def load_node_data(
    s: NodeSettings, policy: RegionPolicy, tokenizer, erased: Callable[[str], bool] | None = None
) -> NodeData:
    """Every data check of a node's start; any failure raises and nothing trains.

    `erased` tells the user_ids whose erasure was requested (client.erasure): their records are dropped
    before anything else reads them, so no cache, split, unit or audit of this node holds them.
    """
    roots = [os.path.realpath(r) for r in policy.residency.storage_roots]
    scan = scan_data_paths(s.data_paths)
    files = scan.files
    for file in files:
        real = os.path.realpath(file)
        if roots and not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
            raise ResidencyViolation(
                f"{file}: outside the storage locations this region's policy allows "
                f"({', '.join(policy.residency.storage_roots)}). The node refuses to start; move the data or "
                "fix policy.residency.storage_roots."
            )
    records = load_records(
        files,
        expected_region=s.region,
        plain_text_consent=s.plain_text_consent,
        allowed_regions=policy.residency.allowed_region_tags,
    )
    # This node's users first (partitioning users and filtering records commute): every count the node reports,
    # records and exclusions alike, is then its own, not the total of the folder its region's nodes split.
    records = client_partition(records, client_index=s.client_index, num_clients=s.num_clients)
    read = len(records)
    if erased is not None:
        records = [r for r in records if not erased(r.user_id)]
    raw = {id(r): r.text for r in records}
    kept, counts = apply_data_use(records, policy.data_use, s.state_dir / "cache")
    counts.update(records=read, excluded_erased=read - len(records))
    train, heldout = split_heldout(kept, fraction=s.heldout_fraction)
    train_raw_texts = [raw.get(id(r), r.text) for r in train]
    people = frozenset(r.user_id for r in train + heldout)
    # Special-category records are excluded from training, but the person's other records may still speak of it:
    # counting them as sensitive errs towards the stricter safeguard.
    special = set(policy.data_use.excluded_special_categories)
    sensitive = frozenset(r.user_id for r in records if special.intersection(r.fields.get("tags") or ())) & people
    if not train:
        raise PrivacyError(
            f"Node {s.name} has no training records after its policy's filters and the held-out split "
            f"({counts}). Add data or lower data.heldout_fraction."
        )
    canaries: list[Canary] = []
    if s.audit.enabled and (s.synthetic_data or s.audit.canaries_in_real_data):
        canaries = load_or_create(
            s.state_dir,
            s.audit.canary_formats,
            s.audit.canary_repetitions,
            s.audit.one_run_canaries,
            s.audit.one_run_repetitions,
        )
    record_examples = encode_units(group_units(train, PrivacyUnitKind.record), tokenizer, s.model.max_length)
    # Each canary copy is its own privacy unit, as a secret repeated in real data would be.
    train = train + [
        Record(c.text, s.region, f"canary-{i}-{copy}", True, {"canary": True})
        for i, c in enumerate(canaries)
        for copy in range(c.repetitions)
    ]
    unit = policy.privacy.unit
    units = group_units(train, unit)
    if policy.privacy.delta > 1.0 / len(units):
        raise PrivacyError(
            f"policy.privacy.delta={policy.privacy.delta:g} is larger than 1/N = 1/{len(units)} for the "
            f"{len(units)} privacy units ({unit.value}s) on node {s.name}: a mechanism could then publish a "
            f"whole unit and still meet the guarantee. Set policy.privacy.delta <= {1.0 / len(units):.3g}."
        )
    max_length = s.model.max_length
    train_examples, truncated_units, truncated_tokens = _encode(units, tokenizer, max_length)
    heldout_examples, truncated_heldout, _ = _encode(
        group_units(heldout, PrivacyUnitKind.record), tokenizer, max_length
    )
    counts.update(
        train_units=len(units),
        heldout_records=len(heldout),
        canary_copies=sum(c.repetitions for c in canaries),
        skipped_files=len(scan.skipped),
        truncated_units=truncated_units,
        truncated_tokens=truncated_tokens,
        truncated_heldout=truncated_heldout,
        people=len(people),
        sensitive_people=len(sensitive),
    )
    return NodeData(
        train_units=units,
        train_examples=train_examples,
        heldout_examples=heldout_examples,
        counts=counts,
        skipped_files=scan.skipped,
        canaries=canaries,
        train_raw_texts=train_raw_texts,
        record_examples=record_examples,
        people=people,
        sensitive_people=sensitive,
    )


def _encode(units, tokenizer, max_length: int) -> tuple[list[list[int]], int, int]:
    """Token ids per unit cut at max_length, how many units were cut, and how many tokens that dropped."""
    full = encode_units(units, tokenizer, None)
    cut = sum(len(ids) > max_length for ids in full)
    dropped = sum(max(0, len(ids) - max_length) for ids in full)
    return [ids[:max_length] for ids in full], cut, dropped


def apply_data_use(records: list[Record], use: DataUsePolicy, cache_dir: Path) -> tuple[list[Record], dict[str, int]]:
    """Consent, special categories, excluded fields and PII scrubbing, each counted.

    PII detection is most of a node's start time, and in deployment every message starts
    the node anew: the outcome is kept in the node's own state folder, keyed by the exact
    records and the data-use rules, so a changed record or rule recomputes it.
    """
    key = hashlib.sha256(
        json.dumps(
            [dataclasses.asdict(use), [(r.text, r.region, r.user_id, r.consent, dict(r.fields)) for r in records]],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    cache = cache_dir / f"data-use-{key[:32]}.json"
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved["key"] == key:
                kept = [
                    records[i]
                    if text is None
                    else Record(text, records[i].region, records[i].user_id, records[i].consent, records[i].fields)
                    for i, text in saved["kept"]
                ]
                return kept, saved["counts"]
        except (ValueError, KeyError, IndexError, TypeError):
            pass  # a damaged cache is recomputed, never trusted
    counts = {
        "records": len(records),
        "excluded_no_consent": 0,
        "excluded_special": 0,
        "excluded_fields": 0,
        "scrubbed_spans": 0,
    }
    special = set(use.excluded_special_categories)
    detector = PiiDetector(use.scrub_entities) if use.scrub_pii else None
    kept, kept_index = [], []
    for i, r in enumerate(records):
        if use.require_consent and not r.consent:
            counts["excluded_no_consent"] += 1
        elif special.intersection(r.fields.get("tags") or ()):
            counts["excluded_special"] += 1
        elif any(r.fields.get(f) not in (None, "", [], False) for f in use.excluded_fields):
            counts["excluded_fields"] += 1
        else:
            scrubbed = None
            if detector is not None:
                spans = detector.find(r.text)
                if spans:
                    counts["scrubbed_spans"] += len(spans)
                    scrubbed = detector.scrub(r.text, spans)
                    r = Record(scrubbed, r.region, r.user_id, r.consent, r.fields)
            kept.append(r)
            kept_index.append((i, scrubbed))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "kept": kept_index, "counts": counts}))
    os.replace(tmp, cache)
    # Older outcomes hold scrubbed copies of records that changed or were erased since: only the current one stays.
    for stale in cache_dir.glob("data-use-*.json"):
        if stale != cache:
            stale.unlink(missing_ok=True)
    return kept, counts
