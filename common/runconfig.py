"""How a resolved fedsov config reaches the ServerApp and ClientApps of a Flower run.

The whole config travels as one JSON string in the Flower run config, so the apps need
no shared file system with the launcher.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from common.config import FedsovConfig, config_to_dict

CONFIG_KEY = "fedsov-config"
APP_NAME = "fedsov"
APP_PUBLISHER = "fedsov"

# The app bundle (FAB) holds only this pyproject.toml: the ServerApp and ClientApp code is
# the fedsov installed on each machine, never code shipped by whoever submits the run.
APP_PYPROJECT = {
    "build-system": {"requires": ["setuptools"], "build-backend": "setuptools.build_meta"},
    "project": {
        "name": APP_NAME,
        "version": "0.1.0",
        "description": "fedsov federated DP-LoRA run (code comes from each machine's installed fedsov)",
        "license": "Apache-2.0",
        "dependencies": [],
    },
    "tool": {
        "flwr": {
            "app": {
                "publisher": APP_PUBLISHER,
                "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
                "config": {CONFIG_KEY: ""},
            }
        }
    },
}


def write_flower_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(APP_PYPROJECT))
    return folder


def write_run_config(path: Path, cfg: FedsovConfig) -> Path:
    """A TOML file for `flwr run --run-config` carrying the config as JSON."""
    path.write_text(tomli_w.dumps({CONFIG_KEY: json.dumps(config_to_dict(cfg))}))
    return path
