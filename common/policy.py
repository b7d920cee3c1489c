"""Region policies: each region's compliance rules as validated configuration.

A region's node loads its policy from its own file and enforces it on every decision; the
coordinator only plans around its copy. Every field is required: the dataclasses below carry
no defaults, so a rule missing from a file is an error, never a silently applied default.
Checks here are plain functions so every enforcement point can be tested without a federation.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, NoReturn

from common.errors import ConfigError, PolicyViolation, ResidencyViolation

__all__ = ["PolicyViolation", "ResidencyViolation"]  # re-exported beside the checks that raise them

ANY = "*"
# ISO 3166-1 alpha-2 (HK and MO are their own codes), "EU" for the Union, ISO 3166-2 subdivisions (US-CA).
JURISDICTION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
DISCLAIMER = (
    "These are engineering defaults, not legal advice: your data protection officer and counsel must "
    "review every value before real personal data is used."
)


class PrivacyUnitKind(str, Enum):
    record = "record"
    user = "user"


class SafeguardKind(str, Enum):
    """Transfer mechanisms a policy can record for a destination."""

    standard_contract = "standard_contract"  # EU SCCs, UK IDTA, CN standard contract (filed), BR SCCs
    binding_corporate_rules = "binding_corporate_rules"
    certification = "certification"  # CN PI protection certification, APEC CBPR, KR PIPC-notified certification
    security_assessment = "security_assessment"  # CN CAC security assessment
    impact_assessment = "impact_assessment"  # Quebec s. 17 assessment before communicating outside Quebec


class CountingPeriod(str, Enum):
    calendar_year = "calendar_year"  # cumulative since 1 January (CN 2024 Provisions)
    trailing_12_months = "trailing_12_months"


@dataclass
class ResidencyPolicy:
    # Values of the records' `region` field this node may train on.
    allowed_region_tags: list[str]
    # Absolute path prefixes the node may read training data from ([] = only its configured paths).
    storage_roots: list[str]
    # Must be false: fedsov has no way to export raw records, whatever a file says.
    raw_data_export: bool


@dataclass
class AdequacyDecision:
    """A finding that a destination protects personal data well enough for transfers without safeguards."""

    jurisdiction: str
    decision: str  # the instrument, e.g. "Commission Implementing Decision (EU) 2019/419"
    adopted: str  # ISO date
    expires: str | None  # ISO date it lapses unless renewed; null when it has no sunset clause
    # A status the recipient organisation must hold for the decision to cover it (e.g. "EU-US DPF"),
    # matched against `coordinator_attestations[].scheme`; null when it covers every recipient.
    requires_attestation: str | None
    scope: str  # what the decision covers, in words


@dataclass
class CoordinatorAttestation:
    """A status of the coordinator's organisation that someone verified (e.g. its DPF certification)."""

    scheme: str
    organisation: str
    reference: str  # where it was verified, e.g. the organisation's Data Privacy Framework List entry
    verified_on: str  # ISO date
    expires: str | None  # ISO date (e.g. the DPF annual re-certification); null if none


@dataclass
class TransferSafeguard:
    """A transfer mechanism the region has in place for some destinations."""

    kind: SafeguardKind
    reference: str  # e.g. the CAC filing number, the signed SCC module and date
    jurisdictions: list[str]
    recorded_on: str  # ISO date
    expires: str | None  # ISO date (a CAC assessment or certification lasts 3 years); null if none


@dataclass
class ProhibitionExemption:
    """A reviewed basis for sending updates to an otherwise prohibited jurisdiction (e.g. a DOJ licence)."""

    jurisdiction: str
    basis: str  # the rule relied on, e.g. "28 CFR 202.802 specific license"
    reference: str
    reviewed_on: str  # ISO date
    expires: str | None


@dataclass
class VolumeBand:
    # The band applies when both counts are below these bounds; null = no bound.
    people_below: int | None
    sensitive_people_below: int | None
    # Safeguard kinds of which one must be recorded for the destination; [] = none is needed.
    requires: list[SafeguardKind]


@dataclass
class VolumeRules:
    """Safeguards that depend on how many people's data a transfer covers (e.g. China's 2024 Provisions)."""

    counting_period: CountingPeriod
    # Destinations inside these are not cross-border transfers and need no band.
    domestic_jurisdictions: list[str]
    # Ordered from the smallest volumes; the last band must have no bounds, so every count falls in one.
    bands: list[VolumeBand]
    # Kinds required whatever the volume (e.g. a CIIO, or important data); [] = the bands decide.
    required_regardless_of_volume: list[SafeguardKind]


