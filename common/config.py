"""The configuration schema, Hydra composition and validation.

Hydra composes the YAML groups in `configs/`; the result is merged onto the typed schema
below so that a typo or a wrong type fails before anything starts, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from common.errors import ConfigError
from common.policy import JURISDICTION, PrivacyUnitKind, RegionPolicy, validate_policy

__all__ = ["PrivacyUnitKind"]  # re-exported: the unit is part of a region's policy

CONFIG_DIR_ENV = "FEDSOV_CONFIG_DIR"
EMBEDDED_MODEL = "embedded"


class DataSource(str, Enum):
    synthetic = "synthetic"
    files = "files"


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OptimizerChoice(str, Enum):
    """The clients' local optimiser on the privatised gradient: DP-Adam(W), DP-SGD, or DP-RMSprop whose running
    mean of squared gradients starts at the DP noise's variance (Opacus wraps each). auto: rmsprop with DP,
    adamw without (there is no noise to start from); resolved when the config loads, never sent."""

    auto = "auto"
    adamw = "adamw"
    sgd = "sgd"
    rmsprop = "rmsprop"


class LrScheduler(str, Enum):
    """The clients' learning rate over the rounds, as Hugging Face's `lr_scheduler_type`: linear (from
    federation.learning_rate in round 1 down towards 0 at the end of the run; each round at its start's rate) or
    constant. Round-level: each round's plan carries its rate, and the nodes train as before."""

    linear = "linear"
    constant = "constant"


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: PEFT's default target modules for the base model's architecture.
    target_modules: list[str] | None = None
    # FFA-LoRA (Sun et al. 2024): A stays frozen at its shared initialisation, only B
    # trains, so averaging the B matrices averages the products BA exactly.
    ffa: bool = False


@dataclass
class EmbeddedRecipe:
    """How the project builds its own small GPT-style base model (no download)."""

    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context: int = 128
    corpus_documents: int = 12000
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    # Label smoothing would compress the logit range, and a LoRA cannot touch the final
    # LayerNorm or the embeddings to widen it again: fine-tuning could then not memorise, and
    # the memorisation audit would measure nothing. Keep it at 0.
    label_smoothing: float = 0.0
    seed: int = 1234


@dataclass
class ModelConfig:
    name_or_path: str = "???"
    cache_dir: str = "~/.cache/fedsov"
    dtype: DtypeChoice = DtypeChoice.auto
    device: DeviceChoice = DeviceChoice.auto
    max_length: int = 128
    # Recompute activations in the backward pass: less memory, more time; per-sample gradients stay exact.
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    embedded: EmbeddedRecipe = field(default_factory=EmbeddedRecipe)


@dataclass
class DataConfig:
    seed: int = 0
    root: str = "${workdir}/data"
    users_per_region: int = 300
    records_per_user: list[int] = field(default_factory=lambda: [2, 6])
    consent_rate: float = 0.92
    shards: int = 2
    heldout_fraction: float = 0.2


# A region's file must set every field below and in its policy: none has a default, so a
# missing rule is an error naming the file, never a built-in value applied in silence.
@dataclass
class RegionData:
    source: DataSource
    # Local files or folders (JSONL, plain text, Parquet) when source=files.
    paths: list[str]
    # Plain-text lines carry no consent field: the region attests it for whole files.
    plain_text_consent: bool | None


@dataclass
class RegionConfig:
    name: str
    jurisdiction: str
    locales: list[str]
    clients: int
    data: RegionData
    # The region's compliance rules. Its nodes enforce their own copy of this file; the
    # coordinator's copy only shapes its plans.
    policy: RegionPolicy


@dataclass
class PrivacyConfig:
    """What the coordinator asks for. Delta, the lifetime budget, the privacy unit and the
    bounds on sigma and the clip norm belong to each region's policy."""

    enabled: bool = True
    # Exactly one of noise_multiplier and target_epsilon when enabled. target_epsilon is
    # the epsilon this run may spend; sigma is derived for the run's planned rounds.
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0


# The server's step under DP-RMSprop when the config leaves it open (README, "Choosing the defaults").
RMSPROP_SERVER_LEARNING_RATE = 1.5


@dataclass
class FederationConfig:
    # Where the coordinator runs; each region's policy decides whether it may receive updates.
    coordinator_jurisdiction: str = "EU"
    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 32
    optimizer: OptimizerChoice = OptimizerChoice.auto
    learning_rate: float = 1.5e-2  # the first round's; see lr_scheduler
    lr_scheduler: LrScheduler = LrScheduler.linear
    # null: 1.5 with DP-RMSprop (measured on the default federation), 1.0 (plain FedAvg) otherwise; resolved at load.
    server_learning_rate: float | None = None
    eval_batch_size: int = 32
    # A round is aggregated when at least this many clients reply with an update.
    min_clients: int = 1
    round_timeout_s: float = 900.0
    node_wait_timeout_s: float = 120.0
    keep_checkpoints: int = 3
    # A run in which a planned region or node contributed nothing is "partial": its launcher exits non-zero
    # unless this is set (the summary and report name who did not contribute and why either way).
    allow_partial: bool = False
    seed: int = 0


@dataclass
class SecureAggregationConfig:
    # On by default; turning it off is logged on every run.
    enabled: bool = True
    # Shares needed to unmask, as a fraction of the clients that exchanged keys in a round.
    # A round survives (1 - fraction) of them dropping after the key exchange.
    threshold_fraction: float = 0.6
    # A secure sum of fewer updates than this would reveal too much about each; skip instead.
    min_clients: int = 2
    stage_timeout_s: float = 120.0


@dataclass
class AuditConfig:
    """The memorisation audit each node runs on the final model, on its own data."""

    enabled: bool = True
    # Canaries go into generated data; into real data only when asked (they are fake records
    # added to a production training set).
    canaries_in_real_data: bool = False
    canary_formats: list[str] = field(default_factory=lambda: ["door-code", "passport"])
    canary_repetitions: list[int] = field(default_factory=lambda: [1, 4, 16])
    # Canaries for one-run auditing, each inserted with probability 1/2, in one_run_repetitions copies
    # (each its own privacy unit: the audit then measures the epsilon of a group of that many units).
    one_run_canaries: int = 64
    one_run_repetitions: int = 1
    # Random secrets scored against each one-run canary (its exposure is the membership score).
    one_run_candidates: int = 100
    # Share of the one-run canaries guessed: the top-scoring half of that share "in", the bottom half "out";
    # the rest abstain (Steinke et al. 2023: guessing only where the score is extreme raises the bound).
    one_run_guess_share: float = 0.5
    exposure_candidates: int = 400
    mia_members: int = 200
    generations: int = 16


@dataclass
class SimulationConfig:
    client_cpus: int = 1
    client_gpus: float = 0.0
    # Cores the simulated clients share (Ray's num_cpus); None: all of this machine's. Clients that train at
    # once: cpus // client_cpus. Each runs in its own process holding the model.
    cpus: int | None = None


@dataclass
class TrackingConfig:
    """Experiment trackers that receive each round's metrics; metrics.jsonl is written whatever these say."""

    tensorboard: bool = True  # event files in <run_dir>/tensorboard
    mlflow: bool = True  # only where the mlflow package is installed


@dataclass
class FedsovConfig:
    # Why the model is trained, in the controller's words: the purpose a record of processing names (GDPR
    # Art. 30(1)(b)). fedsov cannot know it; `fedsov dpo-record` marks it for the DPO to fill while it is null.
    purpose: str | None = None
    workdir: str = "fedsov-work"
    run_dir: str | None = None
    resume: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    regions: dict[str, RegionConfig] = field(default_factory=dict)


def default_config_dir() -> Path:
    """The `configs/` folder: $FEDSOV_CONFIG_DIR, else the one beside the installed code."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "configs"


def interrupted(err: BaseException) -> bool:
    """Whether `err` arose while a Ctrl-C or SIGTERM was unwinding: OmegaConf, cut short mid-update, can raise
    an error of its own from its clean-up, which would otherwise read as an invalid configuration."""
    seen: set[int] = set()
    chain: list[BaseException | None] = [err]
    while chain:
        cause = chain.pop()
        if cause is None or id(cause) in seen:
            continue
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        chain += [cause.__cause__, cause.__context__]
    return False


def load_config(
    overrides: Sequence[str] = (), config_dir: Path | None = None, config_name: str = "config"
) -> FedsovConfig:
    """Compose `configs/` with command-line overrides, then type-check and validate."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir) if config_dir else default_config_dir()
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError(
            f"No {config_name}.yaml in config folder {config_dir}. Point "
            f"${CONFIG_DIR_ENV} (or --config-dir) at fedsov's configs/ folder."
        )
    _check_overrides(overrides, config_dir)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            selected = _selected_regions(config_name, overrides)
            # Each selected file is checked on its own first: Hydra would compose an empty file, or
            # one whose package line names another region, as if that region were simply absent.
            for name in selected:
                load_region_file(config_dir / "regions" / f"{name}.yaml")
            composed = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        if interrupted(err):
            raise KeyboardInterrupt from err
        detail = str(err).strip() or str(err.__cause__ or "").strip() or type(err).__name__
        raise ConfigError(f"Invalid configuration in {config_dir} or its overrides: {detail}") from err
    except yaml.YAMLError as err:  # Hydra reads every selected file before composing, and lets these through
        raise ConfigError(f"{_yaml_error_text(err)} Fix the YAML syntax in that file.") from err
    unselected = sorted(set(composed.get("regions") or {}) - set(selected))
    if unselected:
        raise ConfigError(
            f"The overrides add region(s) {', '.join(unselected)} that regions=[{','.join(selected)}] does not select: "
            f"a region comes only from its own file. Add them to regions=[...] or drop those overrides."
        )
    return config_from_container(composed)


def _yaml_error_text(err: Exception) -> str:
    """Where a YAML file is broken and how, in one line (the parser's own text spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"{mark.name} line {mark.line + 1} column {mark.column + 1}" if mark else "a config file"
    return f"{where} is not valid YAML: {problem}."


def _selected_regions(config_name: str, overrides: Sequence[str]) -> list[str]:
    """The region files the `regions` group selects, in order (Hydra's defaults list, before composing)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    defaults = GlobalHydra.instance().config_loader().compute_defaults_list(config_name, list(overrides), RunMode.RUN)
    return [
        d.config_path.split("/", 1)[1]
        for d in defaults.defaults
        if d.config_path and d.config_path.startswith("regions/")
    ]


def _check_overrides(overrides: Sequence[str], config_dir: Path) -> None:
    """Name unknown keys and group options before Hydra's generic composition errors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in config_dir.iterdir() if p.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(f"Cannot parse command-line override: {err}") from err
    for override in parsed:
        key = override.key_or_group
        _check_prefix(override, key in groups)
        if override.is_sweep_override():
            raise ConfigError(
                f"'{override.input_line}' is a sweep (one run per value): add -m (e.g. `fedsov simulate -m "
                f"{override.input_line}`), or write a list as {key}=[...] or a string with quotes."
            )
        if key in groups:
            value = override.value()
            chosen = value if isinstance(value, list) else [value]
            for option in chosen:
                if str(option) not in groups[key]:
                    raise ConfigError(
                        f"'{option}' is not a {key} config. Available in {config_dir / key}: {', '.join(groups[key])}."
                    )
            continue
        parts = key.split(".")
        if parts[0] == "regions" and len(parts) > 2 and parts[2] == "policy":
            raise ConfigError(
                f"Override '{key}' would change only the coordinator's copy of region '{parts[1]}''s policy: each "
                f"region's node enforces its own file. Edit {config_dir / 'regions' / parts[1]}.yaml (or point "
                f"${CONFIG_DIR_ENV} at a copy of configs/ with your policies)."
            )
        if parts[0] == "regions" and len(parts) > 1 and parts[1] not in groups.get("regions", []):
            raise ConfigError(
                f"Override '{key}' names region '{parts[1]}', which has no file "
                f"{config_dir / 'regions' / parts[1]}.yaml. Known regions: "
                f"{', '.join(groups.get('regions', []))}."
            )
        if key in ("privacy.delta", "privacy.epsilon_budget", "privacy.unit"):
            raise ConfigError(
                f"'{key}' is set by each region's policy, not by the coordinator: edit "
                f"policy.{key} in {config_dir / 'regions'}/<region>.yaml."
            )
        allowed = _schema_fields(key)
        if allowed:
            raise ConfigError(_unknown_key_text(_first_unknown(key), allowed))


def _check_prefix(override, is_group: bool) -> None:
    """Hydra's `~` and `+` where fedsov can honour them; refused, naming the plain form, where it cannot."""
    text = override.input_line
    key = override.key_or_group
    if override.is_delete():
        if is_group:
            raise ConfigError(
                f"'{text}': the {key} group cannot be deleted from the defaults; choose its options "
                f"instead, e.g. {key}=[eu,us] (every config needs some)."
            )
        default = _schema_default(key)
        if dataclasses.is_dataclass(default):
            field_name = dataclasses.fields(default)[0].name
            raise ConfigError(
                f"'{text}' would delete the section '{key}', which fedsov's configuration needs; set its "
                f"fields instead, e.g. {key}.{field_name}=<value>."
            )
        if default is _ANY_VALUE:
            raise ConfigError(
                f"'{text}' would delete '{key}', which fedsov's configuration needs; set it instead: {key}=<value>."
            )
        raise ConfigError(
            f"'{text}' would delete '{key}', and fedsov's schema would put its built-in default "
            f"({default!r}) back in silence; set it explicitly instead: {key}=<value>."
        )
    if override.is_add() and is_group:
        raise ConfigError(
            f"'{text}': the {key} group is already in the defaults list, so `+` would add nothing; "
            f"choose its options with {key}=[...] (no +)."
        )
    # `+regions.<r>.*` is left to composition: it names a region the `regions` list must select.
    if override.is_add() and not _schema_fields(key) and not key.startswith("regions."):
        raise ConfigError(
            f"'{text}': '{key}' already exists (every key of fedsov's schema does), so `+` cannot add "
            f"it; set it with {key}=<value> (or ++{key}=<value>)."
        )


def _schema_default(full_key: str) -> Any:
    """The schema's built-in default for a key outside `regions` (_ANY_VALUE where there is none)."""
    node: Any = FedsovConfig()
    for part in full_key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return _ANY_VALUE
        node = getattr(node, part)
    return node


def config_from_container(raw: DictConfig | ListConfig | dict[str, Any]) -> FedsovConfig:
    """Merge a plain or composed config onto the schema; errors name the key and the fix."""
    if not isinstance(raw, (DictConfig, dict)):  # OmegaConf.load of a YAML list
        raise ConfigError(
            f"A fedsov config is a mapping of keys, not a {type(raw).__name__}: check the file it came from."
        )
    cfg: FedsovConfig = _typed(FedsovConfig, raw, "")
    _absolutise_paths(cfg)
    if cfg.federation.optimizer == OptimizerChoice.auto:
        cfg.federation.optimizer = OptimizerChoice.rmsprop if cfg.privacy.enabled else OptimizerChoice.adamw
    if cfg.federation.server_learning_rate is None:
        # 1.5 was measured only for DP-RMSprop; without DP, AdamW's averaged update has no noise to average
        # away, and 1.5 overshot (a 2-round non-private federation ended worse than its base model).
        rmsprop = cfg.federation.optimizer == OptimizerChoice.rmsprop
        cfg.federation.server_learning_rate = RMSPROP_SERVER_LEARNING_RATE if rmsprop else 1.0
    validate(cfg)
    return cfg


TEMPLATE_FILE = "region-template.yaml"


def load_region_file(path: Path | str) -> RegionConfig:
    """A region's own file (description and policy): complete, for its own region, and valid.

    The one loader for every path that reads a region's rules (the node, `policy validate`,
    `dry-run`, `simulate`), so what one accepts, all accept.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"No region policy file at {path}. Every node needs its region's file (start from configs/{TEMPLATE_FILE})."
        )
    region = path.stem
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come in several types
        raise ConfigError(f"Region policy file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, DictConfig) or not raw:
        raise ConfigError(
            f"Region policy file {path} is empty (or not a mapping): it must set every field of region "
            f"'{region}' and its policy. Copy configs/{TEMPLATE_FILE} to it and fill in each value."
        )
    first = path.read_text().splitlines()[0].strip()
    package = f"# @package regions.{region}"
    if "<name>" in first:
        raise ConfigError(
            f"{path} is still the template (first line '{first}'): copy it to "
            "configs/regions/<name>.yaml, put the region's name in place of <name> in the first line "
            "and in `name`, and set every ??? value."
        )
    if first != package:
        other = first.removeprefix("# @package regions.") if first.startswith("# @package regions.") else None
        found = f"declares region '{other}' (first line '{first}')" if other else f"starts with '{first[:60]}'"
        raise ConfigError(
            f"{path} {found}, but a file named {path.name} must hold the rules of region '{region}' and start with "
            f"'{package}' (Hydra files it under that key; without it the region vanishes or becomes another). "
            + (
                f"If these are {other}'s rules, they belong in {other}.yaml; write {region}'s own here."
                if other
                else f"Make '{package}' the first line."
            )
        )
    region_cfg: RegionConfig = _typed(RegionConfig, raw, f"{path}: ", file=path)
    if region_cfg.name != region:
        raise ConfigError(
            f"{path}: name = {region_cfg.name!r}, but the file is {path.name}: a region's file must be "
            f"for that region. Set name: {region} (if these are {region_cfg.name}'s rules, move them to "
            f"{region_cfg.name}.yaml)."
        )
    validate_region(region_cfg, f"{path.name}: ")
    return region_cfg


def validate_region(region: RegionConfig, where: str) -> None:
    """The checks a region passes whether it comes from its file or from a composed config."""
    validate_policy(region.policy, f"{where}policy")
    if region.name not in region.policy.residency.allowed_region_tags:
        _fail(
            f"{where}policy.residency.allowed_region_tags",
            region.policy.residency.allowed_region_tags,
            f"does not include the region's own tag '{region.name}'",
            f"Add {region.name}.",
        )
    if not JURISDICTION.match(region.jurisdiction):
        _fail(
            f"{where}jurisdiction",
            region.jurisdiction,
            "is not a jurisdiction code",
            "Use an ISO 3166 code such as GB, CA-QC, or EU.",
        )


def _typed(root: type, raw: Any, where: str, file: Path | None = None) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(root), raw)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(where + _missing_text(missing, root, file))
        return OmegaConf.to_object(merged)
    except oc_errors.ConfigKeyError as err:
        full_key = str(err.full_key or err.key)
        if isinstance(raw, DictConfig) and "." not in full_key and full_key not in raw:
            full_key = _locate(raw, full_key) or full_key  # OmegaConf loses the path inside a list entry
        text = _unknown_key_text(_first_unknown(full_key, root), _schema_fields(full_key, root))
        raise ConfigError(where + text) from err
    except oc_errors.ValidationError as err:
        if isinstance(raw, DictConfig) and "." not in str(err.full_key) and err.full_key not in raw:
            # OmegaConf loses the path of a value inside a list entry: find it in the file's own tree.
            err.full_key = _locate(raw, str(err.key), err.value) or err.full_key
        if file is not None and "is not Optional" in str(err.msg):
            fields = _section_fields(str(err.full_key), root)
            raise ConfigError(
                f"{where}'{err.full_key}' is empty or null, but it must be set"
                + (f" (a section; it must set {', '.join(fields)})" if fields else "")
                + f". Set it in {file.name}; configs/{TEMPLATE_FILE} shows where null is allowed."
            ) from err
        raise ConfigError(where + _wrong_value_message(err)) from err
    except oc_errors.MissingMandatoryValue as err:
        raise ConfigError(
            f"{where}Config key '{err.full_key}' must be set: it has no default. "
            f"{_missing_value_fix(str(err.full_key), where)}"
        ) from err
    except oc_errors.InterpolationResolutionError as err:
        raise ConfigError(f"{where}Config key '{err.full_key}': {err.msg}") from err


def _missing_text(keys: list[str], root: type, file: Path | None) -> str:
    """Name every unset key (and every field of a missing section) with the fix for where it lives."""
    described = []
    for key in keys:
        fields = _section_fields(key, root)
        described.append(f"{key} (a section; it must set {', '.join(fields)})" if fields else key)
    listing = "; ".join(described)
    rule = "nothing is filled with a default"
    if file is not None:
        return (
            f"{len(keys)} required key(s) missing or unset (???): {listing}. Every field of a region's file must "
            f"be set in the file itself ({rule}): copy the missing lines from configs/{TEMPLATE_FILE} and set "
            "each value (the presets cite the article behind theirs)."
        )
    regions = sorted({k.split(".")[1] for k in keys if k.startswith("regions.") and k.count(".") > 1})
    if regions:
        return (
            f"Config keys missing or unset (???): {listing}. Regions come only from their files ({rule}): "
            f"set them in configs/regions/{{{','.join(regions)}}}.yaml."
        )
    return (
        f"Config key(s) {listing} must be set: they have no default. Add "
        + " ".join(f"{k}=<value>" for k in keys)
        + " to the command line."
    )


def _section_fields(full_key: str, root: type) -> list[str]:
    """The fields of the dataclass at `full_key` ([] if it is a plain value)."""
    node: Any = root
    for part in re.sub(r"\[\d+\]", "", full_key).split("."):
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
            continue
        if not dataclasses.is_dataclass(node):
            return []
        node = _element_type(typing.get_type_hints(node).get(part))
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


_ANY_VALUE = object()


def _locate(node: Any, key: str, value: Any = _ANY_VALUE, prefix: str = "") -> str | None:
    """The dotted path (with [i] for list entries) of the first `key` holding `value` (or any) under `node`."""
    items: list[tuple[str, Any, Any]]
    if isinstance(node, DictConfig):
        items = [(f"{prefix}{k!s}", k, node._get_node(k)) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(f"{prefix[:-1]}[{i}]", None, node._get_node(i)) for i in range(len(node))]
    else:
        return None

    def plain(v: Any) -> Any:
        if isinstance(v, (DictConfig, ListConfig)):
            return OmegaConf.to_container(v)
        return v._value() if hasattr(v, "_value") else v

    for path, name, child in items:
        if name == key and (value is _ANY_VALUE or plain(child) == plain(value)):
            return path
        found = _locate(child, key, value, f"{path}.")
        if found:
            return found
    return None


def _missing_value_fix(key: str, where: str) -> str:
    """The fix that works for a value missing from a region's file, or from the composed config."""
    parent, _, leaf = key.rpartition(".")
    setting = f"'{leaf}: <value>'" + (f" under '{parent}:'" if parent else " at the top level")
    if where:  # a region's own file: its nodes read nothing else
        return f"Edit the file: set {setting} (configs/{TEMPLATE_FILE} shows every key)."
    parts = key.split(".")
    if parts[0] == "regions" and len(parts) > 2:
        # A node enforces its own file, so a command-line value for it would be refused or ignored.
        region_key = ".".join(parts[2:])
        return (
            f"Set '{region_key}' in {default_config_dir() / 'regions' / parts[1]}.yaml "
            f"(configs/{TEMPLATE_FILE} shows every key)."
        )
    return f"Add {key}=<value> to the command line."


def config_from_json(text: str) -> FedsovConfig:
    """Rebuild a resolved config that travelled as JSON (run config of a Flower run)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"The fedsov-config run value is not valid JSON: {err}") from err
    return config_from_container(raw)


def config_to_dict(cfg: FedsovConfig) -> dict[str, Any]:
    """Plain, JSON-ready dict of a resolved config (enums as their values)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=_enum_value))


