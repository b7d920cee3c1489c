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


def test_defaults_compose_three_regions_with_dp():
    cfg = load_config([])
    assert list(cfg.regions) == ["eu", "us", "sg"]
    assert all(r.clients == 2 for r in cfg.regions.values())
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon and cfg.privacy.noise_multiplier is None
    assert cfg.privacy.unit == PrivacyUnitKind.record
    assert cfg.model.name_or_path == "embedded"
    assert Path(cfg.workdir).is_absolute() and Path(cfg.data.root) == Path(cfg.workdir) / "data"


def test_every_value_overridable_and_groups_composable(tmp_path):
    cfg = load_config(
        [
            "regions=[eu,us,sg,cn]",
            "federation.rounds=7",
            "privacy.unit=user",
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
    assert cfg.privacy.unit == PrivacyUnitKind.user and cfg.privacy.noise_multiplier == 1.3
    assert cfg.model.lora.target_modules == ["c_attn", "c_proj"]
    assert cfg.regions["eu"].data.source == DataSource.files and cfg.regions["eu"].data.paths == [str(tmp_path)]


@pytest.mark.parametrize(
    "override, expected",
    [
        (["federation.roundz=3"], ["federation.roundz", "Did you mean 'rounds'", "local_steps"]),
        (["regions.eu.dta.source=files"], ["regions.eu.dta", "Did you mean 'data'"]),
        (["model.lora.rnk=4"], ["model.lora.rnk", "'rank'"]),
        (["federation.rounds=abc"], ["federation.rounds", "'abc'"]),
        (["privacy.unit=person"], ["privacy.unit", "record", "user"]),
        (["regions.eu.data.source=filez"], ["regions.eu.data.source", "synthetic", "files"]),
        (["model=gpt9"], ["'gpt9' is not a model config", "hf", "tiny"]),
        (["regions=[eu,mars]"], ["'mars'", "cn, eu, sg, us"]),
        (["regions.mars.clients=2"], ["region 'mars'", "Known regions"]),
        (["model=hf"], ["model.name_or_path", "must be set"]),
        (["federation.rounds=0"], ["federation.rounds", "at least 1"]),
        (["privacy.delta=2"], ["privacy.delta", "(0, 1)"]),
        (["privacy.noise_multiplier=1.0"], ["exactly one of privacy.noise_multiplier and privacy.target_epsilon"]),
        (["privacy.target_epsilon=50"], ["exceeds the lifetime budget"]),
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
