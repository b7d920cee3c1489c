"""LoRA adapters: attaching them, reading and writing their state, saving in PEFT format.

An adapter state is a name -> float32 CPU tensor mapping keyed like PEFT's saved files
(`base_model.model....lora_A.weight`), so the wire format and the files on disk agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from common.config import LoraSettings
from common.errors import ModelError

# Architectures PEFT has no default LoRA targets for, given the same role as PEFT's defaults elsewhere:
# the attention's input projection (Phi-3 fuses q, k and v into one layer, as GPT-NeoX does).
FALLBACK_TARGETS = {"phi3": ["qkv_proj"]}
ALL_LINEAR = "all-linear"


def linear_layer_names(base_model) -> list[str]:
    """Leaf names of the linear layers LoRA can target, without the output layer (the embeddings' twin)."""
    from transformers.pytorch_utils import Conv1D

    output = base_model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in base_model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output
        }
    )


def resolve_target_modules(settings: LoraSettings, base_model) -> list[str]:
    """The leaf module names LoRA attaches to: as configured, `[all-linear]`, or the architecture's default."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(base_model.config, "model_type", None)
    target = settings.target_modules
    if target and ALL_LINEAR in target:
        if len(target) > 1:
            raise ModelError(
                f"model.lora.target_modules={list(target)}: '{ALL_LINEAR}' already names every linear layer; "
                f"give it alone or list layer names instead."
            )
        return linear_layer_names(base_model)
    if target:
        return list(target)
    default = None
    if model_type is not None:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or FALLBACK_TARGETS.get(model_type)
    if default is None:
        raise ModelError(
            f"PEFT has no default LoRA target modules for architecture '{model_type}'. Set "
            f"model.lora.target_modules, e.g. to [{ALL_LINEAR}] or to some of these linear layers: "
            f"{', '.join(linear_layer_names(base_model)[:12])}."
        )
    return list(default)


def make_lora_config(settings: LoraSettings, base_model):
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    target = resolve_target_modules(settings, base_model)
    # GPT-2 style Conv1D layers store weights transposed; PEFT needs to know.
    fan_in_fan_out = any(
        isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in target for name, m in base_model.named_modules()
    )
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=settings.alpha,  # PEFT says int, uses it only in alpha / r
        lora_dropout=settings.dropout,
        target_modules=list(target),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )


def attach_lora(base_model, settings: LoraSettings, seed: int):
    """Wrap the (already placed, frozen) base model with a freshly initialised LoRA adapter."""
    from peft import get_peft_model

    config = make_lora_config(settings, base_model)
    model_type = getattr(base_model.config, "model_type", None)
    # The public seed must not leak into any default generator afterwards (CPU or GPU): fork all.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # every party derives the same initial A matrices
        try:
            model = get_peft_model(base_model, config)
        except ValueError as err:
            raise ModelError(
                f"Cannot attach LoRA to {model_type} with target_modules={sorted(config.target_modules)} ({err}). "
                f"Set model.lora.target_modules to [{ALL_LINEAR}] or to some of this model's linear layers: "
                f"{', '.join(linear_layer_names(base_model)[:12])}."
            ) from err
    check_per_sample_gradients(model)
    if settings.ffa:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def check_per_sample_gradients(peft_model) -> None:
    """Refuse adapters DP-SGD cannot train: every trainable tensor must sit in a layer Opacus has
    a per-sample gradient rule for (PEFT keeps embedding adapters in bare parameter dicts, which
    are never called, so Opacus would only fail at the first optimiser step)."""
    from opacus import GradSampleModule

    model_type = getattr(peft_model.config, "model_type", None)
    for name, module in peft_model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            if type(module) not in GradSampleModule.GRAD_SAMPLERS:
                layer = name.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
                raise ModelError(
                    f"LoRA on {layer} ({model_type}) cannot be trained with DP-SGD: its adapter is a "
                    f"{type(module).__name__}, for which Opacus has no per-sample gradients (LoRA on an embedding "
                    f"layer is such a case). Remove '{layer.rsplit('.', 1)[-1]}' from model.lora.target_modules "
                    f"and target linear layers, e.g. [{ALL_LINEAR}]."
                )


def trainable_names(peft_model) -> list[str]:
    """State keys (PEFT naming) of the adapter tensors that training changes."""
    names = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            names.append(_state_key(name))
    return names


def adapter_state(peft_model) -> OrderedDict[str, torch.Tensor]:
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