@dataclass
class TransferPolicy:
    # Jurisdictions a coordinator may sit in to receive this region's updates ("*" = any not prohibited).
    allowed_coordinator_jurisdictions: list[str]
    adequacy_decisions: list[AdequacyDecision]
    coordinator_attestations: list[CoordinatorAttestation]
    safeguards: list[TransferSafeguard]
    # Refused whatever else allows them; "CN" also covers its subdivisions ("CN-HK").
    prohibited_coordinator_jurisdictions: list[str]
    # The rule behind that list, cited in every refusal; null exactly when the list is empty.
    prohibition_basis: str | None
    prohibition_exemptions: list[ProhibitionExemption]
    volume_rules: VolumeRules | None
    require_secure_aggregation: bool
    # Fewest clients whose updates may be aggregated together with this region's.
    min_cohort: int


@dataclass
class PrivacyPolicy:
    require_dp: bool
    epsilon_budget: float
    delta: float
    min_noise_multiplier: float
    max_grad_norm: float
    unit: PrivacyUnitKind


@dataclass
class DataUsePolicy:
    require_consent: bool
    # Records carrying any of these tags (e.g. special:health) are excluded and counted.
    excluded_special_categories: list[str]
    # Records with any of these fields set are excluded and counted.
    excluded_fields: list[str]
    scrub_pii: bool
    scrub_entities: list[str]


@dataclass
class RetentionPolicy:
    checkpoint_days: int
    ledger_backup_days: int
    # Where a model holding this region's contribution may be deployed or exported ("*" = anywhere).
    allowed_deployment_jurisdictions: list[str]


@dataclass
class RegionPolicy:
    law: str
    residency: ResidencyPolicy
    transfers: TransferPolicy
    privacy: PrivacyPolicy
    data_use: DataUsePolicy
    retention: RetentionPolicy


def policy_hash(policy: RegionPolicy) -> str:
    """A stable fingerprint of the rules (not the file's comments or layout)."""
    return hashlib.sha256(json.dumps(policy_dict(policy), sort_keys=True).encode()).hexdigest()


def policy_dict(policy: RegionPolicy) -> dict:
    return json.loads(json.dumps(asdict(policy), default=lambda e: e.value))


# -- validation ---------------------------------------------------------------------------------


# Raises the policy's ConfigError naming (key, value, rule, fix).
Fail = Callable[[str, Any, str, str], NoReturn]


def validate_policy(policy: RegionPolicy, where: str) -> None:
    """Impossible values are errors naming the key, the value, the rule and the fix."""
    from common.pii import SUPPORTED_ENTITIES

    def fail(key: str, value: Any, rule: str, fix: str) -> NoReturn:
        raise ConfigError(f"Policy key '{where}.{key}' = {value!r}: {rule}. {fix}")

    if not policy.law.strip():
        fail("law", policy.law, "must name the law", "E.g. GDPR; it appears in every refusal and report.")
    r = policy.residency
    if r.raw_data_export:
        fail(
            "residency.raw_data_export",
            True,
            "raw data export is never possible in fedsov",
            "Set it to false; only DP adapter updates ever leave a node.",
        )
    if not r.allowed_region_tags:
        fail(
            "residency.allowed_region_tags",
            [],
            "a node must be allowed at least its own region's records",
            "List the region tags, e.g. [eu].",
        )
    _validate_transfers(policy.transfers, fail)
    p = policy.privacy
    if not p.epsilon_budget > 0 or math.isinf(p.epsilon_budget):
        fail("privacy.epsilon_budget", p.epsilon_budget, "must be a finite number above 0", "Use e.g. 10.")
    if not 1e-10 <= p.delta < 1:  # below 1e-10 the PLD accountant's truncated tails dominate (MIN_DELTA)
        fail("privacy.delta", p.delta, "must be in [1e-10, 1)", "Use e.g. 1e-5 (and at most 1/N).")
    if p.min_noise_multiplier < 0:
        fail("privacy.min_noise_multiplier", p.min_noise_multiplier, "must be >= 0", "Use e.g. 0.5.")
    if not p.max_grad_norm > 0:
        fail("privacy.max_grad_norm", p.max_grad_norm, "must be above 0", "Use e.g. 1.0.")
    d = policy.data_use
    unknown = sorted(set(d.scrub_entities) - set(SUPPORTED_ENTITIES))
    if unknown:
        fail(
            "data_use.scrub_entities", unknown, "unknown entity types", f"Use some of: {', '.join(SUPPORTED_ENTITIES)}."
        )
    if d.scrub_pii and not d.scrub_entities:
        fail(
            "data_use.scrub_entities",
            [],
            "scrub_pii is on but no entity types are listed",
            "List e.g. [EMAIL_ADDRESS].",
        )
    if d.scrub_entities and not d.scrub_pii:
        fail(
            "data_use.scrub_entities",
            d.scrub_entities,
            "entities are listed but scrub_pii is false, so none would be scrubbed",
            "Set scrub_pii: true, or scrub_entities: [] if the region keeps identifiers.",
        )
    k = policy.retention
    for key, days in (
        ("retention.checkpoint_days", k.checkpoint_days),
        ("retention.ledger_backup_days", k.ledger_backup_days),
    ):
        if days < 1:
            fail(key, days, "must be at least 1 day", "Use e.g. 30.")
    if not k.allowed_deployment_jurisdictions:
        fail(
            "retention.allowed_deployment_jurisdictions",
            [],
            "the model could never be used anywhere",
            'List jurisdictions, or ["*"] for any.',
        )
    _check_codes("retention.allowed_deployment_jurisdictions", k.allowed_deployment_jurisdictions, fail)


