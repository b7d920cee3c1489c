"""What Hugging Face, Hydra and TensorBoard users expect of fedsov's artefacts and commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inprocess import run_federation

# Runs in a process that has only transformers and peft: what a user on another machine does.
LOAD_ELSEWHERE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
export, base = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(export)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), export).eval()
ids = tokenizer("The door code for the office is", return_tensors="pt")["input_ids"]
with torch.no_grad():
    print(json.dumps({"ids": ids[0].tolist(), "logits": model(ids).logits[0, -1, :16].tolist()}))
"""


@pytest.fixture
def finished_run(small_overrides):
    """A real one-round federation (in-process coordinator and ClientApps); the audit is tested elsewhere."""
    cfg, run, summary, _ = run_federation(
        small_overrides + ["federation.rounds=1", "federation.local_steps=2", "audit.enabled=false"]
    )
    return cfg, run, summary


def test_adapter_card_export_and_generate_work_as_hugging_face_users_expect(finished_run, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from common.errors import ModelError
    from common.model.loading import load_base_model
    from server.generate import generate
    from server.provenance import export_adapter

    cfg, run, summary = finished_run
    manifest = json.loads((run.adapter_dir / "fedsov-manifest.json").read_text())
    card = (run.adapter_dir / "README.md").read_text()
    # Hugging Face front matter, then the privacy card generated from the manifest.
    front = card.split("---\n")[1]
    assert "library_name: peft" in front and f'base_model: "{manifest["base_model"]["name"]}"' in front
    assert manifest["base_model"]["name"].startswith("fedsov-embedded-") and "- differential-privacy" in front
    assert "More Information Needed" not in card
    for region in ("eu", "us"):
        info = manifest["contributing_regions"][region]
        assert (
            f"| {region} | {info['law']} | {float(info['epsilon']):.2f} | 1.0e-05 | record | 1 | "
            f"{manifest['audit'][region]['status']}"
        ) in card
    assert "Allowed deployment jurisdictions** (every contributing region allows them): EU." in card
    for node, anchor in manifest["evidence_anchors"].items():
        assert f"- {node} ({anchor['region']}): ledger {anchor['ledger-entries']} entries" in card

    export = tmp_path / "export"
    export_adapter(run.path, export, "EU")
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == manifest["base_model"]["name"]  # a name, not this machine's path
    reference = json.loads((export / "base-model-reference" / "reference.json").read_text())
    assert reference["fingerprint"] == manifest["base_model"]["fingerprint"] and reference["embedded_recipe"]
    assert {f["name"] for f in reference["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert "exported for deployment in EU" in (export / "README.md").read_text()

    # Another machine: the base copied to a new place, a process that knows neither fedsov nor the run.
    elsewhere = tmp_path / "elsewhere"
    base = elsewhere / "my-base"
    shutil.copytree(manifest["base_model"]["path"], base)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDSOV_CONFIG_DIR")}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(export), str(base)],
        cwd=elsewhere,
        env={**env, "HF_HUB_OFFLINE": "1", "HOME": str(elsewhere)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # The same numbers as the run's own adapter on the run's own base, and not the base's alone.
    from peft import PeftModel

    original = load_base_model(Path(manifest["base_model"]["path"]), torch.device("cpu"), torch.float32)
    ids = torch.tensor([loaded["ids"]])
    assert (
        loaded["ids"]
        == AutoTokenizer.from_pretrained(manifest["base_model"]["path"])("The door code for the office is")["input_ids"]
    )
    with torch.no_grad():
        base_logits = original(ids).logits[0, -1, :16]
        adapted = PeftModel.from_pretrained(original, str(run.adapter_dir)).eval()(ids).logits[0, -1, :16]
    assert torch.allclose(torch.tensor(loaded["logits"]), adapted, atol=1e-5)
    assert not torch.allclose(adapted, base_logits, atol=1e-5)

    # `fedsov generate` takes the export as a PEFT user passes it, with the base folder beside it.
    lines: list[str] = []
    assert generate(export, "Hello", samples=1, max_new_tokens=5, base=base, out=lines.append) == 0
    assert lines[0].startswith("--- sample 1") and any("Privacy card" in line for line in lines)
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")
    with pytest.raises(ModelError, match="not the model this adapter was trained on"):
        generate(export, "Hello", base=base, out=lines.append)
    with pytest.raises(ModelError, match="holds no adapter"):
        generate(elsewhere, "Hello", out=lines.append)


def test_tensorboard_event_files_hold_every_rounds_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.config import load_config
    from server.tracking import TENSORBOARD_DIR, Trackers

    cfg = load_config(["regions=[eu,us]", "tracking.mlflow=false"])
    trackers = Trackers(cfg, tmp_path)
    trackers.log({"round": 0, "perplexity": {"eu": 400.0, "us": 300.0, "overall": 350.0}})
    trackers.log(
        {
            "round": 1,
            "perplexity": {"eu": 200.0, "us": 150.0, "overall": 175.0},
            "train_loss": {"eu": 5.1},
            "epsilon": {"eu": 1.5, "us": "inf"},
            "clients_trained": 4,
            "seconds": 12.5,
        }
    )
    trackers.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"perplexity/eu", "perplexity/overall", "train_loss/eu", "epsilon/eu", "round/clients_trained"} <= tags
    assert "epsilon/us" not in tags  # infinite epsilon (no DP) has no point on a curve
    assert [(e.step, e.value) for e in events.Scalars("perplexity/eu")] == [(0, 400.0), (1, 200.0)]
    assert [(e.step, e.value) for e in events.Scalars("epsilon/eu")] == [(1, 1.5)]

    off = Trackers(
        load_config(["regions=[eu]", "tracking.tensorboard=false", "tracking.mlflow=false"]), tmp_path / "off"
    )
    off.log({"round": 0, "perplexity": {"eu": 1.0}})
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "~federation.rounds",
            "would delete 'federation.rounds', and fedsov's schema would put its built-in default (5)",
        ),
        ("~audit", "would delete the section 'audit'"),
        ("+federation.rounds=3", "'federation.rounds' already exists"),
        ("+regions=[eu]", "the regions group is already in the defaults list"),
        ("~regions=cn", "the regions group cannot be deleted"),
        ("privacy.target_epsilon=3,8", "is a sweep (one run per value): add -m"),
    ],
)
def test_hydra_prefixes_and_sweeps_are_refused_where_they_would_mislead(override, message):
    from common.config import load_config
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=None) as refused:
        load_config([override])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_forced_override_works_as_in_hydra():
    from common.config import load_config

    assert load_config(["++federation.rounds=3"]).federation.rounds == 3


