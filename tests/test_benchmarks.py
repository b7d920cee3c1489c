"""Benchmarks in quick mode: they run and write well-formed output. No timing is asserted here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.compare import AUDIT_FEDERATION

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """One of scripts/ in its own process, as a user runs it; output captured for the assertions."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.heavy(seconds=60)
def test_dp_overhead_quick_writes_every_mode(model_cache, tmp_path):
    done = run_script(
        "bench_dp_overhead.py", "--quick", "--out", str(tmp_path), f"model.cache_dir={model_cache}", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "dp-overhead.json").read_text())
    assert (record["device"] == "cpu" or record["device"].startswith("cuda")) and record["quick"] is True
    modes = {r["mode"]: r for r in record["results"]}
    assert set(modes) == {"non-private", "hooks", "functorch", "ghost"}
    for r in modes.values():
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["time_ratio"] > 0 and r["trainable_params"] > 0
    assert record["best_dp_mode"] in ("hooks", "functorch", "ghost")
    table = (tmp_path / "dp-overhead.md").read_text()
    assert table.count("\n| ") == 5 and "Best DP mode" in table


@pytest.mark.heavy(seconds=78)
def test_message_start_quick_measures_each_message_kind(model_cache, tmp_path):
    done = run_script(
        "bench_message_start.py",
        "--quick",
        "--out",
        str(tmp_path),
        f"model.cache_dir={model_cache}",
        f"workdir={tmp_path / 'work'}",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "message-start.json").read_text())
    assert record["device"] == "cpu" or record["device"].startswith("cuda")
    assert set(record["stages"]) == {"light", "node", "model"}
    for stage in record["stages"].values():
        assert stage["process_wall_s"] >= stage["cold_s"] > 0 and stage["warm_s"] >= 0
    assert set(record["runtime_api"]) == {"describe", "evaluate"}
    for kind in record["runtime_api"].values():  # through a SuperNode: a process per message, the warm worker
        assert kind["process_s"] > 0 and kind["warm_first_s"] > 0 and kind["warm_s"] > 0
    assert "| secure-aggregation stage |" in done.stdout
    table = (tmp_path / "message-start.md").read_text()
    assert "| train/evaluate (model ready) |" in table and "| describe |" in table and "| evaluate |" in table
    assert (tmp_path / "message-start.png").stat().st_size > 0


@pytest.mark.heavy(seconds=75)
def test_federation_quick_compares_secure_and_plain(model_cache, tmp_path):
    done = run_script(
        "bench_federation.py", "--quick", "--out", str(tmp_path), f"model.cache_dir={model_cache}", timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "federation.json").read_text())
    assert {(r["clients"], r["secure_aggregation"]) for r in record["runs"]} == {(4, True), (4, False)}
    for r in record["runs"]:
        assert r["round_s"] > 0 and r["upload_bytes_per_client"] > 0 and r["min_clients_trained"] == 4
    # Masked uploads are 4 bytes per adapter value, like float32: never far from the plain bytes.
    assert 0.5 < record["ratios"]["4"]["bytes"] < 1.5
    assert 0 < record["adapter_bytes"] < record["full_model_bytes"]
    sizes = record["sizes"]
    assert sizes["configured"]["adapter_bytes"] == record["adapter_bytes"]
    # Fewer target modules, or a bigger model, make the adapter a smaller share of the model.
    assert sizes["configured, LoRA on c_attn only"]["share"] < sizes["configured"]["share"]
    assert sizes["GPT-2 small shape (124M), same LoRA"]["share"] < sizes["configured"]["share"]
    assert record["scale"]["secure"]["per_client_s"] is None  # one client count: no growth to report
    assert "| 4 |" in (tmp_path / "federation.md").read_text() and (tmp_path / "federation.png").stat().st_size > 0


def test_each_mode_runs_in_a_fresh_process_of_its_own_and_its_failure_is_reported():
    sys.path.insert(0, str(SCRIPTS))
    from benchlib import each_in_own_process

    # Nothing preloaded: the contract, not the imports, is under test.
    pids = [pid for pid, why in each_in_own_process(os.getpid, [(), ()], preload=()) if not why]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    ((result, why),) = each_in_own_process(int, [("not a number",)], preload=())
    assert result is None and why.startswith("ValueError: invalid literal")
    # SIGKILL, as the kernel ends a process out of memory (and no core file, which an abort could leave).
    ((result, why),) = each_in_own_process(signal.raise_signal, [(signal.SIGKILL,)], preload=())
    assert result is None and "the process died" in why


