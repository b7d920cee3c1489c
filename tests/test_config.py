import json
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
        (["regions=[eu,mars]"], ["'mars'", "cn, eu, sg, template, us"]),
        (["regions.mars.clients=2"], ["region 'mars'", "Known regions"]),
        (["model=hf"], ["model.name_or_path", "must be set"]),
        (["federation.rounds=0"], ["federation.rounds", "at least 1"]),
        (["privacy.delta=1e-6"], ["set by each region's policy", "regions"]),
        (["regions.eu.policy.privacy.delta=0.1"], ["only the coordinator's copy", "eu.yaml"]),
        (["privacy.noise_multiplier=1.0"], ["exactly one of privacy.noise_multiplier and privacy.target_epsilon"]),
        (["secure_aggregation.threshold_fraction=0.3"], ["secure_aggregation.threshold_fraction", "[0.5, 1]"]),
        (["secure_aggregation.min_clients=1"], ["secure_aggregation.min_clients", "at least 2"]),
        (["regions.eu.data.source=files"], ["regions.eu.data.paths", "source=files needs at least one path"]),
        (["data.records_per_user=[5,2]"], ["data.records_per_user"]),
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


@pytest.mark.parametrize("region", ["eu", "us", "sg", "cn", "template"])
def test_presets_and_template_validate(region):
    from common.config import default_config_dir, load_region_file
    from common.policy import policy_hash

    loaded = load_region_file(default_config_dir() / "regions" / f"{region}.yaml")
    assert loaded.name == region and len(policy_hash(loaded.policy)) == 64


def test_every_preset_field_carries_a_rationale():
    from common.config import default_config_dir

    for region in ("eu", "us", "sg", "cn"):
        text = (default_config_dir() / "regions" / f"{region}.yaml").read_text()
        policy = text[text.index("policy:"):]
        for line in policy.splitlines()[1:]:
            stripped = line.strip()
            if stripped and not stripped.endswith(":") and ":" in stripped and not stripped.startswith("#"):
                if stripped.startswith("law:"):
                    continue  # the law's name is its own rationale
                assert "#" in line, f"{region}.yaml: '{stripped}' has no rationale comment"


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
