"""A model folder as users have one (shards, chat template, torch_dtype) loads and trains; a folder fedsov
cannot use is refused before anything starts, with the problem and the fix; the fingerprint tells bases apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.config import ModelConfig
from common.errors import ModelError
from common.model.families import build_tiny_model
from common.model.loading import load_base_model, load_tokenizer, model_fingerprint, resolve_model_path

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"


def users_folder(folder: Path) -> Path:
    """A Qwen2 folder laid out as published checkpoints often are: bfloat16 weights in shards with an index,
    `torch_dtype` in config.json and the chat template inside tokenizer_config.json (older transformers' layout)."""
    build_tiny_model("qwen2", folder, dtype=torch.bfloat16, max_shard_size="150KB", chat_template=CHAT_TEMPLATE)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype", "bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    template = folder / "chat_template.jinja"
    if template.is_file():
        tokenizer_config["chat_template"] = template.read_text()
        template.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return users_folder(tmp_path_factory.mktemp("users-model") / "qwen2-chat")


def resolve(folder: Path) -> Path:
    return resolve_model_path(ModelConfig(name_or_path=str(folder)), log=lambda m: None)


def test_a_folder_as_users_have_it_loads_and_trains_in_a_federation(good_folder, tmp_path, config_dir):
    from tests.inprocess import run_federation
    from tests.test_families import check_federated_adapter, federation_overrides

    assert len(list(good_folder.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((good_folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert resolve(good_folder) == good_folder
    tok = load_tokenizer(good_folder)
    chat = tok.apply_chat_template([{"role": "user", "content": "my order?"}], tokenize=False)
    assert chat == "<|user|>my order?<|endoftext|>"
    # A bfloat16 checkpoint becomes the dtype fedsov asks for (float32 on a CPU).
    assert {p.dtype for p in load_base_model(good_folder, torch.device("cpu"), torch.float32).parameters()} == {
        torch.float32
    }
    cfg, run, summary, _ = run_federation(federation_overrides(tmp_path, good_folder, "model.lora.target_modules=null"))
    assert check_federated_adapter(cfg, run, summary, good_folder, "record") == {"q_proj", "v_proj"}


def _drop(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).unlink()


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _only_adapter(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))


def _second_shard(folder: Path) -> str:
    return sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))[1]


BROKEN = {
    "no tokenizer": (
        lambda f: _drop(f, "tokenizer.json", "tokenizer_config.json"),
        ["holds no tokenizer", "tokenizer.save_pretrained"],
    ),
    "not a model folder": (lambda f: _drop(f, "config.json"), ["no config.json there", "never downloads"]),
    "a LoRA adapter, not a base": (_only_adapter, ["is a LoRA adapter", "/models/base", "base model's folder"]),
    "needs trust_remote_code": (
        lambda f: _edit_config(f, model_type="acme_lm", auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeLM"}),
        ["'acme_lm'", "modeling_acme.AcmeLM", "trust_remote_code=True", "fedsov refuses", "transformers implements"],
    ),
    "unknown architecture": (lambda f: _edit_config(f, model_type="acme_lm"), ["'acme_lm'", "Upgrade transformers"]),
    "not a causal LM": (
        lambda f: _edit_config(f, model_type="t5"),
        ["'t5' model is not a causal", "AutoModelForCausalLM"],
    ),
    "config not JSON": (lambda f: (f / "config.json").write_text("{model_type: qwen2"), ["not valid JSON"]),
    "a missing shard": (
        lambda f: _drop(f, _second_shard(f)),
        ["1 of the", "weight shards", "are missing", "Copy every shard"],
    ),
    "no weights": (lambda f: [p.unlink() for p in f.glob("model*.safetensors*")], ["holds no weights"]),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_a_folder_fedsov_cannot_use_is_refused_before_anything_starts(problem, good_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    breaks, phrases = BROKEN[problem]
    breaks(folder)
    with pytest.raises(ModelError) as err:
        resolve(folder)
    for phrase in phrases:
        assert phrase in str(err.value), (phrase, str(err.value))
    if problem == "a missing shard":
        assert _second_shard(good_folder) in str(err.value)


def test_a_damaged_weight_file_or_tokenizer_is_a_model_error(good_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    shard = folder / _second_shard(folder)
    shard.write_bytes(shard.read_bytes()[:200])  # an interrupted copy
    with pytest.raises(ModelError, match=r"SafetensorError.*copy it again"):
        load_base_model(resolve(folder), torch.device("cpu"), torch.float32)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"Cannot load a tokenizer.*Copy the tokenizer files"):
        load_tokenizer(folder)


def test_the_coordinator_refuses_a_model_needing_remote_code_before_any_round(good_folder, tmp_path, config_dir):
    from tests.inprocess import run_federation
    from tests.test_families import federation_overrides

    folder = tmp_path / "model"
    shutil.copytree(good_folder, folder)
    _edit_config(folder, model_type="acme_lm", auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeLM"})
    with pytest.raises(ModelError, match="trust_remote_code"):
        run_federation(federation_overrides(tmp_path, folder))
    assert not (tmp_path / "work" / "nodes").exists()  # no node was asked to train


def test_fingerprint_names_the_same_base_whatever_its_path_and_nothing_else(good_folder, tmp_path):
    copy = tmp_path / "elsewhere" / "same-model"
    shutil.copytree(good_folder, copy)
    same = model_fingerprint(good_folder)
    assert model_fingerprint(copy) == same
    (copy / "fedsov-build.json").write_text("{}")  # fedsov's own notes are not the model
    assert model_fingerprint(copy) == same
    (copy / "README.md").write_text("notes")
    assert model_fingerprint(copy) == same
    # A different tokenizer makes a different base, even with the same weights.
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|eos|>"
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert model_fingerprint(copy) != same
    shutil.copy(good_folder / "tokenizer.json", copy / "tokenizer.json")
    (copy / "tokenizer.model").write_bytes(b"sentencepiece")  # e.g. Llama's and Gemma's tokenizer file
    assert model_fingerprint(copy) != same
    # The same weights re-saved in other shards hash differently: copy model folders, do not re-save them.
    resaved = tmp_path / "resaved"
    load_base_model(good_folder, torch.device("cpu"), torch.bfloat16).save_pretrained(resaved)
    for f in good_folder.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, resaved / f.name)
    assert len(list(resaved.glob("model*.safetensors"))) == 1
    assert model_fingerprint(resaved) != same
