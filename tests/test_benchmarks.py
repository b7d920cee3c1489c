"""Benchmarks in quick mode: they run and write well-formed output. No timing is asserted here."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_dp_overhead_quick_writes_every_mode(model_cache, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_dp_overhead.py"), "--quick", "--out", str(tmp_path),
                           f"model.cache_dir={model_cache}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "dp-overhead.json").read_text())
    assert record["device"] in ("cpu", "cuda") and record["quick"] is True
    modes = {r["mode"]: r for r in record["results"]}
    assert set(modes) == {"non-private", "hooks", "functorch", "ghost"}
    for r in modes.values():
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["time_ratio"] > 0 and r["trainable_params"] > 0
    assert record["best_dp_mode"] in ("hooks", "functorch", "ghost")
    table = (tmp_path / "dp-overhead.md").read_text()
    assert table.count("\n| ") == 5 and "Best DP mode" in table


def test_message_start_quick_measures_each_message_kind(model_cache, tmp_path):
    out = tmp_path / "message-start.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_message_start.py"), "--quick", "--out", str(out),
                           f"model.cache_dir={model_cache}", f"workdir={tmp_path / 'work'}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["stages"]) == {"light", "node", "model"}
    for stage in record["stages"].values():
        assert stage["process_wall_s"] >= stage["cold_s"] > 0 and stage["warm_s"] >= 0
    assert "| secure-aggregation stage |" in done.stdout


def test_federation_quick_compares_secure_and_plain(model_cache, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_federation.py"), "--quick", "--out", str(tmp_path),
                           f"model.cache_dir={model_cache}"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "federation.json").read_text())
    assert {(r["clients"], r["secure_aggregation"]) for r in record["runs"]} == {(4, True), (4, False)}
    for r in record["runs"]:
        assert r["round_s"] > 0 and r["upload_bytes_per_client"] > 0
    # Masked uploads are 4 bytes per adapter value, like float32: never far from the plain bytes.
    assert 0.5 < record["ratios"]["4"]["bytes"] < 1.5
    assert 0 < record["adapter_bytes"] < record["full_model_bytes"]
    assert "| 4 |" in (tmp_path / "federation.md").read_text()
