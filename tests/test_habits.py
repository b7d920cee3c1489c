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
    cfg, run, summary, _ = run_federation(small_overrides + ["federation.rounds=1", "federation.local_steps=2",
                                                             "audit.enabled=false"])
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
        assert (f"| {region} | {info['law']} | {float(info['epsilon']):.2f} | 1.0e-05 | record | 1 | "
                f"{manifest['audit'][region]['status']}") in card
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
    done = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, str(export), str(base)], cwd=elsewhere,
                          env={**env, "HF_HUB_OFFLINE": "1", "HOME": str(elsewhere)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # The same numbers as the run's own adapter on the run's own base, and not the base's alone.
    from peft import PeftModel

    original = load_base_model(Path(manifest["base_model"]["path"]), torch.device("cpu"), torch.float32)
    ids = torch.tensor([loaded["ids"]])
    assert loaded["ids"] == AutoTokenizer.from_pretrained(manifest["base_model"]["path"])(
        "The door code for the office is")["input_ids"]
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
    trackers.log({"round": 1, "perplexity": {"eu": 200.0, "us": 150.0, "overall": 175.0}, "train_loss": {"eu": 5.1},
                  "epsilon": {"eu": 1.5, "us": "inf"}, "clients_trained": 4, "seconds": 12.5})
    trackers.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"perplexity/eu", "perplexity/overall", "train_loss/eu", "epsilon/eu", "round/clients_trained"} <= tags
    assert "epsilon/us" not in tags  # infinite epsilon (no DP) has no point on a curve
    assert [(e.step, e.value) for e in events.Scalars("perplexity/eu")] == [(0, 400.0), (1, 200.0)]
    assert [(e.step, e.value) for e in events.Scalars("epsilon/eu")] == [(1, 1.5)]

    off = Trackers(load_config(["regions=[eu]", "tracking.tensorboard=false", "tracking.mlflow=false"]),
                   tmp_path / "off")
    off.log({"round": 0, "perplexity": {"eu": 1.0}})
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("override, message", [
    ("~federation.rounds", "would delete 'federation.rounds', and fedsov's schema would put its built-in default (5)"),
    ("~audit", "would delete the section 'audit'"),
    ("+federation.rounds=3", "'federation.rounds' already exists"),
    ("+regions=[eu]", "the regions group is already in the defaults list"),
    ("~regions=cn", "the regions group cannot be deleted"),
    ("privacy.target_epsilon=3,8", "is a sweep (one run per value): add -m"),
])
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
