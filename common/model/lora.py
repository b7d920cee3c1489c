"""LoRA adapters: attaching them, reading and writing their state, saving in PEFT format.

An adapter state is a name -> float32 CPU tensor mapping keyed like PEFT's saved files
(`base_model.model....lora_A.weight`), so the wire format and the files on disk agree.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from common.config import LoraSettings
from common.errors import ModelError

def make_lora_config(settings: LoraSettings, base_model):
    from peft import LoraConfig, TaskType
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    target = settings.target_modules
    if not target:
        model_type = getattr(base_model.config, "model_type", None)
        target = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if target is None:
            linear = sorted(
                {name.rsplit(".", 1)[-1] for name, m in base_model.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise ModelError(
                f"PEFT has no default LoRA target modules for architecture '{model_type}'. Set "
                f"model.lora.target_modules, e.g. to some of these linear layers: {', '.join(linear[:12])}."
            )
    # GPT-2 style Conv1D layers store weights transposed; PEFT needs to know.
    fan_in_fan_out = any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in target for name, m in base_model.named_modules()
    )
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(target),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )


def attach_lora(base_model, settings: LoraSettings, seed: int):
    """Wrap the (already placed, frozen) base model with a freshly initialised LoRA adapter."""
    from peft import get_peft_model

    config = make_lora_config(settings, base_model)
    # The public seed must not leak into any default generator afterwards (CPU or GPU): fork all.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # every party derives the same initial A matrices
        try:
            model = get_peft_model(base_model, config)
        except ValueError as err:
            raise ModelError(f"Cannot attach LoRA ({err}). Check model.lora.target_modules.") from err
    if settings.ffa:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def trainable_names(peft_model) -> list[str]:
    """State keys (PEFT naming) of the adapter tensors that training changes."""
    names = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            names.append(_state_key(name))
    return names


def adapter_state(peft_model) -> "OrderedDict[str, torch.Tensor]":
    """All adapter tensors as float32 CPU copies, keyed as in PEFT's adapter files."""
    from peft import get_peft_model_state_dict

    return OrderedDict(
        (k, v.detach().to("cpu", torch.float32).clone()) for k, v in get_peft_model_state_dict(peft_model).items()
    )


def load_adapter_state(peft_model, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an adapter state into the model; names and shapes must match exactly."""
    current = adapter_state(peft_model)
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ModelError(
            f"Adapter does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}. "
            "The coordinator and this node must use the same base model and LoRA settings."
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ModelError(
                f"Adapter tensor {k} has shape {tuple(v.shape)}, this model expects "
                f"{tuple(current[k].shape)}. Check model.lora.rank and the base model."
            )
    from peft import set_peft_model_state_dict

    with torch.no_grad():
        set_peft_model_state_dict(peft_model, {k: v.clone() for k, v in state.items()})


def save_adapter(peft_model, state: Mapping[str, torch.Tensor], out_dir: Path, base_model_path: Path) -> None:
    """Write `state` as a PEFT adapter folder loadable with PeftModel.from_pretrained."""
    load_adapter_state(peft_model, state)
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = str(base_model_path)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)


def _state_key(param_name: str) -> str:
    # Parameter "....lora_A.default.weight" is saved by PEFT as "....lora_A.weight".
    return param_name.replace(".default.", ".")
