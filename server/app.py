"""Flower ServerApp: the coordinator's entry point. Thin glue over `server.coordinator`."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import config_from_json, config_to_dict, config_to_yaml
from common.flowerproc import retry_objects_sooner
from common.runconfig import CONFIG_KEY
from server.coordinator import Coordinator
from server.runcontrol import publish_outputs
from server.rundir import RunDirectory
from server.tracking import Trackers

app = ServerApp()


# Set by `fedsov coordinator start`: where this coordinator keeps runs and its model cache,
# whatever paths the machine that submitted the run had.
RUNS_DIR_ENV = "FEDSOV_RUNS_DIR"
MODEL_CACHE_ENV = "FEDSOV_MODEL_CACHE"


def coordinator_paths(cfg):
    """Place the run on this coordinator's disk when it was started by `fedsov coordinator start`."""
    if os.environ.get(RUNS_DIR_ENV):
        cfg.run_dir = str(Path(os.environ[RUNS_DIR_ENV]) / Path(cfg.run_dir).name)
        if cfg.resume:
            cfg.resume = cfg.run_dir
    if os.environ.get(MODEL_CACHE_ENV):
        cfg.model.cache_dir = os.environ[MODEL_CACHE_ENV]
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flwr.superlink.grid import http_grid

    retry_objects_sooner(http_grid)  # replies from warm nodes: their content follows within milliseconds
    cfg = coordinator_paths(config_from_json(str(context.run_config[CONFIG_KEY])))
    run = RunDirectory(cfg.run_dir, echo_events=True)
    run.create()
    if not run.config_path.exists():
        run.config_path.write_text(config_to_yaml(cfg))
    # A watcher on another machine renders progress from this (the config holds no secrets).
    run.event("run_config", run_dir=str(run.path), config=config_to_dict(cfg))
    try:
        run.trackers = Trackers(cfg, run.path)
        Coordinator(cfg, grid, run).execute()
    except Exception as err:
        # The launcher watches events.jsonl: say why, then let Flower mark the run failed.
        run.event("run_failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        raise
    finally:
        if run.trackers is not None:
            run.trackers.close()
        # Deployed, the run's outputs also go into its Flower log, for `fedsov run pull` from any CA holder.
        if os.environ.get(RUNS_DIR_ENV) and run.summary_path.exists():
            publish_outputs(run)
