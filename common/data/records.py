"""The Record type and loading a region's data files (JSONL, gzipped JSONL, JSON, plain text, Parquet)."""

from __future__ import annotations

import datetime
import decimal
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import DataError, ResidencyViolation

REQUIRED_FIELDS = ("text", "region", "user_id", "consent")
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt", ".parquet")
# fedsov's record of how it generated a synthetic data folder: metadata, not records.
SYNTHETIC_MANIFEST = "fedsov-data.json"
# Notes kept beside the data; skipped and listed. Any other unknown type is an error: it may hold records.
DOCUMENTATION_SUFFIXES = (".md", ".rst")
# Formats people keep records in that fedsov does not read, and the fix for each.
_UNSUPPORTED_WHY = {
    ".csv": "CSV cells carry no types (consent must be a boolean, tags a list); convert it to JSONL",
    ".tsv": "TSV cells carry no types (consent must be a boolean, tags a list); convert it to JSONL",
    ".gz": "of the compressed formats only .jsonl.gz is read; decompress it or recompress it as .jsonl.gz",
}

# Field name -> (check, expected type in words, example of a valid value).
_FIELD_TYPES = {
    "text": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", '"text": "My order..."'),
    "region": (lambda v: isinstance(v, str) and v != "", "a non-empty string", '"region": "eu"'),
    "user_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string", '"user_id": "12345"'),
    "consent": (lambda v: isinstance(v, bool), "a boolean", '"consent": true'),
}


@dataclass(frozen=True)
class Record:
    """One piece of personal text; user_id is the privacy unit, consent says whether it may train."""

    text: str
    region: str
    user_id: str
    consent: bool
    # hash=False keeps Records hashable although fields is a dict.
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)


def record_to_dict(r: Record) -> dict:
    """The JSONL form of a record: the required fields first, then every other field at top level."""
    row = {"text": r.text, "region": r.region, "user_id": r.user_id, "consent": r.consent}
    clash = sorted(set(row) & set(r.fields))
    if clash:
        raise ValueError(
            f"Record {r.user_id!r} repeats required field(s) {clash} inside `fields`; "
            f"keep only {list(REQUIRED_FIELDS)} outside `fields` and rename the extra key."
        )
    row.update(r.fields)
    return row