def _validate_transfers(t: TransferPolicy, fail: Fail) -> None:
    key = "transfers"
    if not t.allowed_coordinator_jurisdictions:
        fail(
            f"{key}.allowed_coordinator_jurisdictions",
            [],
            "no coordinator could ever receive updates",
            "List the region's own jurisdiction at least, e.g. [EU].",
        )
    _check_codes(f"{key}.allowed_coordinator_jurisdictions", t.allowed_coordinator_jurisdictions, fail)
    for i, a in enumerate(t.adequacy_decisions):
        at = f"{key}.adequacy_decisions[{i}]"
        _check_codes(f"{at}.jurisdiction", [a.jurisdiction], fail, wildcard=False)
        for field_name in ("decision", "scope"):
            if not getattr(a, field_name).strip():
                fail(
                    f"{at}.{field_name}",
                    getattr(a, field_name),
                    "must not be empty",
                    "Name the instrument and what it covers, as published.",
                )
        _check_period(at, "adopted", a.adopted, a.expires, fail)
        if a.requires_attestation is not None and not a.requires_attestation.strip():
            fail(
                f"{at}.requires_attestation",
                a.requires_attestation,
                "must be a scheme name or null",
                'E.g. "EU-US DPF", or null when the decision covers every recipient.',
            )
    for i, c in enumerate(t.coordinator_attestations):
        at = f"{key}.coordinator_attestations[{i}]"
        for field_name in ("scheme", "organisation", "reference"):
            if not getattr(c, field_name).strip():
                fail(
                    f"{at}.{field_name}",
                    getattr(c, field_name),
                    "must not be empty",
                    "Record who was verified, under which scheme and where.",
                )
        _check_period(at, "verified_on", c.verified_on, c.expires, fail)
    for i, s in enumerate(t.safeguards):
        at = f"{key}.safeguards[{i}]"
        if not s.reference.strip():
            fail(
                f"{at}.reference",
                s.reference,
                "must not be empty",
                "Record the contract, filing or assessment reference.",
            )
        if not s.jurisdictions:
            fail(f"{at}.jurisdictions", [], "a safeguard must cover at least one destination", "List e.g. [SG].")
        _check_codes(f"{at}.jurisdictions", s.jurisdictions, fail, wildcard=False)
        _check_period(at, "recorded_on", s.recorded_on, s.expires, fail)
    _check_codes(
        f"{key}.prohibited_coordinator_jurisdictions", t.prohibited_coordinator_jurisdictions, fail, wildcard=False
    )
    if bool(t.prohibited_coordinator_jurisdictions) != bool((t.prohibition_basis or "").strip()):
        fail(
            f"{key}.prohibition_basis",
            t.prohibition_basis,
            "must cite the rule behind the prohibited list, and only when there is one",
            'E.g. "28 CFR Part 202 (countries of concern)" with a list, null without.',
        )
    for i, e in enumerate(t.prohibition_exemptions):
        at = f"{key}.prohibition_exemptions[{i}]"
        if not any(_within(e.jurisdiction, p) for p in t.prohibited_coordinator_jurisdictions):
            fail(
                f"{at}.jurisdiction",
                e.jurisdiction,
                "exempts a jurisdiction that is not prohibited",
                "Remove the exemption, or list the jurisdiction in prohibited_coordinator_jurisdictions.",
            )
        for field_name in ("basis", "reference"):
            if not getattr(e, field_name).strip():
                fail(
                    f"{at}.{field_name}",
                    getattr(e, field_name),
                    "must not be empty",
                    "Record the rule relied on and the licence or review reference.",
                )
        _check_period(at, "reviewed_on", e.reviewed_on, e.expires, fail)
    if t.volume_rules is not None:
        _validate_volume_rules(t.volume_rules, f"{key}.volume_rules", fail)
    if t.min_cohort < 1:
        fail(f"{key}.min_cohort", t.min_cohort, "must be at least 1", "Use e.g. 3.")


