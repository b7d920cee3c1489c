"""The Record type and loading a region's data files (JSONL, plain text, Parquet) into Records."""

from __future__ import annotations

import datetime
import decimal
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from common.errors import DataError, ResidencyViolation

REQUIRED_FIELDS = ("text", "region", "user_id", "consent")
SUPPORTED_SUFFIXES = (".jsonl", ".txt", ".parquet")

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
        raise ValueError(f"Record {r.user_id!r} repeats required field(s) {clash} inside `fields`; "
                         f"keep only {list(REQUIRED_FIELDS)} outside `fields` and rename the extra key.")
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
        if file.suffix.lower() == ".jsonl":
            loaded = _load_jsonl(file)
        elif file.suffix.lower() == ".parquet":
            loaded = _load_parquet(file)
        else:
            loaded = _load_text(file, expected_region, plain_text_consent)
        if not loaded:
            raise DataError(f"{file}: the file holds no records; add records or remove the file from the data paths.")
        allowed = set(allowed_regions) if allowed_regions is not None else (
            {expected_region} if expected_region is not None else None)
        if allowed is not None:
            for where, r in loaded:
                if r.region not in allowed:
                    raise ResidencyViolation(
                        f"{file} {where}: record region {r.region!r} does not match this node's region "
                        f"{expected_region or ''!r} (allowed here: {', '.join(sorted(allowed))}); data must stay in "
                        f"its jurisdiction, so move the record to the {r.region!r} node's data or correct its region "
                        "field. Nothing was trained.")
        records.extend(r for _, r in loaded)
    return records


def data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files under `paths`, in the order load_records reads them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder; fix the path in the region's data.paths or create it.")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder holds no data files ({', '.join('*' + s for s in SUPPORTED_SUFFIXES)}, "
                                f"searched recursively); put the region's data there or fix data.paths.")
            files.extend(found)
        elif p.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(p)
        else:
            raise DataError(f"{p}: unsupported file type {p.suffix or '(no suffix)'!r}; supported are "
                            f"{', '.join(SUPPORTED_SUFFIXES)}; convert the file to JSONL (one object per line).")
    return files


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
            raise DataError(f"{file} line {lineno}: expected a JSON object, got {type(row).__name__}; write one "
                            f'object per line like {{"text": ..., "region": ..., "user_id": ..., "consent": ...}}.')
        loaded.append((f"line {lineno}", _to_record(row, file, f"line {lineno}")))
    return loaded


def _load_parquet(file: Path) -> list[tuple[str, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a readable Parquet file ({e}); re-export it as Parquet or convert it "
                        f"to JSONL.") from e
    missing = [c for c in REQUIRED_FIELDS if c not in table.column_names]
    if missing:
        raise DataError(f"{file}: Parquet file lacks column(s) {missing} (has {table.column_names}); every file "
                        f"needs columns {list(REQUIRED_FIELDS)}.")
    return [(f"row {i}", _to_record(row, file, f"row {i}")) for i, row in enumerate(table.to_pylist(), start=1)]


def _load_text(file: Path, expected_region: str | None, consent: bool | None) -> list[tuple[str, Record]]:
    region_key = expected_region or "<region>"
    if consent is None:
        raise DataError(f"{file}: plain-text files carry no consent field; attest consent for the whole file by "
                        f"setting regions.{region_key}.data.plain_text_consent=true (or false to exclude its lines "
                        f"from training), or convert it to JSONL with a consent field per record.")
    if expected_region is None:
        raise DataError(f"{file}: plain-text files carry no region field; load them with expected_region set to "
                        f"the node's region, or convert them to JSONL with a region field per record.")
    # Each line is its own privacy unit: nothing links two lines to the same person.
    return [(f"line {lineno}", Record(text=line.strip(), region=expected_region,
                                      user_id=f"{file.name}:{lineno}", consent=consent))
            for lineno, line in _utf8_lines(file) if line.strip()]


def _utf8_lines(file: Path) -> Iterator[tuple[int, str]]:
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file} line {lineno}: bytes are not valid UTF-8 ({e.reason} at byte {e.start}); "
                                f"the file must be UTF-8, so re-save it with UTF-8 encoding.") from e
            yield lineno, (line.removeprefix("\ufeff") if lineno == 1 else line)


def _to_record(row: dict, file: Path, where: str) -> Record:
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise DataError(f"{file} {where}: missing required field(s) {missing}; every record needs "
                        f"{list(REQUIRED_FIELDS)}.")
    for name, (valid, expected, example) in _FIELD_TYPES.items():
        value = row[name]
        if not valid(value):
            raise DataError(f"{file} {where}: field {name!r} must be {expected}, got {type(value).__name__} "
                            f"({value!r:.40}); write it like {example}.")
    extra = {k: _json_value(v, file, where, k) for k, v in row.items() if k not in REQUIRED_FIELDS}
    return Record(text=row["text"], region=row["region"], user_id=row["user_id"], consent=row["consent"],
                  fields=extra)


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
    raise DataError(f"{file} {where}: field {name!r} holds a {type(value).__name__}, which JSON cannot store; "
                    f"convert that column to text or numbers.")
