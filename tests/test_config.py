import json
import re
from pathlib import Path

import pytest

from common.config import (
    DataSource,
    PrivacyUnitKind,
    config_from_json,
    config_to_dict,
    load_config,
)
from common.errors import ConfigError


def test_defaults_compose_four_regions_with_dp_and_policies():
    cfg = load_config([])
    assert list(cfg.regions) == ["eu", "us", "sg", "cn"]
    assert all(r.clients == 2 for r in cfg.regions.values())
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon and cfg.privacy.noise_multiplier is None
    assert cfg.regions["eu"].policy.privacy.unit == PrivacyUnitKind.record
    assert cfg.regions["cn"].policy.transfers.allowed_coordinator_jurisdictions == ["CN"]
    assert cfg.federation.coordinator_jurisdiction == "EU"
    assert cfg.secure_aggregation.enabled
    assert cfg.model.name_or_path == "embedded"
    assert Path(cfg.workdir).is_absolute() and Path(cfg.data.root) == Path(cfg.workdir) / "data"


def test_every_value_overridable_and_groups_composable(tmp_path):
    cfg = load_config(
        [
            "regions=[eu,us,sg,cn]",
            "federation.rounds=7",
            "privacy.target_epsilon=null",
            "privacy.noise_multiplier=1.3",
            "regions.cn.clients=3",
            "model.lora.target_modules=[c_attn,c_proj]",
            f"regions.eu.data.paths=[{tmp_path}]",
            "regions.eu.data.source=files",
        ]
    )
    assert list(cfg.regions) == ["eu", "us", "sg", "cn"]
    assert cfg.federation.rounds == 7 and cfg.regions["cn"].clients == 3
    assert cfg.privacy.noise_multiplier == 1.3
    assert cfg.model.lora.target_modules == ["c_attn", "c_proj"]
    assert cfg.regions["eu"].data.source == DataSource.files and cfg.regions["eu"].data.paths == [str(tmp_path)]