def _validate_volume_rules(v: VolumeRules, key: str, fail: Fail) -> None:
    if not v.domestic_jurisdictions:
        fail(
            f"{key}.domestic_jurisdictions",
            [],
            "every destination would count as cross-border",
            "List the region's own jurisdiction, e.g. [CN].",
        )
    _check_codes(f"{key}.domestic_jurisdictions", v.domestic_jurisdictions, fail, wildcard=False)
    if not v.bands:
        fail(f"{key}.bands", [], "at least one band is needed", "End with a band with no bounds (both null).")
    last = v.bands[-1]
    if last.people_below is not None or last.sensitive_people_below is not None:
        fail(
            f"{key}.bands[{len(v.bands) - 1}]",
            asdict(last),
            "the last band must have no bounds, so every count falls in a band",
            "Set its people_below and sensitive_people_below to null.",
        )
    previous = (0, 0)
    for i, band in enumerate(v.bands[:-1]):
        people, sensitive = band.people_below, band.sensitive_people_below
        if people is None or sensitive is None or people < 1 or sensitive < 1:
            fail(
                f"{key}.bands[{i}]",
                asdict(band),
                "only the last band may be unbounded, and bounds are at least 1",
                "Give both bounds as counts (sensitive_people_below: 1 means no sensitive data).",
            )
        bounds = (people, sensitive)
        if bounds[0] < previous[0] or bounds[1] < previous[1] or bounds == previous:
            fail(
                f"{key}.bands[{i}]",
                asdict(band),
                "bands must grow from the smallest volumes",
                "Order the bands by increasing bounds.",
            )
        previous = bounds


def _check_codes(key: str, codes: list[str], fail: Fail, wildcard: bool = True) -> None:
    for code in codes:
        if code == ANY and wildcard:
            continue
        if code in ("True", "False"):  # YAML 1.1 reads NO (Norway), YES, ON, OFF unquoted as booleans
            fail(key, code, "is a YAML boolean, not a jurisdiction code", 'Quote the code, e.g. "NO" for Norway.')
        if not JURISDICTION.match(code):
            fail(
                key,
                code,
                "is not a jurisdiction code",
                "Use ISO 3166 codes such as GB, HK, US-CA, or EU" + (', or "*" for any' if wildcard else "") + ".",
            )


def _check_period(at: str, start_key: str, start: str, expires: str | None, fail: Fail) -> None:
    begun = _date(start)
    if begun is None:
        fail(f"{at}.{start_key}", start, "is not a date", "Write it as YYYY-MM-DD.")
    if expires is not None:
        ends = _date(expires)
        if ends is None:
            fail(f"{at}.expires", expires, "is not a date", "Write it as YYYY-MM-DD, or null if it does not expire.")
        if ends <= begun:
            fail(f"{at}.expires", expires, f"is not after {start_key} {start}", "Check both dates.")


def _date(text: str) -> datetime.date | None:
    try:
        return datetime.date.fromisoformat(str(text))
    except ValueError:
        return None


# -- decisions ----------------------------------------------------------------------------------


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.timezone.utc).date()


def _in_force(start: str, expires: str | None, on: datetime.date) -> bool:
    # Both dates were checked when the policy was loaded (_check_period).
    begun = datetime.date.fromisoformat(str(start))
    return begun <= on and (expires is None or on < datetime.date.fromisoformat(str(expires)))


def _within(jurisdiction: str, listed: str) -> bool:
    """A prohibition of CN also covers CN-HK: prohibitions match broadly, permissions exactly."""
    return jurisdiction == listed or jurisdiction.startswith(listed + "-")


def _allows(allowed: list[str], jurisdiction: str) -> bool:
    return ANY in allowed or jurisdiction in allowed


def _prohibition(
    t: TransferPolicy, jurisdiction: str, on: datetime.date
) -> tuple[str | None, ProhibitionExemption | None]:
    """The prohibited entry that covers `jurisdiction`, and the exemption that lifts it (if any)."""
    listed = next((p for p in t.prohibited_coordinator_jurisdictions if _within(jurisdiction, p)), None)
    if listed is None:
        return None, None
    # An exemption is a permission, so it matches exactly: one for CN does not lift CN-HK.
    exemption = next(
        (
            e
            for e in t.prohibition_exemptions
            if e.jurisdiction == jurisdiction and _in_force(e.reviewed_on, e.expires, on)
        ),
        None,
    )
    return listed, exemption


