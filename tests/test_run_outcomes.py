"""Honest run outcomes (issue 14): a run where a planned region, node or round contributed nothing is
partial, names who and why, and its launcher exits non-zero unless partial runs are allowed."""

import pytest

from common.data.prepare import ensure_synthetic_data
from common.data.records import Record, write_jsonl
from common.errors import ConfigError
from server.simulation import PARTIAL_EXIT, partial_verdict, resolve_run_config
from tests.inprocess import run_federation


def test_a_region_whose_nodes_refuse_makes_the_run_partial_naming_node_file_and_fix(small_overrides):
    overrides = small_overrides + [
        "federation.rounds=1",
        "federation.local_steps=2",
        "audit.enabled=false",
        "regions=[eu,us,sg]",
    ]
    cfg = resolve_run_config(overrides)
    ensure_synthetic_data(cfg, log=lambda m: None)
    stray = f"{cfg.data.root}/eu/part-00009.jsonl"  # one bad file among eu's good ones
    write_jsonl([Record("a parcel for a US customer", "us", "us-u99", True)], stray)
    _, run, summary, _ = run_federation(overrides)
    assert summary["status"] == "partial"
    assert summary["regions"]["us"]["contributed"] and not summary["regions"]["eu"]["contributed"]
    (eu_line,) = [line for line in summary["not_contributing"] if line.startswith("region eu")]
    assert "node eu-1 (region eu)" in eu_line and "part-00009.jsonl" in eu_line
    code, lines = partial_verdict(summary)
    assert code == PARTIAL_EXIT and any("federation.allow_partial=true" in line for line in lines)
    assert partial_verdict({**summary, "allow_partial": True})[0] == 0
    # The run finished its one round: resuming it without more rounds has nothing to do, and says so.
    with pytest.raises(ConfigError, match="nothing is left to run"):
        resolve_run_config([f"resume={run.path}"])


def test_a_complete_run_is_not_partial():
    assert partial_verdict({"status": "completed", "not_contributing": []}) == (0, [])
