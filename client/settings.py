"""Where a regional node's data, policy and state live, from simulation or from its own
--node-config in deployment; and the policy gate for messages that need no model or data.

Light on purpose (no torch): the secure-aggregation stages need only the policy and the audit
log, so a process that has not started the node (say, a warm worker just restarted) answers them
without loading the model and the data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.audit import AuditLog, EvidenceKey
from common.config import AuditConfig, DataSource, FedsovConfig, ModelConfig, default_config_dir, load_region_file
from common.coordinator_pins import JURISDICTION, local_jurisdiction
from common.errors import ConfigError, FederationError
from common.policy import PolicyViolation, policy_hash

LEDGER_FILE = "privacy-ledger.jsonl"
AUDIT_FILE = "audit.jsonl"


@dataclass(frozen=True)
class NodeSettings:
    """Where a node's data, policy and state live (all node-local)."""

    name: str
    region: str
    data_paths: tuple[str, ...]
    plain_text_consent: bool | None
    client_index: int
    num_clients: int
    heldout_fraction: float
    state_dir: Path
    policy_file: Path
    model: ModelConfig
    audit: AuditConfig
    synthetic_data: bool
    threads: int
    # Evidence keys live apart from the logs they key; the ledger lives with the data it accounts
    # for (nodes that split one region's data share it), so it has its own folder and key.
    key_dir: Path
    ledger_dir: Path
    ledger_key_dir: Path
    # Where this node's coordinator is, from the node's own pins (common.coordinator_pins).
    coordinator_jurisdiction: str
    # The federation's nodes and their identity keys, as this node's operator installed them.
    roster_file: Path


def simulation_roster(cfg: FedsovConfig) -> Path:
    """The roster of a simulated federation, written from every simulated node's identity key.

    A simulation runs every node on this machine under one operator, so it installs the roster the way
    each region's operator would in a deployment (`fedsov roster add`), in the work folder, rewritten from
    the keys as they are (a node whose key folder was deleted gets a new identity, as a reinstalled node would).
    """
    import fcntl

    from common.secagg.identity import Identity, Roster, RosterEntry

    path = Path(cfg.workdir) / "roster.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = []
        for region in cfg.regions.values():
            for index in range(region.clients):
                name = f"{region.name}-{index + 1}"
                identity = Identity.load_or_create(Path(cfg.workdir) / "keys" / name)
                entries.append(RosterEntry(name, region.name, identity.public_key))
        roster = Roster(entries)
        if not path.exists() or Roster.load(path).fingerprint() != roster.fingerprint():
            roster.save(path)
    return path


def simulation_settings(cfg: FedsovConfig, partition_id: int) -> NodeSettings:
    """Map a simulated node's partition id to its region and client slot (config order).

    The policy file comes from this process's own config folder ($FEDSOV_CONFIG_DIR), not
    from the coordinator's run config: a coordinator cannot hand a node a weaker policy.
    """
    first = 0
    for region in cfg.regions.values():
        if partition_id < first + region.clients:
            index = partition_id - first
            if region.data.source == DataSource.synthetic:
                paths: tuple[str, ...] = (str(Path(cfg.data.root) / region.name),)
            else:
                paths = tuple(region.data.paths)
            name = f"{region.name}-{index + 1}"
            workdir = Path(cfg.workdir)
            return NodeSettings(
                name=name,
                region=region.name,
                data_paths=paths,
                plain_text_consent=region.data.plain_text_consent,
                client_index=index,
                num_clients=region.clients,
                heldout_fraction=cfg.data.heldout_fraction,
                state_dir=workdir / "nodes" / name,
                policy_file=default_config_dir() / "regions" / f"{region.name}.yaml",
                model=cfg.model,
                audit=cfg.audit,
                synthetic_data=region.data.source == DataSource.synthetic,
                threads=cfg.simulation.client_cpus,
                key_dir=workdir / "keys" / name,
                ledger_dir=workdir / "ledgers" / region.name,
                ledger_key_dir=workdir / "keys" / f"ledger-{region.name}",
                coordinator_jurisdiction=local_jurisdiction(default_config_dir()),
                roster_file=simulation_roster(cfg),
            )
        first += region.clients
    raise FederationError(
        f"Simulated node with partition-id {partition_id} has no region: the configured regions "
        f"have {first} clients in total. Run the simulation with that many supernodes."
    )