def _adequacy(t: TransferPolicy, jurisdiction: str, on: datetime.date) -> tuple[AdequacyDecision | None, str]:
    """An adequacy decision that covers the coordinator, or why none does."""
    why = ""
    for a in t.adequacy_decisions:
        if a.jurisdiction != jurisdiction:
            continue
        if not _in_force(a.adopted, a.expires, on):
            why = f"the adequacy decision for {jurisdiction} ({a.decision}) is not in force on {on}"
            continue
        if a.requires_attestation is None:
            return a, ""
        if any(
            c.scheme == a.requires_attestation and _in_force(c.verified_on, c.expires, on)
            for c in t.coordinator_attestations
        ):
            return a, ""
        why = (
            f"the adequacy decision for {jurisdiction} ({a.decision}) covers only recipients with "
            f"'{a.requires_attestation}', and no current coordinator attestation of it is recorded"
        )
    return None, why


def _safeguards_for(t: TransferPolicy, jurisdiction: str, on: datetime.date) -> list[TransferSafeguard]:
    return [s for s in t.safeguards if jurisdiction in s.jurisdictions and _in_force(s.recorded_on, s.expires, on)]


def coordinator_allowed(policy: RegionPolicy, jurisdiction: str, on: datetime.date | None = None) -> tuple[bool, str]:
    """May this region's updates go to a coordinator in `jurisdiction`? With the reason.

    Prohibitions win over everything unless a reviewed exemption is recorded; then the region's own
    jurisdictions, adequacy decisions (with their attestations) and recorded safeguards allow.
    Volume-dependent safeguards are checked by `transfer_safeguard`, on the node's counts.
    """
    on = on or _today()
    t, law = policy.transfers, policy.law
    listed, exemption = _prohibition(t, jurisdiction, on)
    if listed and not exemption:
        return False, (
            f"{law} policy forbids sending updates to a coordinator in {jurisdiction}: {listed} is "
            f"prohibited by {t.prohibition_basis} (transfers.prohibited_coordinator_jurisdictions) and no "
            "current reviewed exemption is recorded in transfers.prohibition_exemptions"
        )
    lifted = f" (prohibition lifted by {exemption.basis}, {exemption.reference})" if exemption else ""
    if _allows(t.allowed_coordinator_jurisdictions, jurisdiction):
        return True, f"{law} allows a coordinator in {jurisdiction}{lifted}"
    decision, adequacy_why = _adequacy(t, jurisdiction, on)
    if decision:
        return True, f"{law}: {jurisdiction} is covered by {decision.decision} (adopted {decision.adopted}){lifted}"
    covering = _safeguards_for(t, jurisdiction, on)
    if covering:
        s = covering[0]
        subject = "; subject to the volume rules on the node's counts" if t.volume_rules else ""
        return True, f"{law}: transfer to {jurisdiction} covered by {s.kind.value} {s.reference}{lifted}{subject}"
    allowed = ", ".join(t.allowed_coordinator_jurisdictions)
    return False, (
        f"{law} policy forbids sending updates to a coordinator in {jurisdiction} (allowed: {allowed}; "
        + (adequacy_why or f"no adequacy decision or recorded safeguard covers {jurisdiction}")
        + ")"
    )


def deployment_allowed(policy: RegionPolicy, jurisdiction: str) -> bool:
    return _allows(policy.retention.allowed_deployment_jurisdictions, jurisdiction)


@dataclass(frozen=True)
class SafeguardDecision:
    """Which safeguard a transfer of this many people's data needs, and whether the policy records it."""

    jurisdiction: str
    people: int
    sensitive_people: int
    cross_border: bool
    band: int | None  # index into volume_rules.bands; None when no band applies
    required: tuple[str, ...]  # any one of these kinds suffices; () = none is needed
    recorded: str | None  # "kind reference" of the safeguard that satisfies it
    allowed: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "required": list(self.required)}


