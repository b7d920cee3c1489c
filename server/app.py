"""Flower ServerApp: the coordinator's entry point. Thin glue over `server.coordinator`."""

from __future__ import annotations

import traceback

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import config_from_json
from common.runconfig import CONFIG_KEY
from server.coordinator import Coordinator
from server.rundir import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_json(str(context.run_config[CONFIG_KEY]))
    run = RunDirectory(cfg.run_dir)
    run.create()
    try:
        Coordinator(cfg, grid, run).execute()
    except Exception as err:
        # The launcher watches events.jsonl: say why, then let Flower mark the run failed.
        run.event("run_failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        raise
