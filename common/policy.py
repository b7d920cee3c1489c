"""Region policies: each region's compliance rules as validated configuration.

A region's node loads its policy from its own file and enforces it on every decision; the
coordinator only plans around its copy. Checks here are plain functions so every
enforcement point can be tested without a federation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import List, Optional

from common.errors import PolicyViolation, ResidencyViolation

__all__ = ["PolicyViolation", "ResidencyViolation"]  # re-exported beside the checks that raise them

ANY = "*"


class PrivacyUnitKind(str, Enum):
    record = "record"
    user = "user"


@dataclass
class ResidencyPolicy:
    # Values of the records' `region` field this node may train on.
    allowed_region_tags: List[str] = field(default_factory=list)
    # Absolute path prefixes the node may read training data from ([] = only its configured paths).
    storage_roots: List[str] = field(default_factory=list)
    # Always false: fedsov has no way to export raw records, whatever a file says.
    raw_data_export: bool = False


@dataclass
class TransferPolicy:
    # Jurisdictions a coordinator may sit in to receive this region's updates ("*" = any).
    allowed_coordinator_jurisdictions: List[str] = field(default_factory=list)
    # Reference of a recorded transfer assessment; with it, the assessed jurisdictions are allowed too.
    security_assessment: Optional[str] = None
    assessed_coordinator_jurisdictions: List[str] = field(default_factory=list)
    require_secure_aggregation: bool = True
    # Fewest clients whose updates may be aggregated together with this region's.
    min_cohort: int = 2


@dataclass
class PrivacyPolicy:
    require_dp: bool = True
    epsilon_budget: float = 10.0
    delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 1.0
    unit: PrivacyUnitKind = PrivacyUnitKind.record


@dataclass
class DataUsePolicy:
    require_consent: bool = True
    # Records carrying any of these tags (e.g. special:health) are excluded and counted.
    excluded_special_categories: List[str] = field(default_factory=list)
    # Records with any of these fields set are excluded and counted.
    excluded_fields: List[str] = field(default_factory=list)
    scrub_pii: bool = False
    scrub_entities: List[str] = field(default_factory=list)


@dataclass
class RetentionPolicy:
    checkpoint_days: int = 30
    ledger_backup_days: int = 3650
    # Where a model holding this region's contribution may be deployed or exported ("*" = anywhere).
    allowed_deployment_jurisdictions: List[str] = field(default_factory=list)


@dataclass
class RegionPolicy:
    law: str = "???"
    residency: ResidencyPolicy = field(default_factory=ResidencyPolicy)
    transfers: TransferPolicy = field(default_factory=TransferPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    data_use: DataUsePolicy = field(default_factory=DataUsePolicy)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)


def policy_hash(policy: RegionPolicy) -> str:
    """A stable fingerprint of the rules (not the file's comments or layout)."""
    return hashlib.sha256(json.dumps(policy_dict(policy), sort_keys=True).encode()).hexdigest()


def policy_dict(policy: RegionPolicy) -> dict:
    return json.loads(json.dumps(asdict(policy), default=lambda e: e.value))


def validate_policy(policy: RegionPolicy, where: str) -> None:
    """Impossible values are errors naming the key, the value and the fix."""
    from common.errors import ConfigError
    from common.pii import SUPPORTED_ENTITIES

    def fail(key: str, value, rule: str, fix: str) -> None:
        raise ConfigError(f"Policy key '{where}.{key}' = {value!r}: {rule}. {fix}")

    if policy.residency.raw_data_export:
        fail("residency.raw_data_export", True, "raw data export is never possible in fedsov",
             "Remove the key or set it to false; only DP adapter updates ever leave a node.")
    if not policy.residency.allowed_region_tags:
        fail("residency.allowed_region_tags", [], "a node must be allowed at least its own region's records",
             "List the region tags, e.g. [eu].")
    if not policy.transfers.allowed_coordinator_jurisdictions:
        fail("transfers.allowed_coordinator_jurisdictions", [], "no coordinator could ever receive updates",
             "List jurisdictions, e.g. [EU], or [\"*\"] for any.")
    if policy.transfers.assessed_coordinator_jurisdictions and not policy.transfers.security_assessment:
        fail("transfers.assessed_coordinator_jurisdictions", policy.transfers.assessed_coordinator_jurisdictions,
             "assessed jurisdictions need a recorded assessment", "Set transfers.security_assessment to its reference.")
    if policy.transfers.min_cohort < 1:
        fail("transfers.min_cohort", policy.transfers.min_cohort, "must be at least 1", "Use e.g. 3.")
    p = policy.privacy
    if not p.epsilon_budget > 0 or math.isinf(p.epsilon_budget):
        fail("privacy.epsilon_budget", p.epsilon_budget, "must be a finite number above 0", "Use e.g. 10.")
    if not 0 < p.delta < 1:
        fail("privacy.delta", p.delta, "must be in (0, 1)", "Use e.g. 1e-5 (and at most 1/N).")
    if p.min_noise_multiplier < 0:
        fail("privacy.min_noise_multiplier", p.min_noise_multiplier, "must be >= 0", "Use e.g. 0.5.")
    if not p.max_grad_norm > 0:
        fail("privacy.max_grad_norm", p.max_grad_norm, "must be above 0", "Use e.g. 1.0.")
    unknown = sorted(set(policy.data_use.scrub_entities) - set(SUPPORTED_ENTITIES))
    if unknown:
        fail("data_use.scrub_entities", unknown, "unknown entity types",
             f"Use some of: {', '.join(SUPPORTED_ENTITIES)}.")
    if policy.data_use.scrub_pii and not policy.data_use.scrub_entities:
        fail("data_use.scrub_entities", [], "scrub_pii is on but no entity types are listed", "List e.g. [EMAIL_ADDRESS].")
    for key, days in (("retention.checkpoint_days", policy.retention.checkpoint_days),
                      ("retention.ledger_backup_days", policy.retention.ledger_backup_days)):
        if days < 1:
            fail(key, days, "must be at least 1 day", "Use e.g. 30.")
    if not policy.retention.allowed_deployment_jurisdictions:
        fail("retention.allowed_deployment_jurisdictions", [], "the model could never be used anywhere",
             "List jurisdictions, or [\"*\"] for any.")


def _allows(allowed: List[str], jurisdiction: str) -> bool:
    return ANY in allowed or jurisdiction in allowed


def coordinator_allowed(policy: RegionPolicy, jurisdiction: str) -> tuple[bool, str]:
    """May this region's updates go to a coordinator in `jurisdiction`? With the reason."""
    t = policy.transfers
    if _allows(t.allowed_coordinator_jurisdictions, jurisdiction):
        return True, f"{policy.law} allows a coordinator in {jurisdiction}"
    if t.security_assessment and _allows(t.assessed_coordinator_jurisdictions, jurisdiction):
        return True, f"{policy.law}: transfer to {jurisdiction} covered by assessment {t.security_assessment}"
    allowed = ", ".join(t.allowed_coordinator_jurisdictions)
    return False, (
        f"{policy.law} policy forbids sending updates to a coordinator in {jurisdiction} (allowed: {allowed}"
        + ("" if t.security_assessment else "; no transfer security assessment is recorded") + ")"
    )


def deployment_allowed(policy: RegionPolicy, jurisdiction: str) -> bool:
    return _allows(policy.retention.allowed_deployment_jurisdictions, jurisdiction)


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
    reasons: List[str]
    max_grad_norm: float  # the clip norm to use: the stricter of plan and policy
    adjustments: List[str]

    def explain(self) -> str:
        return "; ".join(self.reasons + self.adjustments) or "plan within policy"


def check_plan(policy: RegionPolicy, terms: PlanTerms) -> PlanDecision:
    """Refuse what the policy forbids; where a stricter value exists, use it instead."""
    reasons: List[str] = []
    adjustments: List[str] = []
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


def explain_policy(name: str, jurisdiction: str, policy: RegionPolicy) -> str:
    """The policy in plain words, for people who decide whether it is right."""
    r, t, p, d, k = policy.residency, policy.transfers, policy.privacy, policy.data_use, policy.retention
    unit = "each person (all records of one user together)" if p.unit == PrivacyUnitKind.user else "each record"

    def places(values: List[str]) -> str:
        return "anywhere" if ANY in values else "only in " + ", ".join(values)

    lines = [f"Region {name} ({jurisdiction}), rules under {policy.law}:"]
    storage = f"stored under {', '.join(r.storage_roots)}" if r.storage_roots else "in the node's configured data folders"
    lines.append(f"- Data: the node trains only on records tagged {', '.join(r.allowed_region_tags)}, {storage}; "
                 "any other record stops the node before it trains. Raw records never leave the node.")
    use = ["records without consent are excluded and counted" if d.require_consent else "consent is not checked"]
    if d.excluded_special_categories:
        use.append(f"records tagged {', '.join(d.excluded_special_categories)} are excluded")
    if d.excluded_fields:
        use.append(f"records with any of the fields {', '.join(d.excluded_fields)} are excluded")
    if d.scrub_pii:
        use.append(f"before training, {', '.join(d.scrub_entities)} found in the text are replaced by placeholders")
    lines.append("- Use: " + "; ".join(use) + ".")
    transfer = f"- Transfers: updates may go to a coordinator {places(t.allowed_coordinator_jurisdictions)}"
    if t.security_assessment:
        transfer += f", and in {', '.join(t.assessed_coordinator_jurisdictions)} under assessment {t.security_assessment}"
    else:
        transfer += "; no transfer assessment is recorded"
    transfer += (". Every round must use secure aggregation" if t.require_secure_aggregation else ". Plaintext updates are allowed")
    lines.append(transfer + f", with at least {t.min_cohort} clients in each aggregation.")
    dp = "DP-SGD is required" if p.require_dp else "DP-SGD is optional"
    lines.append(f"- Privacy: {dp}; noise multiplier at least {p.min_noise_multiplier:g} and clipping norm at most "
                 f"{p.max_grad_norm:g} (a coordinator asking for less protection gets these instead); the lifetime "
                 f"privacy loss of {unit} is capped at epsilon {p.epsilon_budget:g} at delta {p.delta:g}.")
    lines.append(f"- Retention: checkpoints are kept {k.checkpoint_days} days and ledger backups {k.ledger_backup_days} "
                 f"days; a model trained with this region's data may be deployed {places(k.allowed_deployment_jurisdictions)}.")
    lines.append("These are engineering defaults, not legal advice.")
    return "\n".join(lines)