def test_sweep_expansion_and_cfg_job(config_dir, capsys):
    from common.cli import main
    from server.sweep import expand

    assert expand(["privacy.target_epsilon=3,8", "federation.rounds=1", "model.lora.rank=range(2,5,2)"]) == [
        ["privacy.target_epsilon=3", "federation.rounds=1", "model.lora.rank=2"],
        ["privacy.target_epsilon=3", "federation.rounds=1", "model.lora.rank=4"],
        ["privacy.target_epsilon=8", "federation.rounds=1", "model.lora.rank=2"],
        ["privacy.target_epsilon=8", "federation.rounds=1", "model.lora.rank=4"],
    ]
    assert main(["simulate", "-m", "--cfg", "job", "regions=[eu]", "privacy.target_epsilon=3,8"]) == 0
    out = capsys.readouterr().out
    assert out.count("# sweep job") == 2 and "target_epsilon: 3.0" in out and "target_epsilon: 8.0" in out
    assert main(["simulate", "--info", "regions=[eu,us]"]) == 0
    info = capsys.readouterr().out
    assert "regions/us.yaml" in info and "-> regions.us" in info and str(config_dir) in info
    # A bad value in any job stops the sweep before anything starts.
    assert main(["simulate", "-m", "regions=[eu]", "federation.rounds=1,0"]) == 2
    assert "Sweep job 1" in capsys.readouterr().err


