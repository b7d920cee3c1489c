"""Materialise the embedded synthetic data: one folder of JSONL shards per region."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from common.config import DataSource, FedsovConfig
from common.data.records import SYNTHETIC_MANIFEST
from common.data.synthetic import write_region_dataset
from common.paths import writable_folder

GENERATOR_VERSION = 1


def ensure_synthetic_data(cfg: FedsovConfig, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Generate each synthetic region's shards unless the same recipe is already on disk."""
    folders: dict[str, Path] = {}
    if any(r.data.source == DataSource.synthetic for r in cfg.regions.values()):
        writable_folder(cfg.data.root, "data.root=<folder>")
    for region in cfg.regions.values():
        if region.data.source != DataSource.synthetic:
            continue
        folder = Path(cfg.data.root) / region.name
        recipe = {
            "generator_version": GENERATOR_VERSION,
            "region": region.name,
            "locales": list(region.locales),
            "seed": cfg.data.seed,
            "num_users": cfg.data.users_per_region,
            "records_per_user": list(cfg.data.records_per_user),
            "consent_rate": cfg.data.consent_rate,
            "num_shards": cfg.data.shards,
        }
        manifest = folder / SYNTHETIC_MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) == recipe:
            folders[region.name] = folder
            continue
        log(f"Generating synthetic {region.name} data ({cfg.data.users_per_region} users) in {folder} ...")
        write_region_dataset(
            region.name,
            region.locales,
            folder,
            seed=cfg.data.seed,
            num_users=cfg.data.users_per_region,
            records_per_user=(cfg.data.records_per_user[0], cfg.data.records_per_user[1]),  # [min, max], validated
            consent_rate=cfg.data.consent_rate,
            num_shards=cfg.data.shards,
        )
        manifest.write_text(json.dumps(recipe, indent=1))
        folders[region.name] = folder
    return folders