def config_to_yaml(cfg: FedsovConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))


def _enum_value(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _absolutise_paths(cfg: FedsovConfig) -> None:
    # The ServerApp and ClientApps run in other processes with other working folders.
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    cfg.workdir = absolute(cfg.workdir)
    cfg.data.root = absolute(cfg.data.root)
    cfg.model.cache_dir = absolute(cfg.model.cache_dir)
    if cfg.run_dir:
        cfg.run_dir = absolute(cfg.run_dir)
    if cfg.resume:
        cfg.resume = absolute(cfg.resume)
    if cfg.model.name_or_path != EMBEDDED_MODEL:
        cfg.model.name_or_path = absolute(cfg.model.name_or_path)
    for region in cfg.regions.values():
        region.data.paths = [absolute(p) for p in region.data.paths]


def _schema_fields(full_key: str, root: type = FedsovConfig) -> list[str]:
    """Allowed keys at the first level of `full_key` the schema does not know ([] if all known)."""
    node: Any = root
    for part in re.sub(r"\[\d+\]", "", full_key).split("."):
        if typing.get_origin(node) is dict:  # a region name inside `regions`
            node = typing.get_args(node)[1]
            continue
        if not dataclasses.is_dataclass(node):
            return []
        hints = typing.get_type_hints(node)
        if part not in hints:
            return [f.name for f in dataclasses.fields(node)]
        node = _element_type(hints[part])
    return []


def _element_type(hint: Any) -> Any:
    """The type inside `X | None` and `list[X]` (a list entry's keys are checked like a section's)."""
    # `X | None` is types.UnionType, `Optional[X]` typing.Union: the schema may use either.
    while typing.get_origin(hint) in (list, typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _first_unknown(full_key: str, root: type = FedsovConfig) -> str:
    """The shortest prefix of `full_key` that the schema does not know."""
    parts = full_key.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if _schema_fields(prefix, root):
            return prefix
    return full_key


def _unknown_key_text(full_key: str, allowed: list[str]) -> str:
    key = full_key.rsplit(".", 1)[-1]
    where = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
    msg = f"Unknown config key '{full_key}'."
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        msg += f" Did you mean '{close[0]}'?"
    if allowed:
        msg += f" Allowed keys under {where}: {', '.join(allowed)}."
    return msg


def _wrong_value_message(err: oc_errors.ValidationError) -> str:
    full_key = err.full_key
    expected = err.ref_type
    allowed = ""
    if isinstance(expected, type) and issubclass(expected, Enum):
        allowed = f" Allowed values: {', '.join(m.value for m in expected)}."
    detail = str(err.msg).splitlines()[0]
    return f"Config key '{full_key}' has an invalid value: {detail}.{allowed}"


def _fail(key: str, value: Any, rule: str, fix: str) -> NoReturn:
    raise ConfigError(f"Config key '{key}' = {value!r}: {rule}. {fix}")


def validate(cfg: FedsovConfig) -> None:
    """Range and consistency checks the type system cannot express."""
    fed, priv, model, data = cfg.federation, cfg.privacy, cfg.model, cfg.data
    positive_ints = {
        "federation.rounds": fed.rounds,
        "federation.local_steps": fed.local_steps,
        "federation.batch_size": fed.batch_size,
        "federation.eval_batch_size": fed.eval_batch_size,
        "federation.min_clients": fed.min_clients,
        "model.max_length": model.max_length,
        "model.lora.rank": model.lora.rank,
        "data.users_per_region": data.users_per_region,
        "data.shards": data.shards,
        "simulation.client_cpus": cfg.simulation.client_cpus,
    }
    for key, value in positive_ints.items():
        if value < 1:
            _fail(key, value, "must be at least 1", "Set a positive integer.")
    for key, rate in {
        "federation.learning_rate": fed.learning_rate,
        "federation.server_learning_rate": fed.server_learning_rate,
        "federation.round_timeout_s": fed.round_timeout_s,
        "federation.node_wait_timeout_s": fed.node_wait_timeout_s,
        "model.lora.alpha": model.lora.alpha,
    }.items():
        if rate is None or not rate > 0:  # the server step is resolved before validate: a None would be a bug
            _fail(key, rate, "must be greater than 0", "Set a positive number.")
    if fed.keep_checkpoints < 1:
        _fail(
            "federation.keep_checkpoints",
            fed.keep_checkpoints,
            "must be at least 1",
            "Resuming needs the last checkpoint; keep at least 1.",
        )
    if not 0 <= model.lora.dropout < 1:
        _fail("model.lora.dropout", model.lora.dropout, "must be in [0, 1)", "Use e.g. 0.05.")
    if not 0 <= data.heldout_fraction < 1:
        _fail("data.heldout_fraction", data.heldout_fraction, "must be in [0, 1)", "Use e.g. 0.1.")
    if not 0 <= data.consent_rate <= 1:
        _fail("data.consent_rate", data.consent_rate, "must be in [0, 1]", "Use e.g. 0.92.")
    lo_hi = data.records_per_user
    if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
        _fail("data.records_per_user", lo_hi, "must be [min, max] with 1 <= min <= max", "Use e.g. [2, 6].")
    if fed.optimizer == OptimizerChoice.rmsprop and not priv.enabled:
        _fail(
            "federation.optimizer",
            fed.optimizer.value,
            "needs DP (privacy.enabled=true): it starts from the DP noise's variance",
            "Use federation.optimizer=adamw without DP.",
        )
    cpus = cfg.simulation.cpus
    if cpus is not None and cpus < cfg.simulation.client_cpus:
        _fail(
            "simulation.cpus",
            cpus,
            f"is below simulation.client_cpus ({cfg.simulation.client_cpus}): no client could run",
            "Give the simulation at least one client's cores, or null for all of this machine's.",
        )
    if cfg.simulation.client_gpus < 0:
        _fail("simulation.client_gpus", cfg.simulation.client_gpus, "must be >= 0", "Use 0 on CPU.")
    if model.device == DeviceChoice.cuda:
        import torch

        if not torch.cuda.is_available():
            _fail(
                "model.device", "cuda", "no CUDA device is available on this machine", "Use model.device=auto or cpu."
            )
    sa = cfg.secure_aggregation
    if not 0.5 < sa.threshold_fraction <= 1:
        _fail(
            "secure_aggregation.threshold_fraction",
            sa.threshold_fraction,
            "must be in (0.5, 1]",
            "At one half or below, two disjoint groups could each unmask; use e.g. 0.6.",
        )
    if sa.min_clients < 2:
        _fail(
            "secure_aggregation.min_clients",
            sa.min_clients,
            "must be at least 2",
            "A secure sum of one update is that update.",
        )
    if not sa.stage_timeout_s > 0:
        _fail("secure_aggregation.stage_timeout_s", sa.stage_timeout_s, "must be greater than 0", "Use e.g. 120.")
    au = cfg.audit
    from common.leakage.canaries import FORMATS

    unknown = sorted(set(au.canary_formats) - set(FORMATS))
    if unknown:
        _fail("audit.canary_formats", unknown, "unknown canary formats", f"Use some of: {', '.join(FORMATS)}.")
    if au.enabled and not au.canary_formats:
        _fail("audit.canary_formats", [], "the audit needs at least one canary format", "Use e.g. [door-code].")
    if au.one_run_repetitions < 1:
        _fail(
            "audit.one_run_repetitions",
            au.one_run_repetitions,
            "must be at least 1",
            "Use 1 (each included canary once) or a few copies.",
        )
    if any(r < 1 for r in au.canary_repetitions):
        _fail(
            "audit.canary_repetitions", au.canary_repetitions, "repetitions must be at least 1", "Use e.g. [1, 4, 16]."
        )
    if not 0 < au.one_run_guess_share <= 1:
        _fail(
            "audit.one_run_guess_share",
            au.one_run_guess_share,
            "must be in (0, 1]",
            "Use e.g. 0.5: guess on the half of the canaries with the most and the least extreme scores.",
        )
    if au.one_run_canaries and au.one_run_candidates < 50:
        _fail("audit.one_run_candidates", au.one_run_candidates, "too few for a skew-normal fit", "Use at least 50.")
    for key, value in {
        "audit.one_run_canaries": au.one_run_canaries,
        "audit.exposure_candidates": au.exposure_candidates,
        "audit.mia_members": au.mia_members,
        "audit.generations": au.generations,
    }.items():
        if value < 0:
            _fail(key, value, "must be >= 0", "Use a non-negative count.")
    if au.exposure_candidates and au.exposure_candidates < 50:
        _fail("audit.exposure_candidates", au.exposure_candidates, "too few for a skew-normal fit", "Use at least 50.")
    _validate_privacy(priv)
    _validate_regions(cfg)


def _validate_privacy(priv: PrivacyConfig) -> None:
    if not priv.enabled:
        return
    if (priv.noise_multiplier is None) == (priv.target_epsilon is None):
        raise ConfigError(
            "DP-SGD needs exactly one of privacy.noise_multiplier and privacy.target_epsilon "
            f"(got noise_multiplier={priv.noise_multiplier}, target_epsilon={priv.target_epsilon}). "
            "Set one and null the other, e.g. privacy.noise_multiplier=null privacy.target_epsilon=8."
        )
    if priv.noise_multiplier is not None and not priv.noise_multiplier > 0:
        _fail(
            "privacy.noise_multiplier",
            priv.noise_multiplier,
            "must be greater than 0",
            "Use e.g. 1.0, or privacy.enabled=false to train without DP.",
        )
    if priv.target_epsilon is not None and not priv.target_epsilon > 0:
        _fail("privacy.target_epsilon", priv.target_epsilon, "must be greater than 0", "Use e.g. 8.")
    if not priv.max_grad_norm > 0:
        _fail("privacy.max_grad_norm", priv.max_grad_norm, "must be greater than 0", "Use e.g. 1.0.")


def _validate_regions(cfg: FedsovConfig) -> None:
    if not cfg.regions:
        raise ConfigError("No regions selected. Choose some, e.g. regions=[eu,us,sg].")
    for key, region in cfg.regions.items():
        where = f"regions.{key}"
        if region.name != key:
            _fail(
                f"{where}.name",
                region.name,
                f"must equal its key '{key}'",
                f"Rename the file or set {where}.name={key}.",
            )
        if region.clients < 1:
            _fail(f"{where}.clients", region.clients, "must be at least 1", "Use e.g. 2.")
        if region.data.source == DataSource.synthetic and not region.locales:
            _fail(
                f"{where}.locales",
                region.locales,
                "synthetic data needs at least one Faker locale",
                "Use e.g. [de_DE, fr_FR].",
            )
        validate_region(region, f"{where}.")
        if region.data.source == DataSource.files and not region.data.paths:
            _fail(
                f"{where}.data.paths",
                region.data.paths,
                "source=files needs at least one path",
                f"Set {where}.data.paths=[/data/{key}] or {where}.data.source=synthetic.",
            )
