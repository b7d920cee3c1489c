"""`fedsov data check`: a node's start checks on its data files, before the node is started.

It starts a real `RegionNode` with the flags `fedsov node start` takes, in a throwaway state
folder, so it runs the node's own code: policy vs region, residency of every file and record,
consent, special categories, excluded fields, PII scrubbing, privacy units and truncation. The
node's ledger and canaries are those of a fresh node; `node start` checks the real ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path


def check_data(args, out: Callable[[str], None] = print) -> int:
    """Exit 0 when the node would start on this data; a refusal raises, naming the file and the fix."""
    from client.node import RegionNode, deployment_settings
    from client.supernode import node_config_from_args
    from common.config import default_config_dir, load_config
    from common.coordinator_pins import local_jurisdiction

    cfg = load_config(args.overrides, args.config_dir)
    with tempfile.TemporaryDirectory(prefix="fedsov-data-check-") as state:
        node_config = node_config_from_args(args, Path(state))
        node_config.setdefault("name", f"{args.region}-data-check")
        # A throwaway node: its keys live and die with its state, and no coordinator is contacted.
        node_config["key-dir"] = str(Path(state) / "keys")
        node_config["coordinator-jurisdiction"] = local_jurisdiction(args.config_dir or default_config_dir())
        out(f"Start checks on {node_config['data-path']} (PII scrubbing reads every record: large data takes a while)")
        node = RegionNode(deployment_settings(cfg, node_config))
        for line in data_summary(node):
            out(line)
    out("The node would start on this data (fedsov node start also checks its privacy ledger).")
    return 0


def data_summary(node) -> list[str]:
    """What a node's start checks found in its data, one finding per line."""
    c, s = node.data.counts, node.settings
    lines = [f"Data of node {s.name} (region {s.region}, {node.policy.law} policy): {c['records']} records read"]
    lines += [f"  skipped {path}: {why}" for path, why in node.data.skipped_files]
    lines.append(
        f"  excluded by the policy: {c['excluded_no_consent']} without consent, {c['excluded_special']} "
        f"special-category, {c['excluded_fields']} with an excluded field; "
        f"{c['scrubbed_spans']} PII spans scrubbed"
    )
    if c["excluded_erased"]:
        lines.append(f"  left out after erasure requests: {c['excluded_erased']} records")
    lines.append(
        f"  {c['people']} people in the training and held-out data, {c['sensitive_people']} of them with a "
        "special-category record (what transfer volume rules count)"
    )
    lines.append(
        f"  trains on {c['train_units']} privacy units ({node.policy.privacy.unit.value}s, "
        f"{c['canary_copies']} of them canary copies); {c['heldout_records']} records held out"
    )
    max_length = s.model.max_length
    if c["truncated_units"] or c["truncated_heldout"]:
        lines.append(
            f"  TRUNCATED to model.max_length={max_length} tokens: {c['truncated_units']} training unit(s) "
            f"({c['truncated_tokens']} tokens dropped) and {c['truncated_heldout']} held-out record(s); "
            "raise model.max_length or split long records"
        )
    else:
        lines.append(f"  nothing truncated: every unit fits model.max_length={max_length} tokens")
    return lines
