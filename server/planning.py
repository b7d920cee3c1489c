"""The coordinator's planning from what it knows of each region's policy.

It cannot weaken a policy (each node enforces its own), but it should not ask regions for
what they will refuse: it leaves out regions whose policy forbids its jurisdiction, training
without DP, plaintext updates, or a cohort as small as the one it can offer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import DataSource, FedsovConfig, RegionConfig
from common.policy import coordinator_allowed, policy_hash


@dataclass(frozen=True)
class RegionPlan:
    included: dict[str, str]  # region -> policy hash of the coordinator's copy
    excluded: dict[str, str]  # region -> why
    cohort: int  # clients the coordinator will ask to train each round


def plan_regions(cfg: FedsovConfig) -> RegionPlan:
    jurisdiction = cfg.federation.coordinator_jurisdiction
    excluded: dict[str, str] = {}
    for name, region in cfg.regions.items():
        policy = region.policy
        allowed, why = coordinator_allowed(policy, jurisdiction)
        if not allowed:
            excluded[name] = why
        elif policy.privacy.require_dp and not cfg.privacy.enabled:
            excluded[name] = f"{policy.law} policy requires DP-SGD and this run has privacy.enabled=false"
        elif policy.transfers.require_secure_aggregation and not cfg.secure_aggregation.enabled:
            excluded[name] = f"{policy.law} policy requires secure aggregation and this run turned it off"
    # A region's minimum cohort counts every client in the aggregation: drop regions whose
    # minimum the remaining cohort cannot meet, until the plan is stable.
    while True:
        cohort = sum(r.clients for n, r in cfg.regions.items() if n not in excluded)
        too_small = {
            n: f"{r.policy.law} policy needs at least {r.policy.transfers.min_cohort} clients per aggregation; "
            f"this federation offers {cohort}"
            for n, r in cfg.regions.items()
            if n not in excluded and r.policy.transfers.min_cohort > cohort
        }
        if not too_small:
            break
        excluded.update(too_small)
    included = {n: policy_hash(r.policy) for n, r in cfg.regions.items() if n not in excluded}
    return RegionPlan(included=included, excluded=excluded, cohort=cohort)


@dataclass(frozen=True)
class DryRun:
    lines: list[str]
    accepted: list[str]  # regions whose node would train under this plan
    refused: dict[str, str]  # region -> why its node would refuse


def dry_run(cfg: FedsovConfig, policies: dict[str, RegionConfig]) -> DryRun:
    """Check the round plan this coordinator would send against each region's own policy file."""
    from common.policy import PlanTerms, check_plan, effective_noise

    regions = plan_regions(cfg)
    terms = PlanTerms(
        coordinator_jurisdiction=cfg.federation.coordinator_jurisdiction,
        dp_enabled=cfg.privacy.enabled,
        max_grad_norm=cfg.privacy.max_grad_norm,
        secure_aggregation=cfg.secure_aggregation.enabled,
        # The cohort the coordinator can offer; if its own plan leaves nobody, what all regions would make.
        cohort_size=regions.cohort or sum(r.clients for r in cfg.regions.values()),
    )
    sigma = (
        (
            f"sigma {cfg.privacy.noise_multiplier:g}"
            if cfg.privacy.noise_multiplier is not None
            else f"sigma derived by each node from target epsilon {cfg.privacy.target_epsilon}"
        )
        if cfg.privacy.enabled
        else "no DP"
    )
    lines = [
        f"Round plan: coordinator in {terms.coordinator_jurisdiction}, {sigma}, clip norm {terms.max_grad_norm:g}, "
        f"secure aggregation {'on' if terms.secure_aggregation else 'OFF'}, cohort {terms.cohort_size} clients, "
        f"{cfg.federation.local_steps} steps/round at batch {cfg.federation.batch_size}",
        "Coordinator's own plan (from its copies of the policies): "
        + (", ".join(f"leaves out {n}" for n in regions.excluded) or "includes every region"),
        "Each region's node, checking the plan against its own policy file:",
    ]
    accepted: list[str] = []
    refused: dict[str, str] = {}
    for name in cfg.regions:
        region = policies[name]
        decision = check_plan(region.policy, terms)
        reasons = decision.reasons + _missing_data(cfg.regions[name])
        notes = list(decision.adjustments)
        if cfg.privacy.enabled and cfg.privacy.noise_multiplier is not None:
            _, raised = effective_noise(region.policy, cfg.privacy.noise_multiplier)
            notes += [raised] if raised else []
        if reasons:
            refused[name] = "; ".join(reasons)
            verdict = "REFUSE: " + refused[name]
        else:
            accepted.append(name)
            verdict = "ACCEPT with adjustments: " + "; ".join(notes) if notes else "ACCEPT"
            if cfg.privacy.enabled and cfg.privacy.noise_multiplier is None:
                floor = region.policy.privacy.min_noise_multiplier
                verdict += f" (a derived sigma below the policy floor {floor:g} is raised to it)"
        lines.append(f"  {name:<6} ({region.policy.law}): {verdict}")
    if not accepted:
        lines.append(f"No region accepts this plan (refused by {', '.join(refused)}): nothing would train.")
    return DryRun(lines=lines, accepted=accepted, refused=refused)


def _missing_data(region: RegionConfig) -> list[str]:
    """Data paths a node started on this machine would not find (its start checks refuse them)."""
    if region.data.source != DataSource.files:
        return []
    return [
        f"data path {p} (regions.{region.name}.data.paths) does not exist; the node would refuse to start"
        for p in region.data.paths
        if not Path(p).exists()
    ]