def transfer_safeguard(
    policy: RegionPolicy, jurisdiction: str, people: int, sensitive_people: int, on: datetime.date | None = None
) -> SafeguardDecision:
    """Evaluate the policy's volume rules on the node's own counts for a transfer to `jurisdiction`.

    `people`: individuals whose (non-sensitive) personal data is in the transfer's scope over the
    counting period; `sensitive_people`: individuals whose sensitive personal data is.
    """
    if people < 0 or sensitive_people < 0:
        raise ValueError(f"counts must be >= 0, got people={people}, sensitive_people={sensitive_people}")
    on = on or _today()
    law, rules = policy.law, policy.transfers.volume_rules

    def decide(**kw) -> SafeguardDecision:
        return SafeguardDecision(jurisdiction=jurisdiction, people=people, sensitive_people=sensitive_people, **kw)

    if rules is None:
        return decide(
            cross_border=True,
            band=None,
            required=(),
            recorded=None,
            allowed=True,
            reason=f"{law} policy sets no volume rules; the transfer rules alone decide",
        )
    if jurisdiction in rules.domestic_jurisdictions:
        return decide(
            cross_border=False,
            band=None,
            required=(),
            recorded=None,
            allowed=True,
            reason=f"{jurisdiction} is domestic under {law}: not a cross-border transfer",
        )
    index = next(i for i, b in enumerate(rules.bands) if _in_band(b, people, sensitive_people))
    band = rules.bands[index]
    counts = f"{people:,} people and {sensitive_people:,} with sensitive data ({rules.counting_period.value})"
    if rules.required_regardless_of_volume:
        required, why = tuple(k.value for k in rules.required_regardless_of_volume), "required whatever the volume"
    else:
        required, why = tuple(k.value for k in band.requires), f"band {index + 1} ({describe_band(band)})"
    if not required:
        return decide(
            cross_border=True,
            band=index,
            required=(),
            recorded=None,
            allowed=True,
            reason=f"{law}: {counts} to {jurisdiction} fall in {why}: no safeguard is required",
        )
    match = next((s for s in _safeguards_for(policy.transfers, jurisdiction, on) if s.kind.value in required), None)
    needed = " or ".join(k.replace("_", " ") for k in required)
    if match:
        recorded = f"{match.kind.value} {match.reference}"
        return decide(
            cross_border=True,
            band=index,
            required=required,
            recorded=recorded,
            allowed=True,
            reason=f"{law}: {counts} to {jurisdiction} need a {needed} ({why}); covered by {recorded}",
        )
    return decide(
        cross_border=True,
        band=index,
        required=required,
        recorded=None,
        allowed=False,
        reason=f"{law}: {counts} to {jurisdiction} need a {needed} ({why}), and no current one covering "
        f"{jurisdiction} is recorded in transfers.safeguards. Record it there, or keep the "
        "transfer below the band's bounds.",
    )


def _in_band(band: VolumeBand, people: int, sensitive_people: int) -> bool:
    return (band.people_below is None or people < band.people_below) and (
        band.sensitive_people_below is None or sensitive_people < band.sensitive_people_below
    )


def describe_band(band: VolumeBand) -> str:
    parts = []
    if band.people_below is not None:
        parts.append(f"fewer than {band.people_below:,} people")
    if band.sensitive_people_below == 1:
        parts.append("no sensitive data")
    elif band.sensitive_people_below is not None:
        parts.append(f"fewer than {band.sensitive_people_below:,} with sensitive data")
    return " and ".join(parts) or "any larger volume"


@dataclass(frozen=True)
class PlanTerms:
    """What a round plan asks of a node, in the terms a policy speaks."""

    coordinator_jurisdiction: str
    dp_enabled: bool
    max_grad_norm: float
    secure_aggregation: bool
    cohort_size: int


@dataclass
class PlanDecision:
    accepted: bool
    reasons: list[str]
    max_grad_norm: float  # the clip norm to use: the stricter of plan and policy
    adjustments: list[str]

    def explain(self) -> str:
        return "; ".join(self.reasons + self.adjustments) or "plan within policy"


def check_plan(policy: RegionPolicy, terms: PlanTerms) -> PlanDecision:
    """Refuse what the policy forbids; where a stricter value exists, use it instead."""
    reasons: list[str] = []
    adjustments: list[str] = []
    ok, why = coordinator_allowed(policy, terms.coordinator_jurisdiction)
    if not ok:
        reasons.append(why)
    if policy.privacy.require_dp and not terms.dp_enabled:
        reasons.append(f"{policy.law} policy requires DP-SGD; the plan trains without it")
    if policy.transfers.require_secure_aggregation and not terms.secure_aggregation:
        reasons.append(f"{policy.law} policy requires secure aggregation; the plan asks for a plaintext update")
    if terms.cohort_size < policy.transfers.min_cohort:
        reasons.append(
            f"the plan aggregates {terms.cohort_size} client(s), below the policy's minimum cohort "
            f"{policy.transfers.min_cohort}"
        )
    clip = terms.max_grad_norm
    if clip > policy.privacy.max_grad_norm:
        clip = policy.privacy.max_grad_norm
        adjustments.append(f"clip norm lowered from {terms.max_grad_norm:g} to the policy maximum {clip:g}")
    return PlanDecision(accepted=not reasons, reasons=reasons, max_grad_norm=clip, adjustments=adjustments)