@pytest.mark.parametrize(
    "override, expected",
    [
        (["federation.roundz=3"], ["federation.roundz", "Did you mean 'rounds'", "local_steps"]),
        (["regions.eu.dta.source=files"], ["regions.eu.dta", "Did you mean 'data'"]),
        (["model.lora.rnk=4"], ["model.lora.rnk", "'rank'"]),
        (["federation.rounds=abc"], ["federation.rounds", "'abc'"]),
        (["model.dtype=float16"], ["model.dtype", "auto", "float32", "bfloat16"]),
        (["regions.eu.data.source=filez"], ["regions.eu.data.source", "synthetic", "files"]),
        (["model=gpt9"], ["'gpt9' is not a model config", "hf", "tiny"]),
        (["regions=[eu,mars]"], ["'mars'", "br, ca, cn, eu, in, jp, kr, qc, sg, uk, us"]),
        (["regions.mars.clients=2"], ["region 'mars'", "Known regions"]),
        (["model=hf"], ["model.name_or_path", "must be set"]),
        (["federation.rounds=0"], ["federation.rounds", "at least 1"]),
        (["privacy.delta=1e-6"], ["set by each region's policy", "regions"]),
        (["regions.eu.policy.privacy.delta=0.1"], ["only the coordinator's copy", "eu.yaml"]),
        (["privacy.noise_multiplier=1.0"], ["exactly one of privacy.noise_multiplier and privacy.target_epsilon"]),
        (["secure_aggregation.threshold_fraction=0.5"], ["secure_aggregation.threshold_fraction", "(0.5, 1]"]),
        (["secure_aggregation.min_clients=1"], ["secure_aggregation.min_clients", "at least 2"]),
        (["regions.eu.data.source=files"], ["regions.eu.data.paths", "source=files needs at least one path"]),
        (["data.records_per_user=[5,2]"], ["data.records_per_user"]),
        (["federation.optimizer=lion"], ["federation.optimizer", "adamw", "sgd", "rmsprop"]),
        (["privacy=off", "federation.optimizer=rmsprop"], ["federation.optimizer", "needs DP", "adamw"]),
        (["audit.one_run_repetitions=0"], ["audit.one_run_repetitions", "at least 1"]),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(override)
    for fragment in expected:
        assert fragment in str(err.value)


def test_resolved_config_survives_the_json_trip():
    cfg = load_config(["regions=[eu,cn]", "privacy=off"])
    again = config_from_json(json.dumps(config_to_dict(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not again.privacy.enabled


def test_missing_config_folder_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="FEDSOV_CONFIG_DIR"):
        load_config([], config_dir=tmp_path)


PRESETS = ("eu", "uk", "us", "ca", "qc", "br", "sg", "cn", "in", "jp", "kr")
# A rationale must cite its source: an article, section, rule, principle, schedule, decision or regulation.
CITATION = re.compile(
    r"\b(Art\.|Arts?\b|Article|Recital|s\. \d|ss\. \d|Sch\. \d|Schedule|Principle|Rule \d|Rules|reg\. \d|Regulations?"
    r"|CFR|U\.S\.C\.|EO \d|Decision|Resolution|Provisions|Notice|Chapter [IVX]+|SI \d{4}/\d+|1798\.\d+)"
)


def test_every_preset_file_is_a_region():
    from common.config import default_config_dir

    assert sorted(p.stem for p in (default_config_dir() / "regions").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("region", PRESETS)
def test_presets_validate(region):
    from common.config import default_config_dir, load_region_file
    from common.policy import policy_hash

    loaded = load_region_file(default_config_dir() / "regions" / f"{region}.yaml")
    assert loaded.name == region and len(policy_hash(loaded.policy)) == 64


def test_the_template_shows_every_field_and_is_refused_until_filled(tmp_path):
    """Copied unreviewed, the template refuses and names every unset key, none filled by a default."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    from common.config import TEMPLATE_FILE, RegionConfig, default_config_dir, load_region_file

    def schema_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from schema_keys(hint, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    template = default_config_dir() / TEMPLATE_FILE
    with pytest.raises(ConfigError, match="is still the template"):
        load_region_file(template)
    # Every field of the schema is shown, and every one is left unset (???) for the region to decide.
    assert sorted(OmegaConf.missing_keys(OmegaConf.load(template))) == sorted(schema_keys(RegionConfig))
    copy = tmp_path / "mars.yaml"
    copy.write_text(template.read_text().replace("<name>", "mars", 1))
    with pytest.raises(ConfigError) as err:
        load_region_file(copy)
    message = str(err.value)
    for key in schema_keys(RegionConfig):
        assert key in message, key
    assert "nothing is filled with a default" in message and TEMPLATE_FILE in message


@pytest.mark.parametrize("region", PRESETS)
def test_every_preset_field_carries_a_cited_rationale(region):
    """Each policy line says why, citing where from; a list entry's first line speaks for the entry."""
    from common.config import default_config_dir

    text = (default_config_dir() / "regions" / f"{region}.yaml").read_text()
    policy = text[text.index("\npolicy:") + 1 :].splitlines()[1:]
    item_keys_indent = None
    for line in policy:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- "):
            item_keys_indent = indent + 2
        elif indent == item_keys_indent:
            continue  # a key of a list entry: the entry's own line carries the rationale
        else:
            item_keys_indent = None
        if stripped.startswith("law:") or (stripped.endswith(":") and "#" not in stripped):
            continue  # the law's name is its own rationale; a bare section header has no value
        assert " # " in line or "  #" in line, f"{region}.yaml: '{stripped}' has no rationale comment"
        comment = line.split("#", 1)[1]
        assert CITATION.search(comment), f"{region}.yaml: '{stripped}' cites no article, section or decision"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("residency", "raw_data_export", "true"), "raw data export is never possible"),
        (("privacy", "delta", "1.5"), "policy.privacy.delta"),
        (("privacy", "unit", "household"), "record, user"),
        (("transfers", "allowed_coordinator_jurisdictions", "[]"), "no coordinator could ever receive updates"),
        (("data_use", "scrub_entities", "[PASSPORT]"), "unknown entity types"),
        (("transfers", "min_cohrt", "3"), "Did you mean 'min_cohort'"),
    ],
)
def test_bad_policy_values_name_the_key(tmp_path, edit, expected):
    import re

    from common.config import default_config_dir, load_region_file

    section, key, value = edit
    text = (default_config_dir() / "regions" / "eu.yaml").read_text()
    block = text.index(f"  {section}:")
    if re.search(rf"\n    {key}:", text[block:]):
        text = text[:block] + re.sub(rf"\n    {key}:[^\n]*", f"\n    {key}: {value}", text[block:], count=1)
    else:
        text = text.replace(f"  {section}:\n", f"  {section}:\n    {key}: {value}\n", 1)
    path = tmp_path / "eu.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_region_file(path)
    assert expected in str(err.value)


def test_a_stop_signal_during_composition_stops_fedsov_and_is_never_reported_as_a_bad_config(monkeypatch):
    """SIGTERM (raised as KeyboardInterrupt) landing inside OmegaConf can surface as an OmegaConf error from its
    clean-up; it must still stop fedsov (exit 143), not read as "Invalid configuration" (exit 2)."""
    import hydra
    from omegaconf.errors import OmegaConfBaseException

    def cut_short(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OmegaConfBaseException("'NoneType' object has no attribute '_invalidate_flags_cache'") from None

    monkeypatch.setattr(hydra, "compose", cut_short)
    with pytest.raises(KeyboardInterrupt):
        load_config(["regions=[us]"])

    def broken(*args, **kwargs):
        raise OmegaConfBaseException("a real configuration error")

    monkeypatch.setattr(hydra, "compose", broken)
    with pytest.raises(ConfigError, match="a real configuration error"):
        load_config(["regions=[us]"])


def test_the_cores_a_simulation_shares_cap_its_ray_actors_and_come_from_the_environment(monkeypatch):
    from server.simulation import federation_config

    monkeypatch.delenv("FEDSOV_SIMULATION_CPUS", raising=False)
    settings = federation_config(load_config(["regions=[eu,us]"]))
    assert settings == {"num-supernodes": 4, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0}
    monkeypatch.setenv("FEDSOV_SIMULATION_CPUS", "1")
    assert federation_config(load_config(["regions=[eu,us]"]))["init-args-num-cpus"] == 1
    assert federation_config(load_config(["simulation.cpus=4"]))["init-args-num-cpus"] == 4
    with pytest.raises(ConfigError, match=r"'simulation.cpus' = 1: is below simulation.client_cpus \(2\)"):
        load_config(["simulation.client_cpus=2"])


def test_the_optimiser_is_dp_rmsprop_with_dp_and_adamw_without_unless_named():
    from common.config import OptimizerChoice

    assert load_config([]).federation.optimizer == OptimizerChoice.rmsprop
    assert load_config(["privacy=off"]).federation.optimizer == OptimizerChoice.adamw
    assert load_config(["privacy=off", "federation.optimizer=sgd"]).federation.optimizer == OptimizerChoice.sgd
    resolved = load_config(["federation.optimizer=adamw"])
    assert config_from_json(json.dumps(config_to_dict(resolved))).federation.optimizer == OptimizerChoice.adamw


def test_the_server_step_is_one_and_a_half_under_dp_rmsprop_and_plain_fedavg_otherwise_unless_named():
    def server_step(*overrides: str) -> float | None:
        return load_config(list(overrides)).federation.server_learning_rate

    assert server_step() == 1.5
    assert server_step("privacy=off") == 1.0
    assert server_step("federation.optimizer=adamw") == 1.0  # 1.5 was measured for RMSprop only
    assert server_step("privacy=off", "federation.server_learning_rate=1.25") == 1.25
    # Resolved once: a saved config (a resumed run) keeps the number it ran with.
    saved = config_to_dict(load_config(["federation.optimizer=sgd"]))
    assert config_from_json(json.dumps(saved)).federation.server_learning_rate == 1.0


def test_the_clients_learning_rate_decays_linearly_by_round_unless_constant():
    from server.coordinator import round_learning_rate, round_plan

    def rates(*overrides: str) -> list[float]:
        fed = load_config(list(overrides)).federation
        return [round_learning_rate(fed, r) for r in range(0, fed.rounds + 1)]

    # Round 0 (the base model's evaluation) carries round 1's rate; it trains nothing.
    assert rates() == pytest.approx([1.5e-2, 1.5e-2, 1.2e-2, 0.9e-2, 0.6e-2, 0.3e-2])
    assert rates("federation.rounds=2", "federation.learning_rate=0.1") == pytest.approx([0.1, 0.1, 0.05])
    assert rates("federation.lr_scheduler=constant") == [1.5e-2] * 6
    # What the nodes get is each round's own rate, in its plan.
    cfg = load_config(["federation.rounds=4"])
    assert [round_plan(cfg, "run#1", r, "f" * 64, 3).learning_rate for r in (1, 4)] == pytest.approx([1.5e-2, 3.75e-3])
    with pytest.raises(ConfigError, match="federation.lr_scheduler") as err:
        load_config(["federation.lr_scheduler=cosine"])
    assert "linear" in str(err.value) and "constant" in str(err.value)
