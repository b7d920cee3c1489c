"""The run directory: resolved config, events, per-round metrics, checkpoints, final adapter.

Layout:
  config.yaml          the resolved configuration actually used
  events.jsonl         progress events (what the CLI shows while the run goes)
  metrics.jsonl        one line per round (round 0 = before training)
  checkpoints/round-NNNN/   PEFT adapter folder + checkpoint.json, the last few kept
  adapter/             the final global adapter (PEFT format) and its provenance manifest
  summary.json         the end-of-run summary
  audit-results.json   each node's memorisation-audit numbers
  report/              the privacy report (HTML, Markdown, JSON, plots)
  audit.jsonl          the coordinator's hash-chained audit log
  tensorboard/         TensorBoard event files of the same metrics (tracking.tensorboard)
  .hydra/overrides.yaml  the command-line overrides the run was started with
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.audit import AuditLog, EvidenceKey
from common.errors import FederationError

CHECKPOINT_INFO = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    path: Path
    info: dict[str, Any]


EVENT_LINE = "FEDSOV-EVENT "
# A deployed coordinator publishes a finished run's outputs into its Flower log (server.runcontrol).
OUTPUT_LINE = "FEDSOV-OUTPUT "


class RunDirectory:
    def __init__(self, path: Path | str, *, echo_events: bool = False):
        self.path = Path(path)
        # In deployment the launcher may be on another machine: it follows events in Flower's run log.
        self.echo_events = echo_events
        self.config_path = self.path / "config.yaml"
        self.events_path = self.path / "events.jsonl"
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints_dir = self.path / "checkpoints"
        self.adapter_dir = self.path / "adapter"
        self.summary_path = self.path / "summary.json"
        self.audit_results_path = self.path / "audit-results.json"
        self.report_dir = self.path / "report"
        self.logs_dir = self.path / "logs"
        self.hydra_dir = self.path / ".hydra"
        # Set by the ServerApp: TensorBoard / MLflow writers that see each metrics row too (server.tracking).
        self.trackers = None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def home(self) -> Path:
        """The coordinator's folder above `runs/` (its evidence key and the nodes' anchors live there); a run
        directory kept anywhere else is its own home."""
        return self.path.parent.parent if self.path.parent.name == "runs" else self.path

    @property
    def coordinator_key_dir(self) -> Path:
        return self.home / "keys" / "coordinator"

    @property
    def anchors_path(self) -> Path:
        return self.home / "evidence-anchors.json"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)

    def event(self, kind: str, **fields: Any) -> None:
        entry = {"time": _now(), "event": kind, **fields}
        _append_json(self.events_path, entry)
        if self.echo_events:
            print(EVENT_LINE + json.dumps(entry, default=str), flush=True)

    def metrics(self, row: dict[str, Any]) -> None:
        _append_json(self.metrics_path, row)
        if self.trackers is not None:
            self.trackers.log(row)

    def write_overrides(self, overrides: list[str]) -> None:
        """The command-line overrides of this run, where Hydra users look for them (.hydra/overrides.yaml)."""
        import yaml

        self.hydra_dir.mkdir(parents=True, exist_ok=True)
        (self.hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides), default_flow_style=False))

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def read_events(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.events_path)

    def save_checkpoint(self, round_number: int, write_adapter: Callable[[Path], None], info: dict, keep: int) -> Path:
        """Write checkpoints/round-NNNN atomically, then drop all but the newest `keep`."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"round-{round_number:04d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.checkpoints_dir))
        try:
            write_adapter(tmp)
            (tmp / CHECKPOINT_INFO).write_text(json.dumps({"round": round_number, **info}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self._checkpoint_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Checkpoint | None:
        dirs = self._checkpoint_dirs()
        if not dirs:
            return None
        latest = dirs[-1]
        try:
            info = json.loads((latest / CHECKPOINT_INFO).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FederationError(
                f"Checkpoint {latest} is unreadable ({err}); remove it to resume from the one before."
            ) from err
        return Checkpoint(round=int(info["round"]), path=latest, info=info)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_json_atomic(self.summary_path, summary)

    def write_audit_results(self, results: dict[str, Any]) -> None:
        _write_json_atomic(self.audit_results_path, results)

    def read_audit_results(self) -> dict[str, Any] | None:
        if not self.audit_results_path.exists():
            return None
        return json.loads(self.audit_results_path.read_text())

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())

    def _checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints_dir.exists():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("round-*") if (p / CHECKPOINT_INFO).is_file())


def branch_run(origin: RunDirectory, round_number: int, destination: Path | None = None) -> RunDirectory:
    """A new run directory that continues `origin` from its checkpoint of `round_number`, to resume like any run.

    Retraining without data that joined later (say, a person whose erasure was requested) starts from a
    checkpoint that predates it. The branch gets the origin's config, that checkpoint (file times kept, so its
    retention runs on) and the origin's metrics up to that round; `resume=<branch>` then trains the later rounds.
    """
    if not origin.config_path.is_file():
        raise FederationError(f"{origin.path} holds no config.yaml: not a fedsov run directory.")
    checkpoint = origin.checkpoints_dir / f"round-{round_number:04d}"
    if not (checkpoint / CHECKPOINT_INFO).is_file():
        kept = [int(p.name.split("-")[1]) for p in origin._checkpoint_dirs()]
        raise FederationError(
            f"{origin.path} keeps no checkpoint of round {round_number} (kept: {', '.join(map(str, kept)) or 'none'}; "
            "federation.keep_checkpoints and the regions' retention decide how many stay). Choose a kept round, or "
            "start a new run from round 0."
        )
    if destination is None:
        destination = origin.path.parent / f"{origin.run_id}-from-round-{round_number}"
        n = 1
        while destination.exists():
            n += 1
            destination = origin.path.parent / f"{origin.run_id}-from-round-{round_number}-{n}"
    if destination.exists() and any(destination.iterdir()):
        raise FederationError(f"{destination} is not empty; choose a new folder with --to.")
    branch = RunDirectory(destination)
    branch.create()
    shutil.copy2(origin.config_path, branch.config_path)
    shutil.copytree(checkpoint, branch.checkpoints_dir / checkpoint.name)
    for row in origin.read_metrics():
        if row["round"] <= round_number:
            branch.metrics(row)
    branch.event("branched", from_run=str(origin.path), from_round=round_number, checkpoint=str(checkpoint))
    key = EvidenceKey.load_or_create(branch.coordinator_key_dir, logs=(branch.path / "audit.jsonl",))
    AuditLog(branch.path / "audit.jsonl", actor="coordinator", key=key).record(
        "run", "branched", reason=f"from {origin.path} at its round-{round_number} checkpoint", round=round_number
    )
    return branch


def json_number(x: float | None) -> float | str | None:
    """JSON has no infinity: epsilon without DP is written as the string "inf"."""
    if x is None:
        return None
    return "inf" if math.isinf(x) else x


def _append_json(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_events(log_text: str) -> list[dict]:
    """The run's events as a ServerApp's log carries them (one JSON object after EVENT_LINE per line)."""
    events = []
    for line in log_text.splitlines():
        at = line.find(EVENT_LINE)
        if at >= 0:
            try:
                events.append(json.loads(line[at + len(EVENT_LINE) :]))
            except json.JSONDecodeError:
                continue  # a log line cut by Flower's log shipping; the run directory has it whole
    return events