def effective_noise(policy: RegionPolicy, planned: float) -> tuple[float, str | None]:
    """The noise multiplier to use: the plan's, raised to the policy minimum if it is below."""
    if planned < policy.privacy.min_noise_multiplier:
        return policy.privacy.min_noise_multiplier, (
            f"noise multiplier raised from {planned:.3g} to the policy minimum {policy.privacy.min_noise_multiplier:g}"
        )
    return planned, None


# -- explanation --------------------------------------------------------------------------------


def transfer_rules(policy: RegionPolicy, on: datetime.date | None = None) -> dict[str, Any]:
    """Where updates may go and under which safeguard, as data a privacy report can show."""
    on = on or _today()
    t = policy.transfers
    attested = {c.scheme for c in t.coordinator_attestations if _in_force(c.verified_on, c.expires, on)}
    return {
        "allowed": list(t.allowed_coordinator_jurisdictions),
        "adequacy": [
            {
                **asdict(a),
                "in_force": _in_force(a.adopted, a.expires, on),
                "attested": a.requires_attestation is None or a.requires_attestation in attested,
            }
            for a in t.adequacy_decisions
        ],
        "attestations": [asdict(c) for c in t.coordinator_attestations],
        "safeguards": [
            {**asdict(s), "kind": s.kind.value, "in_force": _in_force(s.recorded_on, s.expires, on)}
            for s in t.safeguards
        ],
        "prohibited": list(t.prohibited_coordinator_jurisdictions),
        "exemptions": [
            {**asdict(e), "in_force": _in_force(e.reviewed_on, e.expires, on)} for e in t.prohibition_exemptions
        ],
        "volume_bands": None
        if t.volume_rules is None
        else [
            {
                "bounds": describe_band(b),
                "people_below": b.people_below,
                "sensitive_people_below": b.sensitive_people_below,
                "requires": [k.value for k in b.requires],
            }
            for b in t.volume_rules.bands
        ],
        "secure_aggregation": t.require_secure_aggregation,
        "min_cohort": t.min_cohort,
        "checked_on": on.isoformat(),
    }


