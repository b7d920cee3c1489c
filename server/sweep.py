"""Hydra's command-line habits on fedsov's run commands: multirun sweeps (`-m`), `--cfg job` and `--info`.

fedsov composes its config with Hydra's compose API (so it can check every value before anything starts),
which has no `@hydra.main` launcher: the sweep is expanded here with Hydra's own basic sweeper, every job's
config is validated first, then the jobs run one after another, each in its own run directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from common.config import config_to_yaml, default_config_dir, load_config
from common.errors import ConfigError, FedsovError

Out = Callable[[str], None]


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """One override list per job: the cartesian product of the swept values (`a=1,2`, `range(..)`, `choice(..)`)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        batches = BasicSweeper.split_arguments(parsed, None)
    except HydraException as err:
        raise ConfigError(f"Cannot parse the sweep's overrides: {err}") from err
    return [list(job) for job in batches[0]]


def swept_keys(overrides: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides)) if o.is_sweep_override()]


def sweep(
    overrides: Sequence[str], config_dir: Path | None, run_one: Callable[[list[str]], int], out: Out = print
) -> int:
    """Validate every job, run each with `run_one(overrides)`, print the sweep table; 0 only if every job did."""
    jobs = expand(overrides)
    keys = swept_keys(overrides)
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    if "resume" in given:
        raise ConfigError("resume=<run_dir> continues one run, which a sweep cannot do: drop -m to resume it.")
    if "run_dir" in given and "run_dir" not in keys and len(jobs) > 1:
        raise ConfigError(
            "run_dir=<folder> names one run, but this sweep makes "
            f"{len(jobs)}: drop run_dir (each job gets <workdir>/runs/<time>-job<N>), or sweep it too."
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    planned = []
    for index, job in enumerate(jobs):
        try:
            cfg = load_config(job, config_dir)
        except FedsovError as err:
            raise ConfigError(f"Sweep job {index} ({' '.join(job)}): {err}") from err
        run_dir = Path(cfg.run_dir) if "run_dir" in given else Path(cfg.workdir) / "runs" / f"{stamp}-job{index}"
        if (run_dir / "config.yaml").exists():
            raise ConfigError(f"Sweep job {index}: run_dir={run_dir} already holds a run; sweep into new folders.")
        if "run_dir" not in given:
            job = [*job, f"run_dir={run_dir}"]
        planned.append((job, run_dir))
        if index == 0:
            workdir = Path(cfg.workdir)  # the sweep's record goes beside the first job's runs
    out(f"Sweep {stamp}: {len(jobs)} runs over {', '.join(keys) or 'no swept key'}; every job's config is valid")
    results = []
    for index, (job, run_dir) in enumerate(planned):
        out(f"\n=== sweep job {index + 1}/{len(jobs)}: {' '.join(_shown(job, keys))} ===")
        try:
            code = run_one(job)
        except FedsovError as err:  # one job's runtime refusal does not cost the others
            out(f"fedsov: error: {err}")
            code = 2
        results.append({"job": index, "overrides": job, "run_dir": str(run_dir), "exit_code": code})
    record = workdir / "sweeps" / stamp
    record.mkdir(parents=True, exist_ok=True)
    (record / "sweep.json").write_text(json.dumps({"overrides": list(overrides), "jobs": results}, indent=1))
    out("\n" + render_sweep(results, keys, stamp, record))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


def _shown(job: list[str], keys: list[str]) -> list[str]:
    """The job's values of the swept keys (all its overrides when nothing is swept)."""
    picked = [o for o in job if o.split("=", 1)[0].lstrip("+") in keys]
    return picked or [o for o in job if not o.startswith("run_dir=")]


def render_sweep(results: list[dict], keys: list[str], stamp: str, record: Path) -> str:
    """One line per job: swept values, outcome, epsilon per region, overall perplexity, run directory."""
    rows = [["job", *keys, "status", "rounds", "epsilon per region", "perplexity before -> after", "run directory"]]
    for r in results:
        values = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in r["overrides"] if "=" in o}
        summary_path = Path(r["run_dir"]) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if summary is None:
            status, rounds, eps, ppl = f"FAILED (exit {r['exit_code']})", "-", "-", "-"
        else:
            # "partial" (a planned region or node contributed nothing) says more than its exit code alone.
            recorded = summary.get("status", "completed")
            status = (
                recorded
                if r["exit_code"] == 0
                else (
                    f"{recorded} (exit {r['exit_code']})"
                    if recorded != "completed"
                    else f"FAILED (exit {r['exit_code']})"
                )
            )
            rounds = str(summary.get("rounds_completed", "-"))
            eps = " ".join(f"{n} {_eps(v.get('epsilon'))}" for n, v in summary["regions"].items()) or "-"
            o = summary.get("overall") or {}
            before, after = o.get("perplexity_before"), o.get("perplexity_after")
            ppl = f"{before:.2f} -> {after:.2f}" if before and after else "n/a"
        rows.append([str(r["job"]), *(values.get(k, "") for k in keys), status, rounds, eps, ppl, r["run_dir"]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        f"Sweep {stamp}: {sum(r['exit_code'] == 0 for r in results)}/{len(results)} runs succeeded "
        f"(record: {record / 'sweep.json'})"
    ]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return "\n".join(lines)


def _eps(value) -> str:
    if value is None:
        return "-"
    return "inf" if value == "inf" else f"{float(value):.2f}"


def show_config(jobs: list[list[str]], config_dir: Path | None, out: Out = print) -> int:
    """`--cfg job`: the composed, validated config each job would run with; nothing starts."""
    for index, job in enumerate(jobs):
        if len(jobs) > 1:
            out(f"# sweep job {index}: {' '.join(job)}")
        out(config_to_yaml(load_config(job, config_dir)).rstrip())
    return 0


def show_info(overrides: Sequence[str], config_dir: Path | None, out: Out = print) -> int:
    """`--info`: where the config comes from: the config folder, the file each group chose, the overrides."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    folder = Path(config_dir) if config_dir else default_config_dir()
    jobs = expand(overrides)
    load_config(jobs[0], folder)  # the same checks as a run: a bad override is named here too
    with initialize_config_dir(config_dir=str(folder.resolve()), version_base="1.3"):
        defaults = GlobalHydra.instance().config_loader().compute_defaults_list("config", jobs[0], RunMode.RUN)
    out(f"Config folder: {folder} (--config-dir or $FEDSOV_CONFIG_DIR to change it)")
    out("Defaults list (the file each group chose, composed in this order):")
    for d in defaults.defaults:
        if d.config_path and not d.config_path.startswith("hydra/"):
            out(f"  {d.config_path + '.yaml':<28} -> {d.package or '<root>'}")
    out(f"Overrides: {' '.join(overrides) or '(none)'}")
    if len(jobs) > 1:
        out(f"Sweep (-m): {len(jobs)} jobs over {', '.join(swept_keys(overrides))}")
    out(
        "A run directory keeps config.yaml (resolved); `fedsov simulate` also writes these overrides to its "
        ".hydra/overrides.yaml."
    )
    return 0