def federated_fake_run(tmp_path):
    """The records of a secure two-round run: eu (2 nodes) and us (1 node, merged into the shared slot with sg's)
    contributed; sg's second node refused every round, and region br was planned but all its nodes refused."""
    from common.audit import AuditLog, EvidenceKey
    from common.config import load_config
    from server.rundir import RunDirectory

    run = RunDirectory(tmp_path / "work" / "runs" / "run")
    run.create()
    key = EvidenceKey.load_or_create(run.coordinator_key_dir)
    AuditLog(run.path / "audit.jsonl", "coordinator", key).record("run", "started", reason="test")
    nodes = {"eu-1": "eu", "eu-2": "eu", "us-1": "us", "sg-1": "sg", "br-1": "br"}
    for name, region in nodes.items():
        run.event(
            "node_joined",
            node=name,
            region=region,
            units=100 + len(name),
            epsilon=0.0,
            law="x",
            excluded_no_consent=3 if region == "eu" else 1,
            excluded_special=2,
        )
    run.metrics({"round": 0, "perplexity": {"eu": 400.0, "other-regions": 300.0, "overall": 350.0}})
    for number in (1, 2):
        for name in ("eu-1", "eu-2", "us-1", "sg-1"):
            run.event(
                "node_trained",
                round=number,
                node=name,
                region=nodes[name],
                loss=None,
                epsilon=0.5 * number,
                seconds=1.0,
                units=100,
            )
        # Round 2: sg-1 dropped after the key exchange, leaving us-1 alone in the shared slot: it stays masked.
        dropped = ["sg-1"] if number == 2 else []
        run.metrics(
            {
                "round": number,
                "secure_aggregation": True,
                "aggregated": True,
                "clients_dropped": dropped,
                "train_loss": {"eu": 5.0, **({} if dropped else {"other-regions": 5.5})},
                "perplexity": {"eu": 200.0, "overall": 220.0, **({} if dropped else {"other-regions": 240.0})},
                "epsilon": {"eu": 0.5 * number, "us": 0.5 * number, "sg": 0.5 * number},
            }
        )
    (run.home / "evidence-anchors.json").write_text(
        json.dumps(
            {
                "eu-1": {
                    "ledger-genesis": "a" * 64,
                    "ledger-entries": 3,
                    "ledger-head": "b" * 64,
                    "audit-genesis": "c" * 64,
                    "audit-entries": 9,
                    "audit-head": "d" * 64,
                    "region": "eu",
                    "run": "run#1",
                }
            }
        )
    )
    region = {
        "law": "GDPR",
        "policy_hash": "ab" * 32,
        "delta": 1e-5,
        "unit": "record",
        "epsilon": 1.0,
        "epsilon_budget": 10.0,
        "perplexity_before": 400.0,
        "perplexity_after": 200.0,
        "refusals": [],
    }

    def data(node: str) -> dict:  # a node's describe counts, as the summary keeps them
        return {
            "records": 200,
            "excluded-no-consent": 3,
            "excluded-special": 2,
            "heldout-records": 40,
            "skipped-files": int(node == "eu-1"),
            "truncated-units": 4 if node == "eu-1" else 0,
            "truncated-tokens": 77 if node == "eu-1" else 0,
            "truncated-heldout": 0,
        }

    def entry(law: str, nodes: dict[str, int], **extra) -> dict:
        return {
            **region,
            "law": law,
            "contributed": any(nodes.values()),
            "rounds_contributed": nodes,
            "data": {n: data(n) for n in nodes},
            **extra,
        }

    run.write_summary(
        {
            "rounds_completed": 2,
            "status": "partial",
            "not_contributing": ["node br-1 (region br) contributed to no round: budget exhausted"],
            "excluded_regions": {"cn": "PIPL policy forbids a coordinator in EU"},
            "regions": {
                "eu": entry("GDPR", {"eu-1": 2, "eu-2": 2}),
                "us": entry("CCPA/CPRA", {"us-1": 2}),
                "sg": entry("PDPA", {"sg-1": 1}),
                "br": entry("LGPD", {"br-1": 0}, epsilon=None, refusals=["br-1: round 1: budget exhausted"]),
            },
        }
    )
    from tests.inprocess import node_audit_metrics

    audit = node_audit_metrics()
    memorised = {**audit, "exposure-rep16-mean": 12.0, "exposure-rep16-max": 15.0}  # the verdict reads the mean
    run.write_audit_results(
        {
            "eu-1": {"region": "eu", "metrics": audit, "examples": ["The code is \u2588\u2588"]},
            "us-1": {"region": "us", "metrics": memorised, "examples": []},
        }
    )
    return run, load_config(["regions=[eu,us,sg,br]"])


