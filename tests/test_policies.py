"""Region policy files: complete or refused on every path, and the transfer rules they express.

Each broken file is tried through every loader a region's rules pass through (the node's
`load_region_file`, `fedsov policy validate`, and `load_config` behind `simulate` and `dry-run`):
all must refuse it with the same explanation; none may fill a missing rule.
"""

import datetime
import json
import shutil

import pytest
from omegaconf import OmegaConf

from common.cli import main
from common.config import default_config_dir, load_config, load_region_file
from common.errors import ConfigError
from common.policy import (
    SafeguardKind,
    TransferSafeguard,
    coordinator_allowed,
    explain_policy,
    transfer_rules,
    transfer_safeguard,
)

REGIONS = default_config_dir() / "regions"
PRESETS = sorted(p.stem for p in REGIONS.glob("*.yaml"))
ON = datetime.date(2026, 11, 30)


def eu_text() -> str:
    return (REGIONS / "eu.yaml").read_text()


def without_block(text: str, header: str) -> str:
    """`text` without the line `header` and every more-indented line under it."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n").split("#")[0].rstrip() == header.rstrip())
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (len(lines[end]) - len(lines[end].lstrip()) > indent or not lines[end].strip()):
        end += 1
    return "".join(lines[:start] + lines[end:])


def replace_line(text: str, key: str, value: str) -> str:
    """Set the first `key:` line to `value` (keeping its indentation)."""
    lines = text.splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{key}:"))
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = f"{indent}{key}: {value}\n"
    return "".join(lines)


def edited(changes: dict) -> str:
    """eu.yaml with dotted policy keys set through OmegaConf (as a region's administrator would)."""
    cfg = OmegaConf.load(REGIONS / "eu.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return "# @package regions.eu\n" + OmegaConf.to_yaml(cfg)


SAFEGUARD = {
    "kind": "standard_contract",
    "reference": "SCC 2021/914 module 2, signed 2026-03-01",
    "jurisdictions": ["SG"],
    "recorded_on": "2026-03-01",
    "expires": None,
}

BROKEN = {
    "missing section privacy": (
        lambda: without_block(eu_text(), "  privacy:"),
        [
            "policy.privacy (a section; it must set require_dp, epsilon_budget, delta, min_noise_multiplier",
            "nothing is filled with a default",
            "region-template.yaml",
        ],
    ),
    "missing section data_use": (
        lambda: without_block(eu_text(), "  data_use:"),
        ["policy.data_use (a section; it must set require_consent, excluded_special_categories"],
    ),
    "missing section transfers": (
        lambda: without_block(eu_text(), "  transfers:"),
        ["policy.transfers (a section", "adequacy_decisions", "prohibited_coordinator_jurisdictions"],
    ),
    "missing policy": (
        lambda: without_block(eu_text(), "policy:"),
        ["policy (a section; it must set law, residency, transfers, privacy, data_use, retention"],
    ),
    "missing field": (
        lambda: without_block(eu_text(), "    min_noise_multiplier: 0.8"),
        ["1 required key(s) missing", "policy.privacy.min_noise_multiplier"],
    ),
    "missing fields listed together": (
        lambda: without_block(without_block(eu_text(), "    scrub_pii: true"), "    volume_rules: null"),
        ["2 required key(s)", "policy.data_use.scrub_pii", "policy.transfers.volume_rules"],
    ),
    "missing field of a list entry": (
        lambda: without_block(eu_text(), "        scope: all transfers to Andorra"),
        ["policy.transfers.adequacy_decisions[0].scope"],
    ),
    "missing description field": (
        lambda: without_block(eu_text(), "jurisdiction: EU"),
        ["required key(s) missing", "jurisdiction"],
    ),
    "value left unset": (
        lambda: replace_line(eu_text(), "epsilon_budget", "???"),
        ["policy.privacy.epsilon_budget", "unset (???)"],
    ),
    "section left empty": (
        lambda: without_block(eu_text(), "  privacy:").replace("  data_use:\n", "  privacy:\n  data_use:\n", 1),
        ["'policy.privacy' is empty or null", "it must set require_dp", "Set it in eu.yaml"],
    ),
    "not YAML": (
        lambda: eu_text().replace("  retention:\n", "  retention:\n  retention_note: x: y\n", 1),
        ["eu.yaml", "not valid YAML", "mapping values are not allowed here"],
    ),
    "empty file": (lambda: "", ["is empty", "region-template.yaml"]),
    "only comments": (lambda: "# @package regions.eu\n# GDPR\n", ["is empty", "region 'eu'"]),
    "not a mapping": (lambda: "# @package regions.eu\n- eu\n", ["is empty (or not a mapping)"]),
    "wrong region name": (
        lambda: eu_text().replace("name: eu\n", "name: us\n", 1),
        ["name = 'us'", "the file is eu.yaml", "Set name: eu"],
    ),
    "another region's rules copied in": (
        lambda: (REGIONS / "us.yaml").read_text(),
        ["declares region 'us'", "must hold the rules of region 'eu'", "belong in us.yaml"],
    ),
    "package line missing": (lambda: eu_text().split("\n", 1)[1], ["start with '# @package regions.eu'"]),
    "the template unfilled": (
        lambda: (default_config_dir() / "region-template.yaml").read_text(),
        ["is still the template"],
    ),
    "wrong type: count": (
        lambda: replace_line(eu_text(), "min_cohort", "three"),
        ["policy.transfers.min_cohort", "three"],
    ),
    "wrong type: switch": (
        lambda: replace_line(eu_text(), "require_dp", "maybe"),
        ["policy.privacy.require_dp", "maybe"],
    ),
    "wrong type: list for a number": (
        lambda: replace_line(eu_text(), "epsilon_budget", "[10]"),
        ["policy.privacy.epsilon_budget"],
    ),
    "wrong type: null for a required value": (
        lambda: replace_line(eu_text(), "min_cohort", "null"),
        ["policy.transfers.min_cohort"],
    ),
    "wrong enum": (lambda: replace_line(eu_text(), "unit", "household"), ["policy.privacy.unit", "record, user"]),
    "wrong safeguard kind": (
        lambda: edited({"policy.transfers.safeguards": [{**SAFEGUARD, "kind": "handshake"}]}),
        ["policy.transfers.safeguards[0].kind", "'handshake'", "standard_contract", "security_assessment"],
    ),
    "wrong type in a list entry": (
        lambda: eu_text().replace("        expires: null\n", "        expires: [2030]\n", 1),
        ["policy.transfers.adequacy_decisions[0].expires"],
    ),
    "not a date": (
        lambda: eu_text().replace("adopted: 2010-10-19", "adopted: last autumn", 1),
        ["adequacy_decisions[0].adopted", "is not a date", "YYYY-MM-DD"],
    ),
    "expiry before adoption": (
        lambda: edited({"policy.transfers.safeguards": [{**SAFEGUARD, "expires": "2025-01-01"}]}),
        ["safeguards[0].expires", "is not after recorded_on"],
    ),
    "unknown key": (
        lambda: replace_line(eu_text(), "min_cohort", "3\n    min_cohrt: 3"),
        ["Did you mean 'min_cohort'"],
    ),
    "unknown key in a list entry": (
        lambda: eu_text().replace(
            "        scope: all transfers to Andorra\n",
            "        scope: all transfers to Andorra\n        scopes: x\n",
            1,
        ),
        [
            "Unknown config key 'policy.transfers.adequacy_decisions[0].scopes'",
            "Did you mean 'scope'",
            "requires_attestation",
        ],
    ),
    "unknown section": (
        lambda: eu_text().replace("policy:\n", "policy:\n  residence: {}\n", 1),
        ["Unknown config key", "residence", "Did you mean 'residency'"],
    ),
    "raw export": (lambda: replace_line(eu_text(), "raw_data_export", "true"), ["raw data export is never possible"]),
    "impossible delta": (lambda: replace_line(eu_text(), "delta", "1.5"), ["policy.privacy.delta", "[1e-10, 1)"]),
    "nowhere to send updates": (
        lambda: replace_line(eu_text(), "allowed_coordinator_jurisdictions", "[]"),
        ["no coordinator could ever receive updates"],
    ),
    "Norway unquoted": (
        lambda: eu_text().replace('[EU, IS, LI, "NO"]', "[EU, IS, LI, NO]", 1),
        ["is a YAML boolean", "Quote the code"],
    ),
    "not a jurisdiction code": (
        lambda: replace_line(eu_text(), "allowed_coordinator_jurisdictions", "[eu]"),
        ["'eu'", "is not a jurisdiction code"],
    ),
    "prohibited list without its basis": (
        lambda: replace_line(eu_text(), "prohibited_coordinator_jurisdictions", "[RU]"),
        ["prohibition_basis", "must cite the rule"],
    ),
    "exemption from nothing": (
        lambda: edited(
            {
                "policy.transfers.prohibition_exemptions": [
                    {"jurisdiction": "CN", "basis": "x", "reference": "y", "reviewed_on": "2026-01-01", "expires": None}
                ]
            }
        ),
        ["prohibition_exemptions[0].jurisdiction", "not prohibited"],
    ),
    "unbounded volume band first": (
        lambda: edited(
            {
                "policy.transfers.volume_rules": {
                    "counting_period": "calendar_year",
                    "domestic_jurisdictions": ["EU"],
                    "required_regardless_of_volume": [],
                    "bands": [{"people_below": 10, "sensitive_people_below": 1, "requires": []}],
                }
            }
        ),
        ["volume_rules.bands[0]", "the last band must have no bounds"],
    ),
    "own records not allowed": (
        lambda: replace_line(eu_text(), "allowed_region_tags", "[us]"),
        ["allowed_region_tags", "own tag 'eu'"],
    ),
    "scrub entities listed but scrubbing off": (
        lambda: replace_line(eu_text(), "scrub_pii", "false"),
        ["scrub_pii is false"],
    ),
}


@pytest.fixture
def configs(tmp_path, monkeypatch):
    target = tmp_path / "configs"
    shutil.copytree(default_config_dir(), target)
    monkeypatch.setenv("FEDSOV_CONFIG_DIR", str(target))
    return target


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_policy_file_is_refused_on_every_path(case, configs, capsys):
    make, fragments = BROKEN[case]
    path = configs / "regions" / "eu.yaml"
    path.write_text(make())
    with pytest.raises(ConfigError) as node_err:
        load_region_file(path)  # the node's loader (client/node.py, client/settings.py)
    with pytest.raises(ConfigError) as config_err:
        load_config(["regions=[eu,us]"], config_dir=configs)  # simulate, dry-run, node start's config
    assert main(["--config-dir", str(configs), "policy", "validate", str(path)]) == 2
    validate_out = capsys.readouterr().out
    assert main(["--config-dir", str(configs), "policy", "dry-run", "regions=[eu,us]"]) == 2
    dry_err = capsys.readouterr().err
    for message in (str(node_err.value), str(config_err.value), validate_out, dry_err):
        for fragment in fragments:
            assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
        assert "to the command line" not in message  # the fix is in the file, not in an override


def test_every_preset_composes_and_generates_its_synthetic_data():
    from common.data.synthetic import generate_region_records

    cfg = load_config([f"regions=[{','.join(PRESETS)}]"])
    assert list(cfg.regions) == PRESETS
    for name, region in cfg.regions.items():
        assert region.policy == load_region_file(REGIONS / f"{name}.yaml").policy
        records = generate_region_records(name, region.locales, seed=0, num_users=3)
        assert records and all(r.region == name for r in records)


def test_an_override_cannot_add_a_region_without_its_file():
    with pytest.raises(ConfigError, match="add region.* us that regions=\\[eu\\] does not select"):
        load_config(["regions=[eu]", "+regions.us.clients=3"])
    with pytest.raises(ConfigError, match="region 'mars', which has no file"):
        load_config(["regions.mars.clients=2"])


# -- dry-run ----------------------------------------------------------------------------------


def test_dry_run_exits_non_zero_when_every_region_refuses(capsys):
    assert main(["policy", "dry-run", "regions=[eu,cn]", "federation.coordinator_jurisdiction=XX"]) == 1
    out = capsys.readouterr().out
    assert "No region accepts this plan (refused by eu, cn): nothing would train." in out
    assert main(["policy", "dry-run", "regions=[eu,us]"]) == 0
    assert "No region accepts" not in capsys.readouterr().out


def test_dry_run_refuses_data_paths_that_do_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert (
        main(
            [
                "policy",
                "dry-run",
                "regions=[us]",
                "regions.us.clients=2",
                "regions.us.data.source=files",
                f"regions.us.data.paths=[{missing}]",
            ]
        )
        == 1
    )
    assert f"data path {missing} (regions.us.data.paths) does not exist" in capsys.readouterr().out


def test_dry_run_refuses_a_coordinator_in_a_country_of_concern_for_us_data(capsys):
    assert main(["policy", "dry-run", "regions=[us]", "federation.coordinator_jurisdiction=CN"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("us"))
    assert "REFUSE" in line and "prohibited by 28 CFR Part 202" in line


# -- transfers --------------------------------------------------------------------------------


def policy(region: str, **transfer_changes):
    loaded = load_region_file(REGIONS / f"{region}.yaml").policy
    for key, value in transfer_changes.items():
        setattr(loaded.transfers, key, value)
    return loaded


@pytest.mark.parametrize("jurisdiction", ["CN", "HK", "MO", "CN-HK", "CU", "IR", "KP", "RU", "VE"])
def test_the_us_preset_refuses_countries_of_concern(jurisdiction):
    ok, why = coordinator_allowed(policy("us"), jurisdiction, on=ON)
    assert not ok and "28 CFR Part 202" in why and "no current reviewed exemption" in why


def test_a_reviewed_exemption_lifts_a_prohibition_only_while_it_lasts():
    from common.policy import ProhibitionExemption

    exemption = ProhibitionExemption(
        jurisdiction="CN",
        basis="28 CFR 202.802 specific license",
        reference="NSD licence 2026-17",
        reviewed_on="2026-06-01",
        expires="2027-06-01",
    )
    us = policy("us", prohibition_exemptions=[exemption])
    ok, why = coordinator_allowed(us, "CN", on=ON)
    assert ok and "28 CFR 202.802 specific license" in why
    assert not coordinator_allowed(us, "RU", on=ON)[0]  # the exemption names CN only
    assert not coordinator_allowed(us, "CN-HK", on=ON)[0]  # and not its subdivisions
    assert not coordinator_allowed(us, "CN", on=datetime.date(2027, 6, 1))[0]
    assert coordinator_allowed(us, "DE", on=ON)[0]  # everywhere else stays allowed


@pytest.mark.parametrize(
    "jurisdiction, allowed",
    [
        ("EU", True),
        ("NO", True),
        ("CH", True),
        ("JP", True),
        ("KR", True),
        ("BR", True),
        ("GB", True),
        ("US", False),
        ("CA", False),
        ("SG", False),
        ("CN", False),
    ],
)
def test_gdpr_adequacy_decisions(jurisdiction, allowed):
    ok, why = coordinator_allowed(policy("eu"), jurisdiction, on=ON)
    assert ok is allowed, why


def test_the_dpf_decision_needs_the_coordinators_current_certification():
    from common.policy import CoordinatorAttestation

    ok, why = coordinator_allowed(policy("eu"), "US", on=ON)
    assert not ok and "'EU-US DPF'" in why and "no current coordinator attestation" in why
    dpf = CoordinatorAttestation(
        scheme="EU-US DPF",
        organisation="Example Coordinator Inc.",
        reference="DPF List entry, checked",
        verified_on="2026-10-01",
        expires="2027-10-01",
    )
    certified = policy("eu", coordinator_attestations=[dpf])
    ok, why = coordinator_allowed(certified, "US", on=ON)
    assert ok and "(EU) 2023/1795" in why
    assert not coordinator_allowed(certified, "US", on=datetime.date(2027, 10, 2))[0]


def test_an_adequacy_decision_lapses_on_its_expiry():
    assert coordinator_allowed(policy("eu"), "GB", on=datetime.date(2031, 12, 26))[0]
    ok, why = coordinator_allowed(policy("eu"), "GB", on=datetime.date(2031, 12, 27))
    assert not ok and "not in force on 2031-12-27" in why


def test_a_recorded_safeguard_allows_its_destinations():
    safeguard = TransferSafeguard(
        kind=SafeguardKind.standard_contract,
        reference="SCC module 2, 2026-03-01",
        jurisdictions=["SG"],
        recorded_on="2026-03-01",
        expires=None,
    )
    eu = policy("eu", safeguards=[safeguard])
    ok, why = coordinator_allowed(eu, "SG", on=ON)
    assert ok and "standard_contract SCC module 2" in why
    assert not coordinator_allowed(eu, "SG", on=datetime.date(2026, 2, 28))[0]  # not yet recorded then


# -- PIPL volume bands ------------------------------------------------------------------------


def cn_with(*kinds: str, expires: str | None = None):
    return policy(
        "cn",
        safeguards=[
            TransferSafeguard(
                kind=SafeguardKind(k),
                reference=f"{k}-ref",
                jurisdictions=["SG"],
                recorded_on="2026-01-05",
                expires=expires,
            )
            for k in kinds
        ],
    )


@pytest.mark.parametrize(
    "people, sensitive, band, required",
    [
        (0, 0, 0, ()),
        (99_999, 0, 0, ()),
        (100_000, 0, 1, ("standard_contract", "certification")),
        (50_000, 1, 1, ("standard_contract", "certification")),
        (999_999, 9_999, 1, ("standard_contract", "certification")),
        (1_000_000, 0, 2, ("security_assessment",)),
        (10, 10_000, 2, ("security_assessment",)),
    ],
)
def test_pipl_volume_bands(people, sensitive, band, required):
    decision = transfer_safeguard(cn_with(), "SG", people, sensitive, on=ON)
    assert decision.cross_border and decision.band == band and decision.required == required
    assert decision.allowed is (not required) and decision.recorded is None
    if required:
        assert "no current one covering SG is recorded in transfers.safeguards" in decision.reason


def test_a_pipl_safeguard_counts_only_in_its_band_and_while_valid():
    contract = cn_with("standard_contract")
    middle = transfer_safeguard(contract, "SG", 200_000, 0, on=ON)
    assert middle.allowed and middle.recorded == "standard_contract standard_contract-ref"
    assert not transfer_safeguard(contract, "SG", 2_000_000, 0, on=ON).allowed  # a contract is not an assessment
    assert not transfer_safeguard(contract, "JP", 200_000, 0, on=ON).allowed  # it covers SG only
    assessed = cn_with("security_assessment", expires="2029-01-05")
    assert transfer_safeguard(assessed, "SG", 2_000_000, 0, on=ON).allowed
    assert not transfer_safeguard(assessed, "SG", 2_000_000, 0, on=datetime.date(2029, 1, 5)).allowed


def test_pipl_domestic_regardless_and_no_rules():
    cn = cn_with()
    home = transfer_safeguard(cn, "CN", 5_000_000, 50_000, on=ON)
    assert home.allowed and not home.cross_border
    assert transfer_safeguard(cn, "HK", 10, 0, on=ON).cross_border  # Hong Kong is abroad under the PIPL
    cn.transfers.volume_rules.required_regardless_of_volume = [SafeguardKind.security_assessment]
    tiny = transfer_safeguard(cn, "SG", 10, 0, on=ON)
    assert not tiny.allowed and tiny.required == ("security_assessment",)
    no_rules = transfer_safeguard(policy("eu"), "SG", 10**7, 10**6, on=ON)
    assert no_rules.allowed and no_rules.band is None and "sets no volume rules" in no_rules.reason
    assert json.loads(json.dumps(tiny.as_dict()))["required"] == ["security_assessment"]
    with pytest.raises(ValueError, match="counts must be >= 0"):
        transfer_safeguard(cn, "SG", -1, 0)


# -- explain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("region", PRESETS)
def test_explain_reads_as_a_privacy_officer_expects(region):
    loaded = load_region_file(REGIONS / f"{region}.yaml")
    p = loaded.policy
    text = explain_policy(loaded.name, loaded.jurisdiction, p, on=ON)
    sections = [line.split(":")[0] for line in text.splitlines() if line.startswith("- ")]
    assert sections == ["- Data", "- Use", "- Transfers", "- Privacy", "- Retention", "- Erasure"]
    retention = p.retention
    assert (
        f"deleted once {retention.checkpoint_days} days old" in text
        and f"ledger backups once {retention.ledger_backup_days} days old" in text
        and "live privacy ledger and audit logs are never deleted" in text
        and "not yet" not in text
    )
    assert text.startswith(f"Region {region} ({loaded.jurisdiction}), rules under {p.law}:")
    assert text.rstrip().endswith(
        "not legal advice: your data protection officer and counsel must review every "
        "value before real personal data is used."
    )
    assert f"epsilon {p.privacy.epsilon_budget:g} at delta {p.privacy.delta:g}" in text
    for decision in p.transfers.adequacy_decisions:
        assert f"in {decision.jurisdiction} under an adequacy finding: {decision.decision}, {decision.adopted}" in text
    for listed in p.transfers.prohibited_coordinator_jurisdictions:
        assert listed in text.split("never in ", 1)[1]
    rules = transfer_rules(p, on=ON)
    assert json.loads(json.dumps(rules))["checked_on"] == "2026-11-30"


def test_explain_shows_the_pipl_bands_and_the_us_prohibition():
    cn = load_region_file(REGIONS / "cn.yaml")
    text = explain_policy("cn", "CN", cn.policy, on=ON)
    assert "fewer than 100,000 people and no sensitive data: no safeguard" in text
    assert (
        "fewer than 1,000,000 people and fewer than 10,000 with sensitive data: standard contract or "
        "certification" in text
    )
    assert "any larger volume: security assessment" in text
    assert "refuses a coordinator whose required safeguard is not recorded" in text
    us = load_region_file(REGIONS / "us.yaml")
    text = explain_policy("us", "US-CA", us.policy, on=ON)
    assert "anywhere, except CN, HK, MO, CU, IR, KP, RU, VE" in text
    assert "prohibited by 28 CFR Part 202 (countries of concern)" in text and "no reviewed exemption" in text
