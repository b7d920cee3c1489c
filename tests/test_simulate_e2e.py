"""`fedsov simulate` end to end: Flower SuperLink in simulation mode, Ray, real processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import test_deployment


def fedsov(args, tmp_path):
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    exe = Path(sys.executable).parent / "fedsov"
    return subprocess.run([str(exe), "simulate", *args], env=env, capture_output=True, text=True, timeout=600)


SIMULATION_PROCESSES = ("flower-superlink", "flwr-simulation", "flower-superexec", "raylet", "gcs_server")


def flower_processes(tmp_path: Path) -> list[str]:
    """This test's Flower and Ray processes (FLWR_HOME names its folder); other tests may run federations too."""
    return test_deployment.flower_processes(tmp_path, SIMULATION_PROCESSES)


def test_simulate_reports_bad_config_without_starting_anything(tmp_path):
    result = fedsov(["federation.roundz=3"], tmp_path)
    assert result.returncode == 2
    assert "Unknown config key 'federation.roundz'. Did you mean 'rounds'?" in result.stderr
    assert not (tmp_path / "flwr-home").exists()


@pytest.mark.heavy(seconds=110)
def test_simulate_sweeps_a_dp_federation_with_a_region_its_policy_excludes(small_overrides, tmp_path):
    """The main job end to end, twice: Hydra's -m runs one `fedsov simulate` per value (each its own run
    directory, saved overrides and TensorBoard files; a sweep table at the end). The default China region's
    PIPL preset forbids the EU coordinator. One round each: more rounds run in-process (tests/inprocess.py)
    and in the deployment tests."""
    assert not flower_processes(tmp_path)
    result = fedsov(
        [
            "-m",
            *small_overrides,
            "regions=[eu,us,cn]",
            "privacy.target_epsilon=3,8",
            "federation.rounds=1",
            "audit.enabled=false",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "2 runs over privacy.target_epsilon; every job's config is valid" in out
    assert "=== sweep job 1/2: privacy.target_epsilon=3 ===" in out
    assert "=== sweep job 2/2: privacy.target_epsilon=8 ===" in out
    first_job = out.split("=== sweep job 2/2")[0]
    table = out.split("runs succeeded")[1].splitlines()
    assert "2/2 runs succeeded" in out and re.match(r"\s+job\s+privacy.target_epsilon\s+status", table[1])
    runs = sorted((tmp_path / "work" / "runs").glob("*-job*"))
    assert [p.name[-4:] for p in runs] == ["job0", "job1"]
    epsilon = []
    for run, value in zip(runs, ("3", "8"), strict=True):
        assert f"privacy.target_epsilon={value}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        summary = json.loads((run / "summary.json").read_text())
        epsilon.append(summary["regions"]["eu"]["epsilon"])
        assert re.search(rf"\n\s+{run.name[-1]}\s+{value}\s+completed\s+1\s+eu {epsilon[-1]:.2f} us ", out)
    assert 0 < epsilon[0] <= 3.0 + 1e-6 < epsilon[1]  # the second run spends on top of the first: cumulative
    record = json.loads(next((tmp_path / "work" / "sweeps").glob("*/sweep.json")).read_text())
    assert [j["exit_code"] for j in record["jobs"]] == [0, 0]
    check_first_run(runs[0], first_job, tmp_path)
    assert not flower_processes(tmp_path), "the sweep left Flower or Ray processes behind"


def check_first_run(run: Path, out: str, tmp_path: Path) -> None:
    """What the main job prints and writes: the excluded region, each node, the report, the audit logs."""
    assert "region cn EXCLUDED: PIPL policy forbids sending updates to a coordinator in EU" in out
    assert re.search(r"\n  cn\s+-\s+EXCLUDED: PIPL", out)
    assert "round 0/1" in out and "round 1/1 done" in out and f"Summary: run {run.name} completed 1/1 rounds" in out
    for node in ("eu-1", "eu-2", "us-1", "us-2"):
        assert f"{node:<6} trained" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    # One round of a mixed federation need not help every region: the eu data moves the shared adapter most,
    # and us's held-out perplexity came out 0.99-1.08x its start in repeated runs. Overall it falls by ~20%.
    assert rows[1]["perplexity"]["overall"] < 0.9 * rows[0]["perplexity"]["overall"]
    assert rows[1]["perplexity"]["eu"] < rows[0]["perplexity"]["eu"]
    assert all(set(r["train_loss"]) == {"eu", "us"} for r in rows[1:])
    # Secure aggregation is on by default in simulation: every round was summed securely.
    assert "secure aggregation on" in out
    assert all(r["secure_aggregation"] and r["aggregated"] and r["clients_trained"] == 4 for r in rows[1:])
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()
    manifest = json.loads((run / "adapter" / "fedsov-manifest.json").read_text())
    assert set(manifest["contributing_regions"]) == {"eu", "us"}
    # The main job writes the privacy report (the memorisation audit through Ray: the privacy-utility benchmark's
    # smoke test; over a real wire: the deployment wire test).
    assert "Privacy report:" in out and "audit: not audited" in out
    for name in ("privacy-report.html", "privacy-report.md", "privacy-report.json"):
        assert (run / "report" / name).is_file()
    from common.audit import open_log

    for log in [run / "audit.jsonl", *sorted((tmp_path / "work" / "nodes").glob("*/audit.jsonl"))]:
        assert open_log(log).verify().ok, log