def write_jsonl(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write records as UTF-8 JSONL via a temp file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_records(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    expected_region: str | None = None,
    plain_text_consent: bool | None = None,
    allowed_regions: Sequence[str] | None = None,
) -> list[Record]:
    """Load every record from the given files and folders (folders searched recursively, sorted).

    Records must carry `expected_region`, or one of `allowed_regions` when given (a region's
    residency rule); plain-text lines are tagged with `expected_region`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list[Record] = []
    for file in data_files(paths):
        kind = _suffix(file)
        if kind in (".jsonl", ".jsonl.gz"):
            loaded = _load_jsonl(file)
        elif kind == ".json":
            loaded = _load_json(file)
        elif kind == ".parquet":
            loaded = _load_parquet(file)
        else:
            loaded = _load_text(file, expected_region, plain_text_consent)
        if not loaded:
            raise DataError(f"{file}: the file holds no records; add records or remove the file from the data paths.")
        allowed = (
            set(allowed_regions)
            if allowed_regions is not None
            else ({expected_region} if expected_region is not None else None)
        )
        if allowed is not None:
            for where, r in loaded:
                if r.region not in allowed:
                    raise ResidencyViolation(
                        f"{file} {where}: record region {r.region!r} does not match this node's region "
                        f"{expected_region or ''!r} (allowed here: {', '.join(sorted(allowed))}); data must stay in "
                        f"its jurisdiction, so move the record to the {r.region!r} node's data or correct its region "
                        "field. Nothing was trained."
                    )
        records.extend(r for _, r in loaded)
    return records


@dataclass(frozen=True)
class DataScan:
    """The data files under some paths, and the files found in their folders that are not read, with why."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


def data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files under `paths`, in the order load_records reads them."""
    return scan_data_paths(paths).files


def scan_data_paths(paths: Sequence[str | os.PathLike]) -> DataScan:
    """Every file under `paths` is read, or skipped with a reason (hidden, documentation, fedsov's manifest).

    A file of a type fedsov does not read is an error, never silently dropped: it may hold records.
    """
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    unsupported: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder; fix the path in the region's data.paths or create it.")
        if not p.is_dir():
            if _suffix(p) not in SUPPORTED_SUFFIXES:
                raise DataError(f"{p}: {_unsupported_why(p)}; fedsov reads {', '.join(SUPPORTED_SUFFIXES)}.")
            files.append(p)
            continue
        found = []
        for f in sorted(f for f in p.rglob("*") if f.is_file()):
            if f.name.startswith("."):
                skipped.append((f, "hidden file"))
            elif f.name == SYNTHETIC_MANIFEST:
                skipped.append((f, "fedsov's record of how it generated this synthetic data, not records"))
            elif f.suffix.lower() in DOCUMENTATION_SUFFIXES:
                skipped.append((f, "documentation, not records"))
            elif _suffix(f) in SUPPORTED_SUFFIXES:
                found.append(f)
            else:
                unsupported.append(f"{f} ({_unsupported_why(f)})")
        if not found and not unsupported:
            raise DataError(
                f"{p}: folder holds no data files ({', '.join('*' + s for s in SUPPORTED_SUFFIXES)}, "
                f"searched recursively); put the region's data there or fix data.paths."
            )
        files.extend(found)
    if unsupported:
        shown = "; ".join(unsupported[:5]) + (f"; and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        raise DataError(
            f"{len(unsupported)} file(s) in the data folders are not in a format fedsov reads, and could "
            f"hold records: {shown}. fedsov reads {', '.join(SUPPORTED_SUFFIXES)}; convert them or move "
            "them out of the data folders."
        )
    return DataScan(files, skipped)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def _unsupported_why(path: Path) -> str:
    suffix = path.suffix.lower()
    return _UNSUPPORTED_WHY.get(
        suffix,
        f"not a data file type fedsov reads ({suffix or 'no suffix'}); convert it to JSONL (one object per line)",
    )


def _load_jsonl(file: Path) -> list[tuple[str, Record]]:
    loaded = []
    for lineno, line in _utf8_lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} line {lineno}: invalid JSON ({e}); write exactly one JSON object per line.") from e
        if not isinstance(row, dict):
            raise DataError(
                f"{file} line {lineno}: expected a JSON object, got {type(row).__name__}; write one "
                f'object per line like {{"text": ..., "region": ..., "user_id": ..., "consent": ...}}.'
            )
        loaded.append((f"line {lineno}", _to_record(row, file, f"line {lineno}")))
    return loaded


def _load_json(file: Path) -> list[tuple[str, Record]]:
    text = "".join(line for _, line in _utf8_lines(file))
    if not text.strip():
        return []
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        hint = (
            " It looks like JSON Lines (one object per line): rename it to .jsonl."
            if e.msg == "Extra data"
            else " Write one JSON array of record objects, or use JSON Lines (.jsonl)."
        )
        raise DataError(f"{file} line {e.lineno}: invalid JSON ({e.msg}).{hint}") from e
    if not isinstance(rows, list):
        raise DataError(
            f"{file}: expected a JSON array of record objects, got a {type(rows).__name__}; write "
            f'[{{"text": ..., "region": ..., "user_id": ..., "consent": ...}}, ...] or use JSON Lines.'
        )
    loaded = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(
                f"{file} item {number}: expected a JSON object, got {type(row).__name__}; every item "
                f'is a record like {{"text": ..., "region": ..., "user_id": ..., "consent": ...}}.'
            )
        loaded.append((f"item {number}", _to_record(row, file, f"item {number}")))
    return loaded


def _load_parquet(file: Path) -> list[tuple[str, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{file}: not a readable Parquet file ({e}); re-export it as Parquet or convert it to JSONL."
        ) from e
    missing = [c for c in REQUIRED_FIELDS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{file}: Parquet file lacks column(s) {missing} (has {table.column_names}); every file "
            f"needs columns {list(REQUIRED_FIELDS)}."
        )
    return [(f"row {i}", _to_record(row, file, f"row {i}")) for i, row in enumerate(table.to_pylist(), start=1)]


def _load_text(file: Path, expected_region: str | None, consent: bool | None) -> list[tuple[str, Record]]:
    region_key = expected_region or "<region>"
    if consent is None:
        raise DataError(
            f"{file}: plain-text files carry no consent field; attest consent for all its lines with "
            f"--plain-text-consent true (fedsov node start, fedsov data check), "
            f"regions.{region_key}.data.plain_text_consent=true (fedsov simulate, fedsov deploy local) or "
            f"plain-text-consent=true (a SuperNode's --node-config); false excludes its lines from "
            f"training. Or convert it to JSONL with a consent field per record."
        )
    if expected_region is None:
        raise DataError(
            f"{file}: plain-text files carry no region field; load them with expected_region set to "
            f"the node's region, or convert them to JSONL with a region field per record."
        )
    # Each line is its own privacy unit: nothing links two lines to the same person.
    return [
        (
            f"line {lineno}",
            Record(text=line.strip(), region=expected_region, user_id=f"{file.name}:{lineno}", consent=consent),
        )
        for lineno, line in _utf8_lines(file)
        if line.strip()
    ]


def _utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if _suffix(file) == ".jsonl.gz" else open
    try:
        with opener(file, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{file} line {lineno}: bytes are not valid UTF-8 ({e.reason} at byte {e.start}); "
                        f"the file must be UTF-8, so re-save it with UTF-8 encoding."
                    ) from e
                yield lineno, (line.removeprefix("\ufeff") if lineno == 1 else line)
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{file}: not a complete gzip file ({e}); compress the JSONL again with gzip.") from e
    except OSError as e:
        raise DataError(
            f"{file}: cannot read it ({e.strerror or e}); fix its permissions or remove it from the data paths."
        ) from e


def _to_record(row: dict, file: Path, where: str) -> Record:
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise DataError(
            f"{file} {where}: missing required field(s) {missing}; every record needs {list(REQUIRED_FIELDS)}."
        )
    for name, (valid, expected, example) in _FIELD_TYPES.items():
        value = row[name]
        if not valid(value):
            raise DataError(
                f"{file} {where}: field {name!r} must be {expected}, got {type(value).__name__} "
                f"({value!r:.40}); write it like {example}."
            )
    tags = row.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        # A tag given as a bare string would be matched letter by letter and escape the special-category rule.
        raise DataError(
            f"{file} {where}: field 'tags' must be a list of strings, got {type(tags).__name__} "
            f'({tags!r:.40}); write it like "tags": ["special:health"].'
        )
    extra = {k: _json_value(v, file, where, k) for k, v in row.items() if k not in REQUIRED_FIELDS}
    return Record(text=row["text"], region=row["region"], user_id=row["user_id"], consent=row["consent"], fields=extra)


def _json_value(value: Any, file: Path, where: str, name: str) -> Any:
    # Parquet yields dates, timestamps and decimals; fields must stay JSON-serialisable for write_jsonl.
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, list):
        return [_json_value(v, file, where, name) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v, file, where, name) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise DataError(
        f"{file} {where}: field {name!r} holds a {type(value).__name__}, which JSON cannot store; "
        f"convert that column to text or numbers."
    )
