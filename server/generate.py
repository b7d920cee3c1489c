"""`fedsov generate`: text from base model + an adapter (run, adapter or export folder), PII flagged, privacy card."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from common.errors import ModelError
from common.model.loading import load_base_model, load_tokenizer
from common.pii import PiiDetector
from server.provenance import read_manifest


def privacy_card(manifest: dict) -> list[str]:
    lines = [
        f"Privacy card: adapter of run {manifest['run_id']} ({manifest['rounds_completed']} rounds, coordinator in "
        f"{manifest['coordinator_jurisdiction']}, DP {'on' if manifest['dp'] else 'OFF'}, secure aggregation "
        f"{'on' if manifest['secure_aggregation'] else 'OFF'})"
    ]
    for region, info in manifest["contributing_regions"].items():
        audit = manifest.get("audit", {}).get(region, {})
        eps = info["epsilon"]
        eps_text = (
            "no DP guarantee"
            if eps == "inf"
            else f"epsilon {float(eps):.2f} at delta {info['delta']:g} per {info['unit']}"
        )
        lines.append(
            f"  {region} ({info['law']}): {eps_text}; audit: {audit.get('status', 'not audited')}"
            + (f" ({'; '.join(audit['signals'])})" if audit.get("signals") else "")
            + f"; deploy only in: {', '.join(info['allowed_deployment'])}"
        )
    for region, why in manifest.get("excluded_regions", {}).items():
        lines.append(f"  {region}: not in this model ({why})")
    if manifest.get("privacy_report"):
        lines.append(f"  full report: {manifest['privacy_report']}")
    return lines


def mark_pii(text: str, detector: PiiDetector) -> tuple[str, list[str]]:
    """The text with each detected span wrapped as [[ENTITY: span]], and the spans found."""
    out, last, found = [], 0, []
    for span in detector.find(text):
        out += [text[last : span.start], f"[[{span.entity}: {span.text}]]"]
        found.append(f"{span.entity}: {span.text}")
        last = span.end
    return "".join(out + [text[last:]]), found


def resolve_adapter(path: Path) -> Path:
    """The adapter folder in what a user passed: a run directory, its adapter/ folder, or an export."""
    path = Path(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    if (path / "adapter_config.json").is_file():
        return path
    raise ModelError(
        f"{path} holds no adapter: give a run directory, its adapter/ folder or a `fedsov export` "
        "folder (each has adapter_config.json)."
    )


def resolve_base(manifest: dict, base: Path | None) -> Path:
    """The base model folder: --base if given, else the run's own; either way it must match the fingerprint."""
    from common.model.loading import model_fingerprint

    expected = manifest["base_model"]["fingerprint"]
    if base is None:
        base = Path(manifest["base_model"]["path"])
        if not (base / "config.json").is_file():
            raise ModelError(
                f"The run's base model {base} is not on this machine: pass --base <folder> holding the "
                f"same model (fingerprint {expected[:16]}...; see base-model-reference/ in an export)."
            )
    elif not (Path(base) / "config.json").is_file():
        raise ModelError(f"--base {base} is not a model folder (no config.json); give the base model's folder.")
    found = model_fingerprint(Path(base))
    if found != expected:
        raise ModelError(
            f"--base {base} is not the model this adapter was trained on: its fingerprint is "
            f"{found[:16]}..., the adapter's base has {expected[:16]}.... Use a byte-identical copy."
        )
    return Path(base)


@torch.no_grad()
def generate(
    path: Path,
    prompt: str,
    *,
    samples: int = 1,
    max_new_tokens: int = 60,
    base: Path | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Text from base + adapter (a run directory, its adapter folder or an export), PII marked, privacy card."""
    from peft import PeftModel

    adapter = resolve_adapter(path)
    manifest = read_manifest(adapter)
    base_path = resolve_base(manifest, base)
    # An export carries the tokenizer the adapter was trained with; a run's adapter folder uses the base's.
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base_path)
    model = PeftModel.from_pretrained(load_base_model(base_path, torch.device("cpu"), torch.float32), str(adapter))
    model.eval()
    detector = PiiDetector()
    ids = tokenizer(prompt, return_tensors="pt") if prompt else {"input_ids": torch.tensor([[tokenizer.eos_token_id]])}
    for i in range(samples):
        output = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=50, pad_token_id=tokenizer.eos_token_id
        )
        marked, found = mark_pii(tokenizer.decode(output[0], skip_special_tokens=True), detector)
        out(f"--- sample {i + 1}\n{marked}")
        out(f"    PII flagged: {', '.join(found)}" if found else "    no PII detected")
    out("\n".join(privacy_card(manifest)))
    return 0