# Keys a deployed SuperNode reads from its --node-config (TOML values; strings quoted).
NODE_CONFIG_KEYS = {
    "region": 'this node\'s region (required), e.g. region="eu"',
    "data-path": "its data files or folders, separated by ':' (required)",
    "state-dir": "where its privacy ledger, audit log and canaries live (required, kept across restarts)",
    "config-dir": (
        "the fedsov configs folder holding regions/<region>.yaml (default: $FEDSOV_CONFIG_DIR or the installed one)"
    ),
    "name": (
        "node name in logs and the audit trail (default: the state folder's name, prefixed with the region unless "
        "it starts with it)"
    ),
    "synthetic-data": "true when data-path holds fedsov's generated demo data (canaries are then inserted)",
    "plain-text-consent": "consent to assume for plain-text files (true/false; default: such files are refused)",
    "model-path": "a local model folder overriding the run's model.name_or_path",
    "model-cache": "where this node builds and keeps the embedded model (default ~/.cache/fedsov)",
    "client-index": "this node's slot when several nodes share one data folder (default 0)",
    "num-clients": "how many nodes share that folder (default 1; above 1, ledger-dir is required)",
    "threads": "CPU threads for training (default: all cores)",
    "key-dir": "the node's evidence-key folder, kept apart from state-dir (default: <state-dir>.keys)",
    "ledger-dir": "the privacy ledger's folder, shared by the nodes that split one data folder (default: state-dir)",
    "ledger-key-dir": "the ledger's evidence-key folder (default: key-dir)",
    "coordinator-jurisdiction": "where the coordinator is, from the node's coordinators.yaml (set by `fedsov node "
    "start`; required)",
    "roster": "the federation roster file (default: roster.json in the config folder)",
}


@dataclass(frozen=True)
class NodeFolders:
    """Where a node keeps its state, keys and ledger: what commands on a stopped node need (no data, no model)."""

    name: str
    region: str
    state_dir: Path
    key_dir: Path
    ledger_dir: Path
    ledger_key_dir: Path
    policy_file: Path

    @classmethod
    def of(cls, node_config: Mapping[str, Any]) -> NodeFolders:
        """From the node-config keys region, state-dir and the optional folders, with `fedsov node start`'s defaults."""
        region = str(node_config["region"])
        state_dir = Path(str(node_config["state-dir"])).expanduser()
        config_dir = Path(str(node_config.get("config-dir") or default_config_dir())).expanduser()
        key_dir = Path(str(node_config.get("key-dir") or f"{state_dir}.keys")).expanduser()
        return cls(
            name=str(
                node_config.get("name")
                or (state_dir.name if state_dir.name.startswith(region) else f"{region}-{state_dir.name}")
            ),
            region=region,
            state_dir=state_dir,
            key_dir=key_dir,
            ledger_dir=Path(str(node_config.get("ledger-dir") or state_dir)).expanduser(),
            ledger_key_dir=Path(str(node_config.get("ledger-key-dir") or key_dir)).expanduser(),
            policy_file=config_dir / "regions" / f"{region}.yaml",
        )


