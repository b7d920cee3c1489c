"""The coordinator's retention: checkpoints deleted once the strictest contributing region's time is up.

A run's checkpoints hold adapters trained on the regions that took part, so the shortest
`retention.checkpoint_days` among them applies: regions the run planned with, less those its events show
were excluded before training. Each region's rule is read from the run's own copy of the policies and,
where this machine's config folder has the region's file, from that too; the stricter wins (a region that
shortened its period since the run applies it now). The final adapter (`adapter/`) is the run's product,
not a checkpoint: it is not deleted. Each deletion goes into the run's keyed audit log; a rule that cannot
be read, or an audit log that cannot be written, stops the pass before anything is deleted.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from common.audit import AuditLog, EvidenceKey, EvidenceKeyError
from common.config import config_from_container, default_config_dir, load_region_file
from common.errors import FedsovError, RetentionError
from common.retention import Due, delete, due
from server.rundir import RunDirectory


def checkpoint_rule(run: RunDirectory, config_dir: Path | None = None) -> tuple[int, str]:
    """The checkpoint retention in days that binds this run, and which region's rule it is."""
    try:
        cfg = config_from_container(OmegaConf.load(run.config_path))
    except (FedsovError, OSError, ValueError) as err:
        raise RetentionError(
            f"Retention: cannot read the rules of run {run.path} ({err}); nothing was deleted. "
            "Restore its config.yaml, or delete the run's checkpoints yourself."
        ) from err
    excluded = {e.get("region") for e in run.read_events() if e.get("event") == "region_excluded"}
    # A run whose every region was excluded trained nothing; its rules still bind whatever it left behind.
    regions = [r for name, r in cfg.regions.items() if name not in excluded] or list(cfg.regions.values())
    folder = (config_dir or default_config_dir()) / "regions"
    rules = []
    for region in regions:
        days = [region.policy.retention.checkpoint_days]
        if (folder / f"{region.name}.yaml").is_file():
            days.append(load_region_file(folder / f"{region.name}.yaml").policy.retention.checkpoint_days)
        rules.append((min(days), f"{region.name} ({region.policy.law}): retention.checkpoint_days = {min(days)}"))
    return min(rules)


def runs(runs_dir: Path) -> list[RunDirectory]:
    if not runs_dir.is_dir():
        raise RetentionError(
            f"{runs_dir} is not a folder: give the coordinator's runs folder (e.g. "
            "fedsov-coordinator/runs, or <workdir>/runs for simulations)."
        )
    return [RunDirectory(p) for p in sorted(runs_dir.iterdir()) if (p / "config.yaml").is_file()]


def expired_checkpoints(
    runs_dir: Path, config_dir: Path | None = None, now: float | None = None
) -> list[tuple[RunDirectory, list[Due]]]:
    """Per run, the checkpoints older than the binding rule (every run's rule is read before any deletion)."""
    now = time.time() if now is None else now
    plan = []
    for run in runs(runs_dir):
        folders = sorted(run.checkpoints_dir.glob("round-*")) if run.checkpoints_dir.is_dir() else []
        if not folders:
            continue
        days, rule = checkpoint_rule(run, config_dir)
        plan.append((run, due(folders, "checkpoint", days, rule, now)))
    return [(run, items) for run, items in plan if items]


def enforce_runs_retention(runs_dir: Path, config_dir: Path | None = None, now: float | None = None) -> list[Due]:
    """Delete every expired checkpoint under `runs_dir`, each logged in its run's audit log."""
    plan = expired_checkpoints(runs_dir, config_dir, now)
    audits = {}
    for run, _ in plan:
        try:
            key = EvidenceKey.load(run.coordinator_key_dir)
        except EvidenceKeyError as err:
            raise RetentionError(
                f"Retention: run {run.path}'s audit log cannot record the deletions ({err}); nothing was deleted."
            ) from err
        audits[run.path] = AuditLog(run.path / "audit.jsonl", actor="coordinator", key=key)
    deleted: list[Due] = []
    for run, items in plan:
        delete(items, audits[run.path])
        deleted += items
    return deleted
