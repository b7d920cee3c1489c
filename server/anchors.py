"""Anchors: the ledger and audit-log heads each node reported, kept by the coordinator across runs.

A node's evidence is keyed (common.audit), so nobody without its key can rewrite it; what a key
cannot show is a node's whole state deleted, replaced or rolled back to an older copy. The
coordinator keeps every node's last reported heads here, compares them with what the node reports
when the next run starts, and sends them back so the node checks its own chain contains them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FIELDS = ("ledger-genesis", "ledger-entries", "ledger-head", "audit-genesis", "audit-entries", "audit-head")


class AnchorStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._anchors: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, node: str) -> dict[str, Any] | None:
        return self._anchors.get(node)

    def problem(self, node: str, evidence: Mapping[str, Any]) -> str | None:
        """Why `evidence` cannot follow from the anchor kept for `node` (None if it can, or if there is none)."""
        anchor = self._anchors.get(node)
        if anchor is None:
            return None
        for log in ("ledger", "audit"):
            if evidence[f"{log}-genesis"] != anchor[f"{log}-genesis"]:
                return (
                    f"its {log} is not the one it reported in run {anchor['run']} (a different first entry): "
                    "the node's state was deleted or replaced"
                )
            if int(evidence[f"{log}-entries"]) < int(anchor[f"{log}-entries"]):
                return (
                    f"its {log} has {evidence[f'{log}-entries']} entries, fewer than the {anchor[f'{log}-entries']} "
                    f"it reported in run {anchor['run']}: entries were cut or an old copy was restored"
                )
        return None

    def ledger_anchor(self, node: str) -> dict[str, Any] | None:
        """What the node must find in its own ledger (sent with each train message)."""
        anchor = self._anchors.get(node)
        if anchor is None or int(anchor["ledger-entries"]) < 1:
            return None
        return {k: anchor[k] for k in ("ledger-genesis", "ledger-entries", "ledger-head")}

    def record(self, node: str, region: str, evidence: Mapping[str, Any], run: str) -> None:
        self._anchors[node] = {**{k: evidence[k] for k in FIELDS}, "region": region, "run": run}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".anchors-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self._anchors, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def snapshot(self, nodes: list[str]) -> dict[str, dict[str, Any]]:
        return {n: dict(self._anchors[n]) for n in nodes if n in self._anchors}