def deployment_settings(cfg: FedsovConfig, node_config: Mapping[str, Any]) -> NodeSettings:
    """A deployed node's settings come from its own --node-config, never from the coordinator.

    The run config only contributes what is the federation's business (model recipe, audit
    settings, held-out fraction); where data, state and policy live is decided on the node.
    """
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise FederationError(
            f"Unknown --node-config key(s) {unknown}. Known keys: "
            + "; ".join(f"{k}: {v}" for k, v in NODE_CONFIG_KEYS.items())
        )
    missing = [k for k in ("region", "data-path", "state-dir") if not str(node_config.get(k, "")).strip()]
    if missing:
        raise FederationError(
            f"The SuperNode's --node-config lacks {missing}. Start it with e.g. "
            '--node-config \'region="eu" data-path="/data/eu" state-dir="/var/lib/fedsov/eu-1"\' '
            "(or use `fedsov node start`)."
        )
    folders = NodeFolders.of(node_config)
    config_dir = folders.policy_file.parent.parent
    # Model files are node-local: the submitting machine's paths mean nothing here.
    model = replace(cfg.model, cache_dir=str(Path(str(node_config.get("model-cache", "~/.cache/fedsov"))).expanduser()))
    if node_config.get("model-path"):
        model = replace(model, name_or_path=str(node_config["model-path"]))
    consent = node_config.get("plain-text-consent")
    num_clients = int(node_config.get("num-clients", 1))
    if num_clients > 1 and not node_config.get("ledger-dir"):
        raise FederationError(
            f"num-clients={num_clients}: the nodes that split one data folder must share one privacy ledger, or a "
            "person moved between them by a re-sharding would start from an empty history. Set ledger-dir (and "
            "ledger-key-dir) in --node-config to the same folders on each of these nodes."
        )
    jurisdiction = str(node_config.get("coordinator-jurisdiction", ""))
    if not JURISDICTION.fullmatch(jurisdiction):
        raise ConfigError(
            "The SuperNode's --node-config has no valid coordinator-jurisdiction: a node decides where its "
            "coordinator is from its own coordinators.yaml. Start it with `fedsov node start`, which looks the "
            'coordinator\'s CA up there, or set coordinator-jurisdiction="EU" (your pinned value) yourself.'
        )
    return NodeSettings(
        name=folders.name,
        region=folders.region,
        data_paths=tuple(p for p in str(node_config["data-path"]).split(":") if p),
        plain_text_consent=None if consent is None else bool(consent),
        client_index=int(node_config.get("client-index", 0)),
        num_clients=num_clients,
        heldout_fraction=cfg.data.heldout_fraction,
        state_dir=folders.state_dir,
        policy_file=folders.policy_file,
        model=model,
        audit=cfg.audit,
        synthetic_data=bool(node_config.get("synthetic-data", False)),
        threads=int(node_config.get("threads", os.cpu_count() or 1)),
        key_dir=folders.key_dir,
        ledger_dir=folders.ledger_dir,
        ledger_key_dir=folders.ledger_key_dir,
        coordinator_jurisdiction=jurisdiction,
        roster_file=Path(str(node_config.get("roster") or config_dir / "roster.json")).expanduser(),
    )


def node_audit(settings: NodeSettings) -> AuditLog:
    path = settings.state_dir / AUDIT_FILE
    key = EvidenceKey.load_or_create(settings.key_dir, logs=(path,))
    return AuditLog(path, actor=f"node:{settings.name}", key=key)


def node_identity(settings: NodeSettings):
    from common.secagg.identity import Identity

    return Identity.load_or_create(settings.key_dir)


def node_roster(settings: NodeSettings):
    """The roster, with this node in it under its own name, region and identity key (else a clear refusal)."""
    from common.secagg.identity import Roster

    roster = Roster.load(settings.roster_file)
    entry = roster.entries.get(settings.name)
    identity = node_identity(settings)
    if entry is None or entry.region != settings.region or entry.public_key != identity.public_key:
        raise ConfigError(
            f"The federation roster {settings.roster_file} does not list node {settings.name} of region "
            f"{settings.region} with its identity key {identity.public_key.hex()} (from {settings.key_dir}). Add it "
            f"with `fedsov roster add --roster <file> --name {settings.name} --region {settings.region} --identity "
            f"{identity.public_key.hex()}` and install the same roster on every node."
        )
    return roster


class PolicyGate:
    """A node's policy and audit log, without its data or model (cheap to start)."""

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.audit = node_audit(settings)
        region = load_region_file(settings.policy_file)
        if region.name != settings.region:
            raise PolicyViolation(
                f"Node {settings.name} declares region '{settings.region}' but its policy file "
                f"{settings.policy_file} is for region '{region.name}'. Point the node at its own region's policy."
            )
        self.policy = region.policy
        self.policy_hash = policy_hash(self.policy)

    def check_cohort(self, size: int, stage: str, round_number: int | None) -> None:
        """The aggregation a node actually joins must be as large as its policy demands."""
        minimum = self.policy.transfers.min_cohort
        if size < minimum:
            why = (
                f"{stage}: {size} client(s) in this aggregation, below the {self.policy.law} policy's minimum cohort "
                f"{minimum}"
            )
            self.audit.record("cohort", "refused", reason=why, round=round_number, policy_hash=self.policy_hash)
            raise PolicyViolation(why)
