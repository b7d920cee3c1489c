"""Where a node's coordinator is, decided by the node: pins in its own config folder.

A coordinator's word about its own jurisdiction proves nothing (an EU coordinator could say "CN"
to get a PIPL node to train). A node therefore reads the jurisdiction from `coordinators.yaml` in
its config folder: the coordinator it reaches over TLS is identified by the fingerprint of the CA
that signed its certificate (`fedsov node trust` adds one), and a coordinator on this machine
(`fedsov simulate`, `fedsov deploy local`, plaintext test setups) by the `local` entry. A plan that
declares another jurisdiction than the pinned one is refused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

PINS_FILE = "coordinators.yaml"
JURISDICTION = re.compile(r"[A-Za-z0-9*_-]{1,32}")
LOCAL = "local"


@dataclass(frozen=True)
class CoordinatorPin:
    name: str
    jurisdiction: str
    ca_sha256: str | None  # None: the coordinator on this machine


def ca_fingerprint(ca_cert: Path) -> str:
    """SHA-256 of the CA certificate (DER), as `openssl x509 -fingerprint -sha256` prints it, lower-case hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{ca_cert}: not a readable PEM certificate ({err}). Pass the coordinator's CA file."
        ) from err
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def load_pins(config_dir: Path) -> list[CoordinatorPin]:
    """Every pin in `<config_dir>/coordinators.yaml`, validated; a missing or broken file is an error."""
    from omegaconf import OmegaConf

    path = Path(config_dir) / PINS_FILE
    if not path.is_file():
        raise ConfigError(
            f"No {PINS_FILE} in {config_dir}: a node needs to know where its coordinator is. Copy fedsov's "
            f"configs/{PINS_FILE} there and set local.jurisdiction, or pin a coordinator with `fedsov node trust`."
        )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # YAML syntax errors come in several types
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict) or set(raw) - {LOCAL, "pinned"}:
        raise ConfigError(f"{path}: expected the keys '{LOCAL}' and 'pinned' only. See fedsov's configs/{PINS_FILE}.")
    pins = []
    local = raw.get(LOCAL)
    if local is not None:
        pins.append(_pin(path, LOCAL, local, ca=False))
    for i, entry in enumerate(raw.get("pinned") or []):
        pins.append(_pin(path, f"pinned[{i}]", entry, ca=True))
    return pins


def _pin(path: Path, where: str, entry: object, *, ca: bool) -> CoordinatorPin:
    expected = {"name", "jurisdiction", "ca_sha256"} if ca else {"jurisdiction"}
    if not isinstance(entry, dict) or set(entry) != expected:
        raise ConfigError(f"{path}: {where} must have exactly the keys {sorted(expected)}.")
    jurisdiction = str(entry["jurisdiction"])
    if not JURISDICTION.fullmatch(jurisdiction) or jurisdiction == "*":
        raise ConfigError(
            f"{path}: {where}.jurisdiction = {jurisdiction!r} is not a jurisdiction code (e.g. EU, US-CA)."
        )
    fingerprint = None
    if ca:
        fingerprint = str(entry["ca_sha256"]).lower().replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise ConfigError(f"{path}: {where}.ca_sha256 must be a SHA-256 fingerprint (64 hex digits).")
    return CoordinatorPin(str(entry.get("name", LOCAL)), jurisdiction, fingerprint)


def local_jurisdiction(config_dir: Path) -> str:
    for pin in load_pins(config_dir):
        if pin.ca_sha256 is None:
            return pin.jurisdiction
    raise ConfigError(
        f"{Path(config_dir) / PINS_FILE} has no '{LOCAL}' entry, so this node does not know where a coordinator on "
        f"this machine is. Add `{LOCAL}: {{jurisdiction: EU}}` (your machine's jurisdiction)."
    )


def jurisdiction_for_ca(config_dir: Path, ca_cert: Path) -> str:
    fingerprint = ca_fingerprint(ca_cert)
    for pin in load_pins(config_dir):
        if pin.ca_sha256 == fingerprint:
            return pin.jurisdiction
    raise ConfigError(
        f"The coordinator CA {ca_cert} (sha256 {fingerprint}) is not pinned in {Path(config_dir) / PINS_FILE}, so "
        "this node cannot tell where that coordinator is. After checking the fingerprint with the coordinator's "
        f"operator, run `fedsov node trust --ca {ca_cert} --jurisdiction <where it is> --name <a label>`."
    )


def add_pin(config_dir: Path, name: str, ca_cert: Path, jurisdiction: str) -> str:
    """Pin a coordinator CA to a jurisdiction in the node's own config folder; returns the fingerprint."""
    from omegaconf import OmegaConf

    if not JURISDICTION.fullmatch(jurisdiction) or jurisdiction == "*":
        raise ConfigError(f"--jurisdiction {jurisdiction!r} is not a jurisdiction code (e.g. EU, US-CA, CN).")
    fingerprint = ca_fingerprint(ca_cert)
    path = Path(config_dir) / PINS_FILE
    pins = load_pins(config_dir) if path.is_file() else []
    for pin in pins:
        if pin.ca_sha256 == fingerprint and pin.jurisdiction != jurisdiction:
            raise ConfigError(
                f"{ca_cert} is already pinned to {pin.jurisdiction} as '{pin.name}' in {path}; edit the file if the "
                "coordinator really moved."
            )
    if any(pin.ca_sha256 == fingerprint for pin in pins):
        return fingerprint
    local = next((p for p in pins if p.ca_sha256 is None), None)
    data: dict = {}
    if local:
        data[LOCAL] = {"jurisdiction": local.jurisdiction}
    data["pinned"] = [
        {"name": p.name, "jurisdiction": p.jurisdiction, "ca_sha256": p.ca_sha256} for p in pins if p.ca_sha256
    ] + [{"name": name, "jurisdiction": jurisdiction, "ca_sha256": fingerprint}]
    header = "".join(line + "\n" for line in _header(path))
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(data)))
    return fingerprint


def _header(path: Path) -> list[str]:
    if not path.is_file():
        return ["# Coordinators this node trusts and where each is (see fedsov's configs/coordinators.yaml)."]
    return [line for line in path.read_text().splitlines() if line.startswith("#")]
