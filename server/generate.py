"""`fedsov generate`: text from base model + a run's adapter, with PII flagged and the privacy card shown."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from common.errors import ModelError
from common.model.loading import load_base_model, load_tokenizer
from common.pii import PiiDetector
from server.provenance import read_manifest


def privacy_card(manifest: dict) -> list[str]:
    lines = [f"Privacy card: adapter of run {manifest['run_id']} ({manifest['rounds_completed']} rounds, coordinator in "
             f"{manifest['coordinator_jurisdiction']}, DP {'on' if manifest['dp'] else 'OFF'}, secure aggregation "
             f"{'on' if manifest['secure_aggregation'] else 'OFF'})"]
    for region, info in manifest["contributing_regions"].items():
        audit = manifest.get("audit", {}).get(region, {})
        eps = info["epsilon"]
        eps_text = "no DP guarantee" if eps == "inf" else f"epsilon {float(eps):.2f} at delta {info['delta']:g} per {info['unit']}"
        lines.append(f"  {region} ({info['law']}): {eps_text}; audit: {audit.get('status', 'not audited')}"
                     + (f" ({'; '.join(audit['signals'])})" if audit.get("signals") else "")
                     + f"; deploy only in: {', '.join(info['allowed_deployment'])}")
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


@torch.no_grad()
def generate(run_dir: Path, prompt: str, *, samples: int = 1, max_new_tokens: int = 60,
             out: Callable[[str], None] = print) -> int:
    from peft import PeftModel

    adapter = Path(run_dir) / "adapter"
    manifest = read_manifest(adapter)
    base_path = Path(manifest["base_model"]["path"])
    if not base_path.exists():
        raise ModelError(f"The run's base model {base_path} is not on this machine; copy it there first.")
    tokenizer = load_tokenizer(base_path)
    model = PeftModel.from_pretrained(load_base_model(base_path, torch.device("cpu"), torch.float32), str(adapter))
    model.eval()
    detector = PiiDetector()
    ids = tokenizer(prompt, return_tensors="pt") if prompt else {"input_ids": torch.tensor([[tokenizer.eos_token_id]])}
    for i in range(samples):
        output = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=50,
                                pad_token_id=tokenizer.eos_token_id)
        marked, found = mark_pii(tokenizer.decode(output[0], skip_special_tokens=True), detector)
        out(f"--- sample {i + 1}\n{marked}")
        out(f"    PII flagged: {', '.join(found)}" if found else "    no PII detected")
    out("\n".join(privacy_card(manifest)))
    return 0
