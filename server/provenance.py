"""Model provenance: the manifest that travels with an adapter, and exports that respect it.

The manifest records which regions contributed, under which policy (the hash each node
reported of its own policy), what epsilon they spent and where each allows the model to go.
`export_adapter` refuses a destination jurisdiction that any contributing region forbids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from common.audit import AuditLog, EvidenceKey
from common.errors import ConfigError, PolicyViolation
from common.policy import ANY

MANIFEST = "fedsov-manifest.json"


def write_manifest(adapter_dir: Path, manifest: dict[str, Any]) -> Path:
    path = adapter_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return path


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / MANIFEST
    if not path.is_file():
        raise PolicyViolation(
            f"{adapter_dir} has no {MANIFEST}: without provenance fedsov cannot tell which regions' rules apply, "
            "so it will not export it."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise PolicyViolation(f"{path} is not valid JSON ({err}): the provenance is damaged, so fedsov will not "
                              "export or use the adapter. Restore it from a copy of the run directory.") from err


def export_blockers(manifest: dict[str, Any], jurisdiction: str) -> dict[str, str]:
    """Contributing regions that forbid deploying the model in `jurisdiction`, with why."""
    blockers = {}
    for region, info in manifest["contributing_regions"].items():
        allowed = info["allowed_deployment"]
        if ANY not in allowed and jurisdiction not in allowed:
            blockers[region] = f"{info['law']} policy allows deployment only in {', '.join(allowed)}"
    return blockers


def export_adapter(run_dir: Path, destination: Path, jurisdiction: str) -> Path:
    """Copy the run's adapter (with its manifest) to `destination`, if every contributor allows it."""
    adapter = run_dir / "adapter"
    manifest = read_manifest(adapter)
    from server.rundir import RunDirectory

    # An export is a decision the coordinator's audit log must record: without its key, nothing is exported.
    key = EvidenceKey.load(RunDirectory(run_dir).coordinator_key_dir)
    audit = AuditLog(run_dir / "audit.jsonl", actor="coordinator", key=key)
    blockers = export_blockers(manifest, jurisdiction)
    if blockers:
        why = "; ".join(f"{r}: {b}" for r, b in blockers.items())
        audit.record("export", "refused", reason=f"to {destination} in {jurisdiction}: {why}")
        raise PolicyViolation(
            f"Export to {jurisdiction} refused: {why}. Nothing was copied. Choose a destination every "
            "contributing region allows, or train without those regions."
        )
    if destination.exists() and not destination.is_dir():
        raise ConfigError(f"Export destination {destination} is a file; choose an empty or new folder with --to.")
    if destination.exists() and any(destination.iterdir()):
        raise PolicyViolation(f"Export destination {destination} is not empty; choose an empty or new folder.")
    shutil.copytree(adapter, destination, dirs_exist_ok=True)
    audit.record("export", "accepted", reason=f"to {destination} in {jurisdiction}: allowed by every contributing region")
    return destination
