"""One schema check for every record that arrives from the other side of the wire.

A node treats everything the coordinator sends as hostile: each field is typed and ranged here,
before any code uses it. Booleans are not integers, integers are not floats' NaN, strings are
short and drawn from a fixed alphabet, lists are bounded and their items checked. A record with
a missing, unknown or out-of-range field is refused as a whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import FedsovError


class SchemaError(FedsovError):
    """A record from the other party does not have the protocol's shape; nothing was used from it."""


class Spec:
    """How one field may look; `check` returns the value in its Python form or raises SchemaError."""

    required = True

    def check(self, value: Any, name: str) -> Any:
        raise NotImplementedError


def _fail(name: str, value: Any, rule: str) -> SchemaError:
    shown = repr(value)
    return SchemaError(f"field '{name}' = {shown[:80]}{'...' if len(shown) > 80 else ''}: {rule}")


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    def check(self, value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(name, value, "must be a whole number")
        if not self.lo <= value <= self.hi:
            raise _fail(name, value, f"must be in [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Float(Spec):
    """A finite number in [lo, hi]; `open_lo`/`open_hi` exclude the bound."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def check(self, value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(name, value, "must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise _fail(name, value, "must be finite")
        low_ok = value > self.lo if self.open_lo else value >= self.lo
        high_ok = value < self.hi if self.open_hi else value <= self.hi
        if not (low_ok and high_ok):
            lb, hb = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
            raise _fail(name, value, f"must be in {lb}{self.lo:g}, {self.hi:g}{hb}")
        return value


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise _fail(name, value, "must be true or false")
        return value


@dataclass(frozen=True)
class Text(Spec):
    max_length: int
    pattern: str = r"[A-Za-z0-9._:/#*+-]*"

    def check(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise _fail(name, value, "must be a string")
        if len(value) > self.max_length:
            raise _fail(name, value, f"must be at most {self.max_length} characters")
        if not re.fullmatch(self.pattern, value):
            raise _fail(name, value, f"must match {self.pattern}")
        return value


@dataclass(frozen=True)
class Blob(Spec):
    """Bytes of exactly `size` (or at most `max_size`)."""

    size: int | None = None
    max_size: int | None = None

    def check(self, value: Any, name: str) -> bytes:
        if not isinstance(value, bytes):
            raise _fail(name, value, "must be bytes")
        if self.size is not None and len(value) != self.size:
            raise _fail(name, f"<{len(value)} bytes>", f"must be exactly {self.size} bytes")
        if self.max_size is not None and len(value) > self.max_size:
            raise _fail(name, f"<{len(value)} bytes>", f"must be at most {self.max_size} bytes")
        return value


@dataclass(frozen=True)
class Items(Spec):
    """A list of at most `max_items` values, each checked by `item`; `distinct` refuses repeats."""

    item: Spec
    max_items: int
    min_items: int = 0
    distinct: bool = False

    def check(self, value: Any, name: str) -> list:
        if not isinstance(value, list):
            raise _fail(name, value, "must be a list")
        if not self.min_items <= len(value) <= self.max_items:
            raise _fail(name, f"<{len(value)} items>", f"must hold {self.min_items} to {self.max_items} items")
        out = [self.item.check(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if self.distinct and len(set(out)) != len(out):
            raise _fail(name, value, "must not repeat an item")
        return out


@dataclass(frozen=True)
class Optional(Spec):
    """A field that may be absent (records have no null); absent means None."""

    inner: Spec
    required = False

    def check(self, value: Any, name: str) -> Any:
        return self.inner.check(value, name)


def check_record(record: Mapping[str, Any], fields: Mapping[str, Spec], what: str) -> dict[str, Any]:
    """Every field of `fields` checked, none missing, none unknown; raises SchemaError naming `what`."""
    try:
        keys = set(record.keys())
    except AttributeError as err:
        raise SchemaError(f"{what}: not a record") from err
    unknown = sorted(keys - set(fields))
    missing = sorted(k for k, spec in fields.items() if spec.required and k not in keys)
    if unknown or missing:
        raise SchemaError(f"{what}: unknown fields {unknown[:5]}, missing fields {missing[:5]}")
    out: dict[str, Any] = {}
    for key, spec in fields.items():
        if key in keys:
            try:
                out[key] = spec.check(record[key], key)
            except SchemaError as err:
                raise SchemaError(f"{what}: {err}") from err
        else:
            out[key] = None
    return out