def explain_policy(name: str, jurisdiction: str, policy: RegionPolicy, on: datetime.date | None = None) -> str:
    """The policy in plain words, for people who decide whether it is right."""
    r, t, p, d, k = policy.residency, policy.transfers, policy.privacy, policy.data_use, policy.retention
    rules = transfer_rules(policy, on)
    unit = "each person (all records of one user together)" if p.unit == PrivacyUnitKind.user else "each record"

    def places(values: list[str]) -> str:
        return "anywhere" if ANY in values else "only in " + ", ".join(values)

    lines = [f"Region {name} ({jurisdiction}), rules under {policy.law}:"]
    storage = (
        f"stored under {', '.join(r.storage_roots)}" if r.storage_roots else "in the node's configured data folders"
    )
    lines.append(
        f"- Data: the node trains only on records tagged {', '.join(r.allowed_region_tags)}, {storage}; "
        "any other record stops the node before it trains. Raw records never leave the node."
    )
    use = ["records without consent are excluded and counted" if d.require_consent else "consent is not checked"]
    if d.excluded_special_categories:
        use.append(f"records tagged {', '.join(d.excluded_special_categories)} are excluded")
    if d.excluded_fields:
        use.append(f"records with any of the fields {', '.join(d.excluded_fields)} are excluded")
    use.append(
        f"before training, {', '.join(d.scrub_entities)} found in the text are replaced by placeholders"
        if d.scrub_pii
        else "identifiers in the text are kept (no scrubbing)"
    )
    lines.append("- Use: " + "; ".join(use) + ".")
    lines.append(
        "- Transfers: only DP-protected adapter updates leave the node, "
        + ("always under secure aggregation" if t.require_secure_aggregation else "plaintext updates allowed")
        + f", with at least {t.min_cohort} clients in each aggregation. A coordinator may receive them:"
    )
    lines.append(
        f"  - without further safeguard {places(t.allowed_coordinator_jurisdictions)}"
        + (
            f", except {', '.join(t.prohibited_coordinator_jurisdictions)}"
            if ANY in t.allowed_coordinator_jurisdictions and t.prohibited_coordinator_jurisdictions
            else ""
        )
    )
    for a in rules["adequacy"]:
        status = "" if a["in_force"] else " [NOT IN FORCE on " + rules["checked_on"] + "]"
        needs = ""
        if a["requires_attestation"]:
            needs = (
                f"; the coordinator's '{a['requires_attestation']}' status is recorded"
                if a["attested"]
                else f"; needs the coordinator's '{a['requires_attestation']}' status recorded (none is, so refused)"
            )
        expiry = f", expires {a['expires']}" if a["expires"] else ""
        lines.append(
            f"  - in {a['jurisdiction']} under an adequacy finding: {a['decision']}, {a['adopted']}{expiry} "
            f"({a['scope']}){needs}{status}"
        )
    for s in rules["safeguards"]:
        status = "" if s["in_force"] else " [EXPIRED]"
        lines.append(
            f"  - in {', '.join(s['jurisdictions'])} under {s['kind'].replace('_', ' ')} {s['reference']} "
            f"(recorded {s['recorded_on']}{', expires ' + s['expires'] if s['expires'] else ''}){status}"
        )
    if not rules["adequacy"] and not rules["safeguards"] and ANY not in t.allowed_coordinator_jurisdictions:
        lines.append("  - nowhere else: no adequacy decision or transfer safeguard is recorded")
    if t.prohibited_coordinator_jurisdictions:
        exempt = "; ".join(
            f"{e['jurisdiction']} exempted by {e['basis']} ({e['reference']}, reviewed "
            f"{e['reviewed_on']}){'' if e['in_force'] else ' [EXPIRED]'}"
            for e in rules["exemptions"]
        )
        lines.append(
            f"  - never in {', '.join(t.prohibited_coordinator_jurisdictions)} (or their subdivisions), "
            f"prohibited by {t.prohibition_basis}, whatever else allows it, "
            + (f"except: {exempt}" if exempt else "as no reviewed exemption is recorded")
        )
    if t.volume_rules:
        v = t.volume_rules
        lines.append(
            f"  - for a destination outside {', '.join(v.domestic_jurisdictions)} that the lines above allow, "
            f"the safeguard needed also depends on volume, counted per "
            f"{v.counting_period.value.replace('_', ' ')} (people, and people with sensitive data, in the "
            "transfer's scope):"
        )
        for b in v.bands:
            needs = " or ".join(kind.value.replace("_", " ") for kind in b.requires) or "no safeguard"
            lines.append(f"      {describe_band(b)}: {needs}")
        if v.required_regardless_of_volume:
            lines.append(
                "      whatever the volume: "
                + " or ".join(kind.value.replace("_", " ") for kind in v.required_regardless_of_volume)
            )
        lines.append(
            "    (each node counts the people in its own data together with those its earlier releases abroad "
            "covered in the period, and refuses a coordinator whose required safeguard is not recorded)"
        )
    dp = "DP-SGD is required" if p.require_dp else "DP-SGD is optional"
    lines.append(
        f"- Privacy: {dp}; noise multiplier at least {p.min_noise_multiplier:g} and clipping norm at most "
        f"{p.max_grad_norm:g} (a coordinator asking for less protection gets these instead); the lifetime "
        f"privacy loss of {unit} is capped at epsilon {p.epsilon_budget:g} at delta {p.delta:g}."
    )
    lines.append(
        f"- Retention: checkpoints of runs this region takes part in are deleted once {k.checkpoint_days} "
        "days old (a run's shortest period applies) by `fedsov retention enforce` on the coordinator; ledger "
        f"backups once {k.ledger_backup_days} days old, by the same command on a node and by every node at "
        "start; each deletion is logged. The live privacy ledger and audit logs are never deleted: they are "
        "the evidence of the privacy spent. A model trained with this region's data may be deployed "
        f"{places(k.allowed_deployment_jurisdictions)}"
        + ("." if ANY in k.allowed_deployment_jurisdictions else " (`fedsov export` refuses elsewhere).")
    )
    lines.append(
        "- Erasure: `fedsov node erase` records a person's request (as a keyed pseudonym, not their id), "
        "leaves their records out of everything this region's nodes train on from then on, and reports the "
        "runs whose adapters were trained on them with the epsilon that covered them. The region's source "
        "data is not fedsov's to delete, and retraining from a checkpoint that predates them (`fedsov run "
        "branch`) is the operator's decision."
    )
    lines.append(DISCLAIMER)
    return "\n".join(lines)