def test_report_says_what_left_each_node_and_never_calls_a_silent_region_a_contributor(tmp_path):
    from server.report import write_privacy_report

    run, cfg = federated_fake_run(tmp_path)
    report = write_privacy_report(run, cfg)
    regions = report["regions"]
    assert regions["br"]["contribution"]["contributed"] is False
    assert regions["eu"]["contribution"]["status"] == "contributed (2 round(s))"
    why = "node br-1 (region br) contributed to no round: budget exhausted"
    assert any(f"Region br was planned but did not contribute: {why}" in line for line in report["plain_summary"])
    md = (run.report_dir / "privacy-report.md").read_text()
    assert f"| br | planned, did NOT contribute: {why} |" in md
    assert "| br | contributed" not in md
    # delta in scientific notation, not 0.00
    assert "| eu | GDPR | abababababababab | 1.0e-05 | record | 10.00 |" in md
    # Each node's own counts, as its describe reply carried them.
    assert (
        "| node | region | training units | records | excluded: no consent | excluded: special category or "
        "field | held-out records | skipped files | truncated units | truncated tokens | truncated held-out "
        "records |"
    ) in md
    assert "| eu-1 | eu | 104 | 200 | 3 | 2 | 40 | 1 | 4 | 77 | 0 |" in md
    assert "| eu-2 | eu | 104 | 200 | 3 | 2 | 40 | 0 | 0 | 0 | 0 |" in md
    egress = {(row[0], row[1]): row for row in _rows(md, "What left each node")}
    assert egress[("eu-1", "1")][2] == "100 units, cumulative epsilon 0.50"
    assert egress[("eu-1", "1")][3] == "update + train loss in slot eu (2 clients); loss revealed as the slot's sum"
    # us-1 is its region's only client: merged with sg-1 into the shared slot; alone there in round 2, masked.
    assert egress[("us-1", "1")][3].startswith("update + train loss in slot other-regions (2 clients)")
    assert egress[("us-1", "2")][3].endswith("loss stayed masked")
    assert egress[("us-1", "2")][4] == "slot other-regions (2 clients): stayed masked"
    assert egress[("sg-1", "2")][3].startswith("dropped after the key exchange")
    assert egress[("eu-1", "0")][4] == "slot eu (2 clients): released as the sum"
    assert egress[("eu-1", "end of run")][2].startswith("18 audit numbers and 1 redacted canary prompts, once")
    assert "evidence: ledger 3 entries, head bbbbbbbbbbbbbbbb, audit log 9 entries" in egress[("eu-1", "end of run")][2]
    assert egress[("br-1", "end of run")][2].startswith("no audit numbers")


def _rows(md: str, title: str) -> list[list[str]]:
    section = md.split(f"## {title}")[1].split("\n## ")[0]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| node |")
    ]


def test_report_renders_in_a_real_browser_with_verdicts_in_colour(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless check of the HTML report needs Chromium: apt-get install -y chromium")
    from PIL import Image

    from server.report import write_privacy_report

    run, cfg = federated_fake_run(tmp_path)
    write_privacy_report(run, cfg)
    page = (run.report_dir / "privacy-report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'ud'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in ("summary", "regions", "nodes", "egress", "audit", "plots", "audit-log"):
        assert f'id="{section}"' in dom.stdout
    assert 'class="verdict-bad">memorisation detected' in dom.stdout
    assert 'class="verdict-ok">no memorisation detected' in dom.stdout
    assert 'class="warn">planned, did NOT contribute' in dom.stdout
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1280,5200", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    painted = {rgb: n for n, rgb in colours}
    # The verdict backgrounds as the browser painted them: red for memorisation, green for none, amber for a
    # region that did not contribute (each cell is thousands of pixels).
    for rgb in ((0xFD, 0xE2, 0xE2), (0xE2, 0xF5, 0xE4), (0xFF, 0xF1, 0xC2)):
        assert painted.get(rgb, 0) > 500, rgb


def test_mlflow_gets_the_same_metrics_when_it_is_installed(tmp_path, monkeypatch):
    """MLflow is optional (not installed here): a stand-in records what fedsov asks of its tracking API."""
    import importlib.machinery
    import types

    from common.config import load_config
    from server.tracking import Trackers

    calls: list[tuple] = []
    fake = types.ModuleType("mlflow")
    fake.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(fake, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config([f"workdir={tmp_path / 'work'}", "regions=[eu]", "tracking.tensorboard=false"])
    trackers = Trackers(cfg, tmp_path / "work" / "runs" / "r1")
    trackers.log({"round": 1, "perplexity": {"eu": 20.0}, "epsilon": {"eu": 1.0}})
    trackers.close()
    by_name = {name: (args, kwargs) for name, args, kwargs in calls}
    assert by_name["set_tracking_uri"][0] == ((tmp_path / "work" / "mlruns").resolve().as_uri(),)
    assert by_name["start_run"][1] == {"run_name": "r1"} and by_name["log_params"][0][0]["regions"] == "eu"
    assert by_name["log_metrics"] == (({"perplexity/eu": 20.0, "epsilon/eu": 1.0},), {"step": 1})
    assert calls[-1][0] == "end_run"
