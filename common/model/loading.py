"""Loading the base causal LM and its tokenizer from a local folder, offline, on the right device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from common.config import EMBEDDED_MODEL, DeviceChoice, DtypeChoice, ModelConfig
from common.errors import ModelError
from common.model.embedded import ensure_embedded_model


def resolve_model_path(cfg: ModelConfig, log=print) -> Path:
    """The local folder of the base model (building the embedded one on first use)."""
    if cfg.name_or_path == EMBEDDED_MODEL:
        return ensure_embedded_model(cfg.cache_dir, cfg.embedded, log=log)
    path = Path(cfg.name_or_path)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path}: no config.json there. fedsov never downloads "
            "models: point it at a local folder written by save_pretrained (config.json, weights "
            "and tokenizer files), or use model=tiny for the embedded default."
        )
    return path


def model_fingerprint(path: Path) -> str:
    """Hash of the model's config and weight files, so every node can check it has the same base."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in {".json", ".safetensors", ".bin"} and f.is_file() and not f.name.startswith("fedsov-"):
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
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
    except (OSError, ValueError) as err:
        raise ModelError(f"Cannot load a tokenizer from {path} ({err}). Save one there with save_pretrained.") from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"The tokenizer in {path} has neither a pad nor an EOS token; add one.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: Path, device: torch.device, dtype: torch.dtype):
    """Frozen base model in eval mode, already on `device` (before any LoRA is attached)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"Cannot load a causal language model from {path} ({err}). fedsov needs a model that "
            "AutoModelForCausalLM loads offline."
        ) from err
    # Moving to the device before get_peft_model matters: the other order can leave DP-LoRA
    # training adapters that are not the ones used (opacus issue #820).
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
