"""The family matrix at node level: every family's tiny model takes LoRA (PEFT's default targets,
all linear layers, FFA-LoRA), trains one DP step with exact per-sample gradients (also in bfloat16
and under gradient checkpointing), reloads with PEFT and generates; what DP-SGD cannot train is
refused before training."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from client.training import DpSettings, collate, train_locally, unit_losses
from common.config import LoraSettings
from common.errors import ModelError
from common.model.families import FAMILIES, build_tiny_model, embedded_tokenizer, family
from common.model.loading import load_base_model, load_tokenizer
from common.model.lora import FALLBACK_TARGETS, adapter_state, attach_lora, linear_layer_names, save_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from benchlib import noiseless_dp_update  # noqa: E402  (shared with scripts/device_check.py)

# Lengths beyond the tiny models' 16-token sliding window (Mistral, Gemma 3), and unequal, so padding is exercised.
LENGTHS = (41, 23, 33)


class TinyModels:
    """Each family's folder, built on first use with one shared embedded tokenizer."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer_dir = root / "embedded-tokenizer"
        embedded_tokenizer().save_pretrained(self.tokenizer_dir)

    def path(self, name: str) -> Path:
        folder = self.root / name
        if not (folder / "config.json").is_file():
            build_tiny_model(name, folder, tokenizer_dir=self.tokenizer_dir)
        return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("families"))


def lora(path: Path, dtype=torch.float32, **settings):
    settings = {"rank": 4, "alpha": 8, **settings}
    return attach_lora(load_base_model(path, torch.device("cpu"), dtype), LoraSettings(**settings), seed=0)


def unit_examples(tokenizer, n: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, len(tokenizer) - 1, (LENGTHS[i % 3],), generator=g).tolist() for i in range(n)]


def adapted_layers(model) -> set[str]:
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter_state(model)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_with_dp_reloads_and_generates(name, tiny_models, tmp_path):
    from peft import PeftModel

    path = tiny_models.path(name)
    tok = load_tokenizer(path)
    # Families shipped without a pad token get EOS; Gemma keeps its own.
    assert tok.pad_token_id is not None
    assert (tok.pad_token_id == tok.eos_token_id) == (family(name).padding != "own")
    examples = unit_examples(tok)
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0)

    default = lora(path)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = default.config.model_type
    assert adapted_layers(default) == set(PEFT_DEFAULTS.get(model_type) or FALLBACK_TARGETS[model_type])
    everything = lora(path, target_modules=["all-linear"])
    base = load_base_model(path, torch.device("cpu"), torch.float32)
    assert adapted_layers(everything) == set(linear_layer_names(base)) > adapted_layers(default)
    assert not any("lm_head" in k or "embed_out" in k for k in adapter_state(everything))  # the output layer stays
    for model in (default, everything):
        before = adapter_state(model)
        result = train_locally(
            model, examples, steps=2, batch_size=6, learning_rate=1e-2, dp=dp, pad_id=tok.pad_token_id
        )
        assert result.steps == 2 and math.isfinite(result.mean_loss)
        assert all(torch.isfinite(u).all() for u in result.update.values())
        # B starts at zero, so step 1 moves only B and step 2 moves A as well: every tensor trained.
        assert all(u.abs().sum() > 0 for u in result.update.values()) and set(result.update) == set(before)

    ffa = lora(path, target_modules=["all-linear"], ffa=True)
    before = adapter_state(ffa)
    result = train_locally(ffa, examples, steps=2, batch_size=6, learning_rate=1e-2, dp=dp, pad_id=tok.pad_token_id)
    assert result.update and all("lora_B" in k for k in result.update)
    assert all(torch.equal(adapter_state(ffa)[k], before[k]) for k in before if "lora_A" in k)

    trained = adapter_state(everything)
    save_adapter(everything, trained, tmp_path / "adapter", path)
    reloaded = PeftModel.from_pretrained(
        load_base_model(path, torch.device("cpu"), torch.float32), str(tmp_path / "adapter")
    )
    assert all(torch.equal(adapter_state(reloaded)[k], v) for k, v in trained.items())
    prompt = tok("hello there", return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 6)