def test_growth_per_added_client_finds_the_bend():
    sys.path.insert(0, str(SCRIPTS))
    from bench_federation import growth

    flat = growth([(3, 10.0), (6, 16.0), (12, 28.0)])
    assert abs(flat["per_client_s"] - 2.0) < 1e-9 and flat["bends_after"] is None
    bent = growth([(3, 10.0), (6, 16.0), (12, 28.0), (24, 100.0)])
    assert [s["per_client_s"] for s in bent["segments"]] == [2.0, 2.0, 6.0] and bent["bends_after"] == 12


@pytest.mark.heavy(seconds=116)
def test_privacy_utility_quick_runs_both_lora_kinds_on_the_same_canaries(model_cache, tmp_path):
    done = run_script(
        "bench_privacy_utility.py", "--quick", "--out", str(tmp_path), f"model.cache_dir={model_cache}", timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "privacy-utility.json").read_text())
    arms = {(a["target_epsilon"], a["ffa"]): a for a in record["arms"]}
    assert set(arms) == {("no DP", False), ("8", True)}
    nodp, dp = arms[("no DP", False)], arms[("8", True)]
    assert nodp["epsilon"] == "inf" and 0 < dp["epsilon"] <= 8 + 1e-6
    for a in arms.values():
        assert 1 < a["perplexity_after"] < 1e5 and a["perplexity_x_lora_no_dp"] > 0
        assert set(a["max_exposure_bits"]) == set(a["mean_exposure_bits"]) == {"1", "4", "16"}
        assert all(a["mean_exposure_bits"][k] <= a["max_exposure_bits"][k] + 1e-9 for k in ("1", "4", "16"))
    assert nodp["perplexity_x_no_dp"] == 1.0
    # The DP arm measured the first arm's canaries: its nodes hold the very same canary files.
    runs = tmp_path / "runs"
    for node in (runs / "lora-no-dp" / "nodes").iterdir():
        assert (runs / "ffa-lora-eps8" / "nodes" / node.name / "canaries.json").read_bytes() == (
            node / "canaries.json"
        ).read_bytes()
    # FFA-LoRA kept A at its initialisation: the final adapter's A equals a fresh adapter's, B moved.
    import torch
    from safetensors.torch import load_file

    from common.config import load_config
    from common.model.loading import load_base_model, resolve_model_path
    from common.model.lora import adapter_state, attach_lora
    from tests.conftest import MICRO_MODEL

    cfg = load_config([f"model.cache_dir={model_cache}", *MICRO_MODEL, *AUDIT_FEDERATION])
    base = load_base_model(resolve_model_path(cfg.model, log=lambda m: None), torch.device("cpu"), torch.float32)
    initial = adapter_state(attach_lora(base, cfg.model.lora, cfg.federation.seed))
    final = load_file(runs / "ffa-lora-eps8" / "run" / "adapter" / "adapter_model.safetensors")
    assert set(final) == set(initial)
    assert all(torch.equal(final[k], initial[k]) for k in final if "lora_A" in k)
    assert any(not torch.equal(final[k], initial[k]) for k in final if "lora_B" in k)
    # --report-only re-reads the finished runs and writes the same numbers without running anything.
    again = run_script(
        "bench_privacy_utility.py",
        "--quick",
        "--report-only",
        "--out",
        str(tmp_path),
        f"model.cache_dir={model_cache}",
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "privacy-utility.json").read_text())["arms"] == record["arms"]
    table = (tmp_path / "privacy-utility.md").read_text()
    assert (
        "| FFA-LoRA | 8 |" in table
        and "| LoRA | no DP |" in table
        and (tmp_path / "privacy-utility.png").stat().st_size > 0
    )


