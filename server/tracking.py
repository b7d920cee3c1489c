"""Experiment tracking: each round's metrics also go to TensorBoard event files and, where installed, MLflow.

`metrics.jsonl` stays the run's record; the trackers are views of the same rows, so users can follow a run
with the tools they already use (`tensorboard --logdir <workdir>/runs`, `mlflow ui`). Only aggregates the
coordinator already holds are written: per-region perplexity, train loss and epsilon, and round counters.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from common.config import FedsovConfig
from common.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_EXPERIMENT = "fedsov"
# Round counters worth a curve, besides the per-region values.
ROUND_SCALARS = ("clients_trained", "upload_bytes_per_client", "clipped_values", "seconds")


def check_trackers(cfg: FedsovConfig) -> None:
    """Refuse, before anything starts, a tracker that is asked for but cannot be written."""
    if cfg.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tracking.tensorboard=true needs the tensorboard package, which is not installed: "
            "`pip install tensorboard`, or set tracking.tensorboard=false."
        )


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The tracker names and values of one metrics row (names group by region, as TensorBoard shows them)."""
    out: dict[str, float] = {}
    for group, tag in (("perplexity", "perplexity"), ("train_loss", "train_loss"), ("epsilon", "epsilon")):
        for region, value in (row.get(group) or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):  # "inf" (no DP) has no point on a curve
                out[f"{tag}/{region}"] = float(value)
    for name in ROUND_SCALARS:
        if isinstance(row.get(name), (int, float)):
            out[f"round/{name}"] = float(row[name])
    return out


class Trackers:
    """TensorBoard (`<run_dir>/tensorboard`) and MLflow writers for one run, as its config asks."""

    def __init__(self, cfg: FedsovConfig, run_dir: Path):
        check_trackers(cfg)
        self.tensorboard = None
        self.mlflow = None
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        if cfg.tracking.mlflow and importlib.util.find_spec("mlflow") is not None:
            self.mlflow = _start_mlflow(cfg, Path(run_dir))

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        step = int(row["round"])
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()  # a watcher sees each round as it ends
        if self.mlflow is not None and values:
            # MLflow's metric names allow '/', so both trackers show the same names.
            self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _start_mlflow(cfg: FedsovConfig, run_dir: Path):
    import mlflow

    # Without a tracking server the runs of one workdir share one store, so `mlflow ui` compares them.
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(cfg.workdir) / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(MLFLOW_EXPERIMENT)
    mlflow.start_run(run_name=run_dir.name)
    mlflow.log_params(
        {
            "regions": ",".join(cfg.regions),
            "rounds": cfg.federation.rounds,
            "local_steps": cfg.federation.local_steps,
            "batch_size": cfg.federation.batch_size,
            "learning_rate": cfg.federation.learning_rate,
            "lr_scheduler": cfg.federation.lr_scheduler.value,
            "dp": cfg.privacy.enabled,
            "target_epsilon": cfg.privacy.target_epsilon,
            "noise_multiplier": cfg.privacy.noise_multiplier,
            "secure_aggregation": cfg.secure_aggregation.enabled,
            "model": cfg.model.name_or_path,
            "lora_rank": cfg.model.lora.rank,
            "lora_ffa": cfg.model.lora.ffa,
            "run_dir": str(run_dir),
        }
    )
    return mlflow