def per_sample_gradients(model, ids, mask) -> dict[str, torch.Tensor]:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.train()
    try:
        unit_losses(wrapped, ids, mask)[0].sum().backward()
        return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        wrapped._close()
        model.eval()


def randomise_b(model) -> None:
    """B starts at zero, which makes every gradient for A zero: give B values so that A's are checked too."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_sample_gradients_are_each_units_own_gradient(name, tiny_models):
    """What DP-SGD clips is each unit's own gradient, whatever the architecture does across the padded batch
    (grouped-query and sliding-window attention, padding), and gradient checkpointing leaves it unchanged."""
    path = tiny_models.path(name)
    tok = load_tokenizer(path)
    examples = unit_examples(tok, n=3)
    ids, mask = collate(examples, tok.pad_token_id, torch.device("cpu"))
    model = lora(path, target_modules=["all-linear"])
    randomise_b(model)
    batched = per_sample_gradients(model, ids, mask)
    for i, example in enumerate(examples):
        alone_ids, alone_mask = collate([example], tok.pad_token_id, torch.device("cpu"))
        model.zero_grad(set_to_none=True)
        model.train()
        unit_losses(model, alone_ids, alone_mask)[0].sum().backward()
        model.eval()
        for n, p in model.named_parameters():
            if p.requires_grad:
                scale = p.grad.abs().max()
                assert scale > 0, n
                assert (batched[n][i] - p.grad).abs().max() <= 1e-4 * scale, (n, i)
    checkpointed = attach_lora(
        load_base_model(path, torch.device("cpu"), torch.float32, gradient_checkpointing=True),
        LoraSettings(rank=4, alpha=8, target_modules=["all-linear"]),
        seed=0,
    )
    randomise_b(checkpointed)
    again = per_sample_gradients(checkpointed, ids, mask)
    assert set(again) == set(batched)
    assert all(torch.allclose(again[n], batched[n], rtol=1e-5, atol=1e-7) for n in batched)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bfloat16_base_keeps_float32_lora_and_matches_a_float32_update(name, tiny_models):
    path = tiny_models.path(name)
    tok = load_tokenizer(path)
    ids, mask = collate(unit_examples(tok, n=6), tok.pad_token_id, torch.device("cpu"))
    updates = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = lora(path, dtype=dtype, target_modules=["all-linear"])
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert dtype in {p.dtype for p in model.parameters() if not p.requires_grad}
        randomise_b(model)
        updates[dtype] = noiseless_dp_update(model, ids, mask)
    reference = updates[torch.float32]
    # bfloat16 keeps 8 significant bits: about 1% relative error through a tiny model; allow 5%.
    assert (updates[torch.bfloat16] - reference).norm() <= 0.05 * reference.norm()


@pytest.mark.parametrize(
    "name,layer,model_type",
    [("llama", "embed_tokens", "llama"), ("gpt2", "wte", "gpt2"), ("gemma3", "embed_tokens", "gemma3_text")],
)
def test_lora_on_an_embedding_layer_is_refused_before_training(name, layer, model_type, tiny_models):
    with pytest.raises(ModelError) as err:
        lora(tiny_models.path(name), target_modules=[layer])
    message = str(err.value)
    assert f"{layer} ({model_type})" in message and "Opacus has no per-sample gradients" in message
    assert f"Remove '{layer}' from model.lora.target_modules" in message


def test_lora_targets_that_do_not_exist_or_mix_all_linear_are_refused(tiny_models):
    path = tiny_models.path("gpt_neox")
    with pytest.raises(ModelError, match=r"gpt_neox.*q_proj.*query_key_value"):
        lora(path, target_modules=["q_proj"])
    with pytest.raises(ModelError, match=r"'all-linear' already names every linear layer"):
        lora(path, target_modules=["all-linear", "dense"])


def test_gpt2s_python_gelu_is_loaded_as_the_fused_kernel_of_the_same_function(tiny_models):
    from transformers import AutoModelForCausalLM

    path = tiny_models.path("gpt2")
    as_saved = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    loaded = load_base_model(path, torch.device("cpu"), torch.float32)
    assert as_saved.config.activation_function == "gelu_new"
    assert loaded.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(1, as_saved.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, as_saved(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_unknown_family_names_the_known_ones(tmp_path):
    with pytest.raises(ModelError, match=r"Unknown model family 'bloom'.*llama.*gpt_neox"):
        build_tiny_model("bloom", tmp_path)


def federation_overrides(tmp_path: Path, folder: Path, *extra: str) -> list[str]:
    """One round of a two-client federation on `folder`: secure aggregation and DP as the region policies require."""
    return [
        f"workdir={tmp_path / 'work'}",
        "regions=[us]",
        "data.users_per_region=40",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.eval_batch_size=64",
        "model.max_length=64",
        "audit.enabled=false",
        # A fixed sigma: deriving it from a target epsilon costs seconds of accounting and proves nothing here.
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1.0",
        "model=hf",
        f"model.name_or_path={folder}",
        "model.lora.rank=4",
        "model.lora.alpha=8",
        *extra,
    ]


def check_federated_adapter(cfg, run, summary, folder: Path, unit: str) -> set[str]:
    """The round ran securely under DP and its adapter loads with PEFT and generates; returns the adapted layers."""
    from peft import PeftModel

    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    row = run.read_metrics()[-1]
    assert row["secure_aggregation"] and row["aggregated"]
    us = summary["regions"]["us"]
    assert us["unit"] == unit and us["epsilon"] > 0 and math.isfinite(us["perplexity_after"])
    settings = cfg.model.lora
    initial = adapter_state(
        attach_lora(load_base_model(folder, torch.device("cpu"), torch.float32), settings, cfg.federation.seed)
    )
    model = PeftModel.from_pretrained(load_base_model(folder, torch.device("cpu"), torch.float32), str(run.adapter_dir))
    saved = adapter_state(model)
    assert set(saved) == set(initial)
    assert all(not torch.equal(saved[k], initial[k]) for k in saved if "lora_B" in k)
    if settings.ffa:
        assert all(torch.equal(saved[k], initial[k]) for k in saved if "lora_A" in k)
    tok = load_tokenizer(folder)
    out = model.generate(
        **tok("my order", return_tensors="pt"), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape[1] == len(tok("my order")["input_ids"]) + 4
    return adapted_layers(model)


# One federation per family; the variants are spread so that each runs end to end in several families
# (all of them run for every family at node level above).
FEDERATIONS = {
    "gpt2": dict(targets=None, ffa=False, unit="record"),
    "llama": dict(targets="all-linear", ffa=False, unit="user"),
    "mistral": dict(targets=None, ffa=True, unit="record", checkpointing=True),
    "qwen2": dict(targets="all-linear", ffa=True, unit="user"),
    "gemma3": dict(targets=None, ffa=False, unit="user"),
    "phi3": dict(targets="all-linear", ffa=False, unit="record"),
    "gpt_neox": dict(targets=None, ffa=True, unit="user", checkpointing=True),
}


@pytest.mark.parametrize("name", list(FEDERATIONS))
def test_one_secure_dp_round_per_family(name, tiny_models, tmp_path, config_dir):
    from tests.conftest import edit_policy
    from tests.inprocess import run_federation

    variant = FEDERATIONS[name]
    folder = tiny_models.path(name)
    edit_policy(config_dir, "us", "privacy.unit", variant["unit"])
    extra = [f"model.lora.ffa={str(variant['ffa']).lower()}"]
    if variant["targets"]:
        extra.append(f"model.lora.target_modules=[{variant['targets']}]")
    if variant.get("checkpointing"):
        extra.append("model.gradient_checkpointing=true")
    cfg, run, summary, _ = run_federation(federation_overrides(tmp_path, folder, *extra))
    layers = check_federated_adapter(cfg, run, summary, folder, variant["unit"])
    from client.node import _MODELS

    (node_model,) = _MODELS.values()  # the model the last node trained, kept for its next message
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in node_model.modules())
    assert checkpointing == variant.get("checkpointing", False)
    base = load_base_model(folder, torch.device("cpu"), torch.float32)
    assert layers == (set(linear_layer_names(base)) if variant["targets"] else adapted_layers(lora(folder)))