@pytest.mark.heavy(seconds=27)
def test_dp_sweep_quick_runs_every_optimiser_and_lora_kind_and_resumes_from_finished_arms(model_cache, tmp_path):
    args = ["--quick", "--no-confirm", "--out", str(tmp_path), f"model.cache_dir={model_cache}"]
    done = run_script("bench_dp_sweep.py", *args, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "dp-sweep.json").read_text())
    assert record["quick"] is True and record["skipped"] == []
    arms = {(a["epsilon"], a["optimizer"], a["ffa"], a["rank"]) for a in record["arms"]}
    # Rank is tried on the best epsilon-8 arm, whichever kind that was in this run.
    shape = next(a for a in record["arms"] if a["stage"] == "shape")
    at8 = min((a for a in record["arms"] if a["epsilon"] == 8.0 and a["rank"] == 8), key=lambda a: a["perplexity"])
    assert (shape["optimizer"], shape["ffa"], shape["rank"]) == (at8["optimizer"], at8["ffa"], 16)
    # Epsilon 1 is tried again with the best epsilon-8 setting (a new arm when the rank-16 one won).
    best8 = min((a for a in record["arms"] if a["epsilon"] == 8.0), key=lambda a: a["perplexity"])
    assert arms == {
        (None, "adamw", False, 8),
        (8.0, shape["optimizer"], shape["ffa"], 16),
        (1.0, best8["optimizer"], best8["ffa"], best8["rank"]),
    } | {(e, o, f, 8) for e in (8.0, 1.0) for o in ("adamw", "sgd") for f in (False, True)}
    for a in record["arms"]:
        # Perplexity is not bounded above: DP-SGD on 16-record batches at sigma ~1 may wreck the tiny model.
        assert a["perplexity"] > 1 and len(a["perplexity_by_round"]) == 1
        if a["epsilon"] is not None:  # the ledger never lets a node spend past the target
            assert 0 < a["epsilon_spent"] <= a["epsilon"] + 1e-3 and a["sigma"] > 0
    assert record["best"]["no DP"]["x_no_dp"] == 1.0 and set(record["best"]) == {"no DP", "8", "1"}
    table = (tmp_path / "dp-sweep.md").read_text()
    assert "| 8 | " in table and "| 1 | " in table and "| no DP | adamw | LoRA |" in table
    assert (tmp_path / "dp-sweep.png").stat().st_size > 0
    # Past its deadline the sweep starts no arm, re-reads the finished ones and writes the same numbers.
    again = run_script("bench_dp_sweep.py", *args, "--minutes", "0", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "dp-sweep.json").read_text())["arms"] == record["arms"]


@pytest.mark.heavy(seconds=24)
def test_model_scale_quick_measures_every_mode(tmp_path):
    done = run_script("bench_model_scale.py", "--quick", "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "model-scale.json").read_text())
    assert record["quick"] is True and (record["device"] == "cpu" or record["device"].startswith("cuda"))
    (shape,) = record["shapes"]
    assert 0 < shape["default"]["adapter_bytes"] < shape["all-linear"]["adapter_bytes"] < 4 * shape["params"]
    modes = {r["mode"]: r for r in record["results"]}
    assert set(modes) == {"non-private", "hooks", "ghost", "hooks+checkpointing"}
    for r in modes.values():
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["tokens_per_s"] > 0 and r["time_ratio"] > 0 and r["peak_mb"] > 0
    assert modes["non-private"]["time_ratio"] == 1.0
    assert record["fastest_dp_mode"][shape["name"]] in ("hooks", "ghost")
    table = (tmp_path / "model-scale.md").read_text()
    assert table.count("| micro |") == 5 and "Fastest DP mode per shape" in table
    assert (tmp_path / "model-scale.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")
def test_device_check_without_cuda_says_so_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "device-check.json"
    done = run_script("device_check.py", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs a CUDA device" in done.stdout and "nothing was checked" in done.stdout
    assert not out.exists()


def test_accounting_bench_compares_pld_with_rdp_and_times_each_call(tmp_path):
    # No --quick: the whole script takes seconds.
    done = run_script("bench_accounting.py", "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "accounting.json").read_text())
    for row in record["accountants"]:
        assert row["sigma_pld"] < row["sigma_rdp"]
        assert row["epsilon_pld_at_sigma_rdp"] < row["epsilon_pld"] <= row["target"] < row["epsilon_rdp"]
    assert len(record["timings"]) == 5 and all(t["fresh_s"] > 0 and t.get("cached_s", 1) > 0 for t in record["timings"])
    assert (tmp_path / "accounting.md").read_text().count("\n| ") == 11


def test_device_check_judges_a_dtype_by_its_own_error_without_dp():
    # scripts/ is not a package; device_check puts the repository and scripts/ on sys.path itself
    sys.path.insert(0, str(SCRIPTS))
    from device_check import within_dtype_error

    def measured(dp_error, plain_error, finite=True):
        return {"relative_l2_error": dp_error, "plain_gradient_relative_l2_error": plain_error, "finite": finite}

    assert within_dtype_error(measured(0.0519, 0.0501))  # the H200 run's bfloat16 at 1.1B
    assert not within_dtype_error(measured(0.09, 0.05))  # the DP path adds its own error
    assert not within_dtype_error(measured(0.25, 0.20))  # both broken: a wrong gradient is not "the dtype"
    assert not within_dtype_error(measured(0.01, 0.01, finite=False))
