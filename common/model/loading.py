"""Loading the base causal LM and its tokenizer from a local folder, offline, on the right device."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from common.config import EMBEDDED_MODEL, DeviceChoice, DtypeChoice, ModelConfig
from common.errors import ModelError
from common.model.embedded import ensure_embedded_model

# What a model folder must hold: weights in one of these layouts, and the files of some tokenizer.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")
# Files that decide what the model computes from a text: config, weights and tokenizer (fedsov's own excluded).
FINGERPRINTED_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".jinja"}


def resolve_model_path(cfg: ModelConfig, log=print) -> Path:
    """The local folder of the base model (building the embedded one on first use), checked loadable."""
    if cfg.name_or_path == EMBEDDED_MODEL:
        return ensure_embedded_model(cfg.cache_dir, cfg.embedded, log=log)
    path = Path(cfg.name_or_path).expanduser()
    check_model_folder(path, cfg.name_or_path)
    return path


def check_model_folder(path: Path, name: str | None = None) -> None:
    """Refuse, before anything starts, a folder that fedsov cannot load offline without running code from it."""
    name = name or str(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            base = "not named"
        raise ModelError(
            f"model.name_or_path={name} is a LoRA adapter (its base: {base}), not a base model. Point "
            "model.name_or_path at the base model's folder."
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.name_or_path={name}: no config.json there. fedsov never downloads "
            "models: point it at a local folder written by save_pretrained (config.json, weights "
            "and tokenizer files), or use model=tiny for the embedded default."
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(
            f"{path / 'config.json'} is not valid JSON ({err}). Re-save the model with save_pretrained."
        ) from err
    _check_architecture(config, name)
    _check_weights(path, name)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"model.name_or_path={name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Copy the "
            "tokenizer that came with the model into the folder, or save it there with tokenizer.save_pretrained."
        )


def _check_architecture(config: dict, name: str) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        if "auto_map" in config:
            # Loading would execute Python files shipped with the weights on every node that holds personal data.
            code = ", ".join(sorted(set(config["auto_map"].values())))
            raise ModelError(
                f"model.name_or_path={name}: architecture '{model_type}' exists only as custom code in the model "
                f"folder ({code}) and needs trust_remote_code=True, which "
                f"fedsov refuses: that code would run on every node holding personal data. Use a version of the model "
                f"that transformers implements itself (transformers {transformers.__version__} here; a newer release "
                "may add the architecture), or convert the checkpoint to such an architecture."
            )
        raise ModelError(
            f"model.name_or_path={name}: config.json names model_type '{model_type}', which transformers "
            f"{transformers.__version__} does not know. Upgrade transformers, or check that this is a model folder."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"model.name_or_path={name}: a '{model_type}' model is not a causal (decoder-only) language model, which "
            "is what fedsov fine-tunes. Use a model AutoModelForCausalLM loads (e.g. Llama, Mistral, Qwen2, Gemma, "
            "Phi-3, GPT-NeoX, GPT-2)."
        )


def _check_weights(path: Path, name: str) -> None:
    present = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise ModelError(
            f"model.name_or_path={name} holds no weights (none of {', '.join(WEIGHT_FILES)}). Copy the whole model "
            "folder, weight files included, or save the model there with save_pretrained."
        )
    if present[0].endswith(".index.json"):
        try:
            shards = set(json.loads((path / present[0]).read_text())["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ModelError(
                f"{path / present[0]} is not a weight index ({err}). Re-save the model with save_pretrained."
            ) from err
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(
                f"model.name_or_path={name}: {len(missing)} of the {len(shards)} weight shards that {present[0]} lists "
                f"are missing ({', '.join(missing[:4])}). Copy every shard of the model into the folder."
            )


def model_fingerprint(path: Path) -> str:
    """Hash of the model's config, weight and tokenizer files, so every node can check it has the same base."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in FINGERPRINTED_SUFFIXES and f.is_file() and not f.name.startswith("fedsov-"):
            h.update(f.name.encode())
            digest = hashlib.sha256()
            with open(f, "rb") as stream:  # in chunks: weight shards run to gigabytes
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(chunk)
            h.update(digest.digest())
    return h.hexdigest()


def pick_device(choice: DeviceChoice) -> torch.device:
    if choice == DeviceChoice.cuda or (choice == DeviceChoice.auto and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(choice: DtypeChoice, device: torch.device) -> torch.dtype:
    """bfloat16 for the frozen base on a CUDA device that supports it, else float32."""
    if choice == DtypeChoice.float32:
        return torch.float32
    if choice == DtypeChoice.bfloat16:
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # a damaged file fails anywhere inside transformers (KeyError, ...); kept chained
        raise ModelError(
            f"Cannot load a tokenizer from {path} ({err}). Copy the tokenizer files that came with the model "
            "into the folder, or save the tokenizer there with save_pretrained."
        ) from err
    if tokenizer.pad_token_id is None:
        # Llama, Mistral, Phi-3 and GPT-NeoX ship without a pad token. Padded positions are masked out
        # of attention and loss, so any id will do; EOS is one every causal LM has.
        if tokenizer.eos_token_id is None:
            raise ModelError(f"The tokenizer in {path} has neither a pad nor an EOS token; add one.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: Path, device: torch.device, dtype: torch.dtype, *, gradient_checkpointing: bool = False):
    """Frozen base model in eval mode, already on `device` (before any LoRA is attached)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = fused_activation(AutoConfig.from_pretrained(path, local_files_only=True))
        model = AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ModelError(
            f"Cannot load a causal language model from {path} ({type(err).__name__}: {err}). fedsov needs a "
            "complete model folder that AutoModelForCausalLM loads offline: copy it again, or re-save it with "
            "save_pretrained."
        ) from err
    # Moving to the device before get_peft_model matters: the other order can leave DP-LoRA
    # training adapters that are not the ones used (opacus issue #820).
    model.to(device)
    return frozen_base(model, gradient_checkpointing=gradient_checkpointing)


# GPT-2's "gelu_new" is the tanh approximation of GELU written as eight tensor operations in Python, each with its
# own backward; "gelu_pytorch_tanh" is the same formula in one fused kernel (logits agree to ~1e-6). On the embedded
# model a DP training step takes about 15% less time with it.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def fused_activation(config):
    """The model's config with its activation computed by a fused kernel where one computes the same function."""
    for field in ("activation_function", "hidden_act"):
        current = getattr(config, field, None)
        if isinstance(current, str) and current in FUSED_ACTIVATIONS:
            setattr(config, field, FUSED_ACTIVATIONS[current])
    return config


def frozen_base(model, *, gradient_checkpointing: bool = False):
    """The base model as LoRA training needs it: eval mode, no parameter trainable, checkpointing if asked."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them.

    Only the re-entrant variant keeps Opacus's per-sample gradients exact: its first forward runs
    without autograd, so Opacus captures each LoRA layer's input once, in the recomputation. The
    non-re-entrant variant captures it twice and leaves some per-sample gradients unset. The frozen
    embeddings' output must require grad, or the re-entrant checkpoint passes no gradient back.
    """
    model_type = getattr(model.config, "model_type", None)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"model.gradient_checkpointing=true: transformers implements no gradient checkpointing for "
            f"'{model_type}'. Set model.gradient_checkpointing=false (and lower federation.batch_size or "
            "model.max_length if memory is short)."
        )
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
