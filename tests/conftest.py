"""Shared fixtures: a micro embedded model (built once per session) and small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's ~100 processes import the same modules: each module is compiled once and its bytecode kept in
# .venv, also where the machine sets PYTHONDONTWRITEBYTECODE (which would make every process compile torch and
# transformers again: a micro federation 40 -> 70 CPU seconds). scripts/setup.sh compiles nothing up front.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each of xdist's workers has a core to itself: one compute thread each (and in the processes a test
    # starts, which inherit this), not two workers fighting over both cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    # And a simulation's clients share that one core: one Ray actor, which imports torch and starts each node
    # once, instead of two doing both (12 of a micro federation's 43 CPU seconds).
    os.environ.setdefault("FEDSOV_SIMULATION_CPUS", "1")

# A smaller recipe than the default so the suite stays fast; same code path.
MICRO_MODEL = [
    "model.embedded.n_layer=2",
    "model.embedded.n_head=2",
    "model.embedded.n_embd=64",
    "model.embedded.corpus_documents=3000",
    "model.embedded.steps=150",
]


def pytest_collection_modifyitems(config, items):
    """Heavy tests first, longest first: xdist hands tests out in collection order, and a two-minute test
    handed out last would leave the other worker idle while it runs."""

    def weight(item) -> float:
        mark = item.get_closest_marker("heavy")
        return -float(mark.kwargs["seconds"]) if mark else 0.0

    items.sort(key=weight)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Cache folder holding the micro embedded model, built once for the whole session, shared by all of
    pytest-xdist's workers (the first to take the lock builds it, the others find it)."""
    from filelock import FileLock

    from common.config import load_config
    from common.model.loading import resolve_model_path

    # Under xdist each worker's base folder sits in the session's shared one.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    cache = shared / "fedsov-cache"
    with FileLock(str(shared / "fedsov-cache.lock")):
        import torch

        # The other worker waits on this lock (every heavy test, collected first, needs the model): the build may
        # use two threads, 15 s instead of 25 s on the 2-core machine. Two everywhere, so every machine builds
        # the same model bits.
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            cfg = load_config([f"model.cache_dir={cache}", *MICRO_MODEL])
            resolve_model_path(cfg.model, log=lambda m: None)
        finally:
            torch.set_num_threads(threads)
    return cache


@pytest.fixture
def small_overrides(tmp_path, model_cache, config_dir) -> list[str]:
    """A two-region federation small enough for a few seconds per round."""
    return [
        f"workdir={tmp_path / 'work'}",
        f"model.cache_dir={model_cache}",
        *MICRO_MODEL,
        "regions=[eu,us]",
        "data.users_per_region=60",
        "federation.rounds=2",
        "federation.local_steps=4",
        "federation.batch_size=8",
        "federation.eval_batch_size=64",
        "model.max_length=96",
        "audit.exposure_candidates=100",
        "audit.one_run_canaries=8",
        "audit.one_run_candidates=50",
        "audit.generations=4",
        "audit.mia_members=50",
    ]


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    """A private copy of configs/ that this test's nodes and coordinator read their policies from."""
    import shutil

    from common.config import default_config_dir

    target = tmp_path / "configs"
    shutil.copytree(default_config_dir(), target)
    monkeypatch.setenv("FEDSOV_CONFIG_DIR", str(target))
    return target


def edit_policy(config_dir: Path, region: str, key: str, value) -> None:
    """Set policy.<key> (dotted) in a region's file, as a region's administrator would."""
    from omegaconf import OmegaConf

    path = config_dir / "regions" / f"{region}.yaml"
    cfg = OmegaConf.load(path)
    OmegaConf.update(cfg, f"policy.{key}", value, merge=False)
    path.write_text(f"# @package regions.{region}\n" + OmegaConf.to_yaml(cfg))
