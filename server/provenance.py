"""Model provenance: the manifest that travels with an adapter, its model card, and exports that respect it.

The manifest (`fedsov-manifest.json`) is the machine-readable record: which regions contributed,
under which policy (the hash each node reported of its own policy), what epsilon they spent, where
each allows the model to go, the audit verdicts and the nodes' evidence heads. The model card
(`README.md`, Hugging Face's format) is generated from it for people and for the Hub's tooling.
`export_adapter` refuses a destination jurisdiction that any contributing region forbids, and writes
a folder that loads with `PeftModel.from_pretrained` on any machine holding the same base model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from common.audit import AuditLog, EvidenceKey
from common.errors import ConfigError, ModelError, PolicyViolation
from common.policy import ANY

MANIFEST = "fedsov-manifest.json"
CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
# What an export carries of the base model: its config and fingerprint, never its weights.
BASE_REFERENCE = "base-model-reference"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "tokenizer.tiktoken",
    "chat_template.jinja",
)
CARD_TAGS = ("peft", "lora", "differential-privacy", "federated-learning", "fedsov")


def write_manifest(adapter_dir: Path, manifest: dict[str, Any]) -> Path:
    """The manifest, and the model card generated from it, beside the adapter."""
    base = manifest.get("base_model") or {}
    if "name" not in base and base.get("path"):
        base["name"] = portable_base_name(Path(base["path"]), base.get("fingerprint", ""))
    path = adapter_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    write_model_card(adapter_dir, manifest)
    return path


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / MANIFEST
    if not path.is_file():
        raise PolicyViolation(
            f"{adapter_dir} has no {MANIFEST}: without provenance fedsov cannot tell which regions' rules apply, "
            "so it will not export it."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise PolicyViolation(
            f"{path} is not valid JSON ({err}): the provenance is damaged, so fedsov will not "
            "export or use the adapter. Restore it from a copy of the run directory."
        ) from err


def portable_base_name(path: Path, fingerprint: str) -> str:
    """A name for the base model that means something on another machine (never this machine's path).

    A Hub id transformers recorded in config.json (`_name_or_path`, when not a local path); else the embedded
    model's name with its fingerprint; else the folder's name.
    """
    try:
        recorded = str(json.loads((path / "config.json").read_text()).get("_name_or_path") or "")
    except (OSError, ValueError):
        recorded = ""
    if recorded and not recorded.startswith(("/", ".", "~")) and recorded.count("/") <= 1:
        return recorded
    if path.name.startswith("embedded-"):
        return f"fedsov-embedded-{fingerprint[:12]}"
    return path.name


def deployable_in(manifest: dict[str, Any]) -> list[str]:
    """Jurisdictions every contributing region allows ([ANY] when none restricts)."""
    allowed: set[str] | None = None
    for info in manifest["contributing_regions"].values():
        if ANY in info["allowed_deployment"]:
            continue
        allowed = set(info["allowed_deployment"]) if allowed is None else allowed & set(info["allowed_deployment"])
    return [ANY] if allowed is None else sorted(allowed)


def model_card(
    manifest: dict[str, Any], adapter_config: dict[str, Any] | None = None, exported_for: str | None = None
) -> str:
    """Hugging Face model card (front matter + Markdown) whose body is the adapter's privacy card."""
    base = manifest.get("base_model") or {}
    name = base.get("name") or "unknown"
    regions = manifest["contributing_regions"]
    audit = manifest.get("audit") or {}
    lora = adapter_config or {}
    allowed = deployable_in(manifest) if regions else []
    front = ["---", f"base_model: {json.dumps(name)}", "library_name: peft", "tags:"]
    front += [f"- {t}" for t in CARD_TAGS]
    front += [
        f"fedsov_base_model_fingerprint: {base.get('fingerprint', 'unknown')}",
        f"fedsov_run_id: {json.dumps(manifest['run_id'])}",
        "---",
        "",
    ]
    dp = (
        "with differentially private SGD (DP-SGD) on the LoRA parameters"
        if manifest["dp"]
        else "WITHOUT differential privacy"
    )
    lines = [
        f"# fedsov LoRA adapter: run {manifest['run_id']}",
        "",
        f"A LoRA adapter for `{name}`, trained by fedsov, federated across "
        f"{len(regions)} region(s) ({', '.join(regions) or 'none'}) {dp}. The training data never left its "
        f"region; the coordinator ({manifest['coordinator_jurisdiction']}) received only adapter updates"
        + (
            ", summed under secure aggregation."
            if manifest["secure_aggregation"]
            else ", one per client (secure aggregation was OFF)."
        ),
        "",
        "## Privacy card",
        "",
        "Epsilon is cumulative per dataset (everything this data was ever trained on, from each node's privacy "
        "ledger), at the region's delta, for one privacy unit (a record, or all of one person's records).",
        "",
        "| region | law | epsilon | delta | privacy unit | rounds contributed | audit verdict | may be deployed in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for region, info in regions.items():
        eps = "inf (no DP)" if info["epsilon"] == "inf" else f"{float(info['epsilon']):.2f}"
        verdict = audit.get(region, {})
        status = verdict.get("status", "not audited")
        if verdict.get("signals"):
            status += f" ({'; '.join(verdict['signals'])})"
        lines.append(
            f"| {region} | {info['law']} | {eps} | {float(info['delta']):.1e} | {info['unit']} | "
            f"{info['rounds_contributed']} | {status} | {_places(info['allowed_deployment'])} |"
        )
    lines.append("")
    excluded = [
        f"- {region} did not contribute: {why}" for region, why in (manifest.get("excluded_regions") or {}).items()
    ]
    lines += excluded + ([""] if excluded else [])
    where = "any jurisdiction" if allowed == [ANY] else ", ".join(allowed) or "nowhere (no region allows a common one)"
    lines += [
        f"**Allowed deployment jurisdictions** (every contributing region allows them): {where}. "
        "`fedsov export --jurisdiction <J>` refuses any other.",
    ]
    if exported_for:
        lines.append(f"This copy was exported for deployment in {exported_for}.")
    lines += ["", "## How it was trained", ""]
    lines += [
        f"- {manifest['rounds_completed']} federated round(s), coordinator in {manifest['coordinator_jurisdiction']}, "
        f"DP {'on' if manifest['dp'] else 'OFF'}, "
        f"secure aggregation {'on' if manifest['secure_aggregation'] else 'OFF'}.",
        f"- LoRA rank {lora.get('r', '?')}, alpha {lora.get('lora_alpha', '?')}, on "
        f"{', '.join(sorted(lora.get('target_modules') or [])) or '?'}; the base model stayed frozen.",
        "- Each region's own nodes enforced its policy (policy hashes in the manifest) and kept a hash-chained audit "
        "log; the coordinator kept the heads below as anchors.",
        "- "
        + (
            "Each region's nodes audited the final adapter for memorisation on their own data (canaries, "
            "membership inference, PII in generations): verdicts above."
            if any(v.get("status") != "not audited" for v in audit.values())
            else "The memorisation audit was not run (audit.enabled=false): there is no empirical evidence."
        ),
    ]
    if manifest.get("privacy_report"):
        lines.append(f"- The full privacy report was written on the coordinator: `{manifest['privacy_report']}`.")
    lines += [
        "",
        "## Base model",
        "",
        f"`{name}`, fingerprint `{base.get('fingerprint', 'unknown')}`: a SHA-256 over the names and contents of "
        "the folder's config, weight and tokenizer files. Use a byte-identical copy of the folder the run trained "
        "on; `fedsov generate <this folder> --base <folder>` checks the fingerprint. An export carries the model's "
        f"config and what to do to obtain it in `{BASE_REFERENCE}/`.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from peft import PeftModel",
        "",
        'base = AutoModelForCausalLM.from_pretrained("/path/to/base-model")  # the folder with the fingerprint above',
        'model = PeftModel.from_pretrained(base, "/path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("/path/to/this/folder")  # in an export; else from the base',
        "```",
        "",
        "## Evidence",
        "",
        f"`{MANIFEST}` is the machine-readable source of this card. Each node's ledger and audit-log heads at the end "
        "of the run (check a node's files with `fedsov audit verify <log> --manifest <manifest> --node <node>`):",
        "",
    ]
    for node, a in sorted((manifest.get("evidence_anchors") or {}).items()):
        lines.append(
            f"- {node} ({a.get('region', '?')}): ledger {a.get('ledger-entries')} entries, head "
            f"`{str(a.get('ledger-head', ''))[:16]}`; audit log {a.get('audit-entries')} entries, head "
            f"`{str(a.get('audit-head', ''))[:16]}`"
        )
    return "\n".join(front + lines) + "\n"


def _places(jurisdictions: list[str]) -> str:
    return "anywhere" if ANY in jurisdictions else ", ".join(jurisdictions)


def write_model_card(adapter_dir: Path, manifest: dict[str, Any], exported_for: str | None = None) -> Path:
    config_path = adapter_dir / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text()) if config_path.is_file() else None
    path = adapter_dir / CARD  # replaces PEFT's empty template
    path.write_text(model_card(manifest, adapter_config, exported_for))
    return path


def export_blockers(manifest: dict[str, Any], jurisdiction: str) -> dict[str, str]:
    """Contributing regions that forbid deploying the model in `jurisdiction`, with why."""
    blockers = {}
    for region, info in manifest["contributing_regions"].items():
        allowed = info["allowed_deployment"]
        if ANY not in allowed and jurisdiction not in allowed:
            blockers[region] = f"{info['law']} policy allows deployment only in {', '.join(allowed)}"
    return blockers


def export_adapter(run_dir: Path, destination: Path, jurisdiction: str) -> Path:
    """A self-contained copy of the run's adapter in `destination`, if every contributor allows `jurisdiction`.

    The folder holds the adapter (its config naming the base portably), the tokenizer, the model card, the
    manifest, and `base-model-reference/` (the base's config, fingerprint, file hashes and how to obtain it).
    """
    adapter = run_dir / "adapter"
    manifest = read_manifest(adapter)
    from server.rundir import RunDirectory

    # An export is a decision the coordinator's audit log must record: without its key, nothing is exported.
    key = EvidenceKey.load(RunDirectory(run_dir).coordinator_key_dir)
    audit = AuditLog(run_dir / "audit.jsonl", actor="coordinator", key=key)
    blockers = export_blockers(manifest, jurisdiction)
    if blockers:
        why = "; ".join(f"{r}: {b}" for r, b in blockers.items())
        audit.record("export", "refused", reason=f"to {destination} in {jurisdiction}: {why}")
        raise PolicyViolation(
            f"Export to {jurisdiction} refused: {why}. Nothing was copied. Choose a destination every "
            "contributing region allows, or train without those regions."
        )
    if destination.exists() and not destination.is_dir():
        raise ConfigError(f"Export destination {destination} is a file; choose an empty or new folder with --to.")
    if destination.exists() and any(destination.iterdir()):
        raise PolicyViolation(f"Export destination {destination} is not empty; choose an empty or new folder.")
    base = manifest["base_model"]
    base_path = Path(base["path"])
    if not (base_path / "config.json").is_file():
        raise ModelError(
            f"The run's base model {base_path} is not on this machine: the export needs its tokenizer "
            "and config. Run the export where the run trained (the coordinator), or copy the base there."
        )
    name = base.get("name") or portable_base_name(base_path, base["fingerprint"])
    shutil.copytree(adapter, destination, dirs_exist_ok=True)
    # Point the adapter at the base by name: this machine's path means nothing where the model is deployed.
    config = json.loads((destination / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = name
    (destination / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in TOKENIZER_FILES:
        if (base_path / file).is_file():
            shutil.copy2(base_path / file, destination / file)
    _write_base_reference(destination / BASE_REFERENCE, base_path, name, base["fingerprint"], run_dir)
    write_model_card(destination, manifest, exported_for=jurisdiction)
    audit.record(
        "export", "accepted", reason=f"to {destination} in {jurisdiction}: allowed by every contributing region"
    )
    return destination


def _write_base_reference(folder: Path, base_path: Path, name: str, fingerprint: str, run_dir: Path) -> None:
    """The base's config, fingerprint and per-file hashes, and how to obtain an identical copy (no weights)."""
    from common.model.loading import FINGERPRINTED_SUFFIXES

    folder.mkdir()
    shutil.copy2(base_path / "config.json", folder / "config.json")
    files = []
    for f in sorted(base_path.iterdir()):
        if f.is_file() and f.suffix in FINGERPRINTED_SUFFIXES and not f.name.startswith("fedsov-"):
            digest = hashlib.sha256()
            with open(f, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(chunk)
            files.append({"name": f.name, "bytes": f.stat().st_size, "sha256": digest.hexdigest()})
    if base_path.name.startswith("embedded-"):
        import yaml

        recipe = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model", {}).get("embedded")
        obtain = (
            "fedsov's embedded model, built deterministically from the recipe below: on a machine with fedsov, "
            "any command with these model.embedded.* settings builds it into <model.cache_dir>/models/; or copy "
            "the folder from the coordinator. Check the fingerprint before use."
        )
    else:
        recipe = None
        obtain = (
            f"the Hugging Face model folder '{name}' the run trained on: copy it byte for byte (do not re-save, "
            "re-shard or convert it: the same weights in other files hash differently)."
        )
    reference = {"name": name, "fingerprint": fingerprint, "how_to_obtain": obtain, "files": files}
    if recipe:
        reference["embedded_recipe"] = recipe
    (folder / "reference.json").write_text(json.dumps(reference, indent=1))
