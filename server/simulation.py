"""`fedsov simulate`: a whole federation on this machine with Flower's simulation engine (Ray).

Prepares data and base model, starts a private SuperLink in simulation mode, submits the
run with `flwr run`, shows progress from the run's events, and prints the summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from common.config import FedsovConfig, config_from_container, config_to_yaml, load_config
from common.data.prepare import ensure_synthetic_data
from common.errors import ConfigError, FederationError
from common.model.loading import resolve_model_path
from common.paths import writable_folder
from common.runconfig import write_flower_app, write_run_config
from server.rundir import RunDirectory
from server.superlink import LocalSuperLink, RunStatus
from server.tracking import check_trackers

# What may change when a run resumes; everything else would make the checkpoint meaningless.
RESUMABLE_PREFIXES = ("federation.", "simulation.")


def resolve_run_config(overrides: Sequence[str], config_dir: Path | None = None) -> FedsovConfig:
    """Compose the config; with resume=<run_dir>, start from that run's saved config."""
    cfg = load_config(overrides, config_dir)
    if not cfg.resume:
        if cfg.run_dir is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            runs = Path(cfg.workdir) / "runs"
            cfg.run_dir = str(runs / stamp)
            n = 1
            while Path(cfg.run_dir).exists():
                n += 1
                cfg.run_dir = str(runs / f"{stamp}-{n}")
        elif RunDirectory(cfg.run_dir).config_path.exists():
            raise ConfigError(
                f"run_dir={cfg.run_dir} already holds a run. Continue it with resume={cfg.run_dir}, "
                "or choose a new run_dir."
            )
        return cfg
    run = RunDirectory(cfg.resume)
    if not run.config_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: no config.yaml there, so it is not a fedsov run directory.")
    changes = [o for o in overrides if not o.startswith("resume=")]
    for o in changes:
        if not o.startswith(RESUMABLE_PREFIXES):
            raise ConfigError(
                f"Cannot change '{o.split('=', 1)[0]}' when resuming: the checkpoint was trained with the "
                f"saved value. Only {', '.join(p + '*' for p in RESUMABLE_PREFIXES)} may change."
            )
    saved = OmegaConf.load(run.config_path)
    merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(changes))
    resumed = config_from_container(merged)
    resumed.run_dir, resumed.resume = str(run.path), str(run.path)
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None and checkpoint.round >= resumed.federation.rounds:
        raise ConfigError(
            f"resume={run.path}: that run already finished round {checkpoint.round} and federation.rounds is "
            f"{resumed.federation.rounds}, so nothing is left to run. To train on, add "
            f"federation.rounds={checkpoint.round + 1} (or more)."
        )
    return resumed


def federation_config(cfg: FedsovConfig) -> dict[str, int | float]:
    """Flower's simulation settings: one SuperNode per configured client, each client's cores and GPUs, and
    (when set) the cores all clients share, which caps how many Ray actors run them."""
    settings: dict[str, int | float] = {
        "num-supernodes": sum(r.clients for r in cfg.regions.values()),
        "client-resources-num-cpus": cfg.simulation.client_cpus,
        "client-resources-num-gpus": cfg.simulation.client_gpus,
    }
    if cfg.simulation.cpus is not None:
        settings["init-args-num-cpus"] = cfg.simulation.cpus
    return settings


def simulate(overrides: Sequence[str], config_dir: Path | None = None, out: Callable[[str], None] = print) -> int:
    """Run a simulated federation end to end; return the process exit code."""
    cfg = resolve_run_config(overrides, config_dir)
    writable_folder(cfg.workdir, "workdir=<folder>")
    writable_folder(Path(cfg.run_dir).parent, "run_dir=<folder>")
    run = RunDirectory(cfg.run_dir)
    run.create()
    run.config_path.write_text(config_to_yaml(cfg))
    if not cfg.resume:
        run.write_overrides(list(overrides))
    check_trackers(cfg)
    out(_headline(cfg, run, sum(r.clients for r in cfg.regions.values())))

    ensure_synthetic_data(cfg, log=lambda m: out(f"  {m}"))
    resolve_model_path(cfg.model, log=lambda m: out(f"  {m}"))

    app_dir = write_flower_app(run.path / "flower-app")
    run_config = write_run_config(run.path / "flower-run-config.toml", cfg)
    # Plaintext on loopback only: a simulation never leaves this machine.
    superlink = LocalSuperLink(run.path / "flower-home", run.logs_dir / "superlink.log", simulation=True)
    started = time.time()
    try:
        superlink.start()
        run_id = superlink.submit(
            app_dir,
            run_config,
            federation_config(cfg),
        )
        out(f"  Flower run {run_id} on a local SuperLink ({superlink.address}); logs in {run.logs_dir}")
        status = _watch(superlink, run_id, run, cfg, out)
        superlink.save_logs(run_id, run.logs_dir / "flower-run.log")
    except KeyboardInterrupt:
        out(
            f"\nStopping run {run.run_id} and every process it started; continue it later with: "
            f"fedsov simulate resume={run.path}"
        )
        raise
    finally:
        superlink.stop()
    summary = run.read_summary()
    if not status.completed or summary is None:
        failure = next((e for e in reversed(run.read_events()) if e["event"] == "run_failed"), None)
        reason = failure["error"] if failure else status.details
        out(f"\nRun {run.run_id} FAILED ({status.status}): {reason}")
        out(f"Logs: {run.logs_dir}. Resume from the last checkpoint with: fedsov simulate resume={run.path}")
        return 1
    out(render_summary(summary, cfg, time.time() - started))
    report = run.report_dir / "privacy-report.json"
    if report.exists():
        out(render_report_lines(json.loads(report.read_text()), run))
    code, lines = partial_verdict(summary)
    for line in lines:
        out(line)
    return code


PARTIAL_EXIT = 3


def partial_verdict(summary: dict) -> tuple[int, list[str]]:
    """A run where a planned region, node or round contributed nothing is not a success unless allowed."""
    if summary.get("status") != "partial":
        return 0, []
    lines = ["", "PARTIAL RUN: not everything planned contributed:"]
    lines += [f"  - {line}" for line in summary.get("not_contributing", [])]
    if summary.get("allow_partial"):
        return 0, lines + ["  federation.allow_partial=true: this counts as success."]
    return PARTIAL_EXIT, lines + [
        f"  Exit code {PARTIAL_EXIT}: fix the reasons above, or accept partial runs with federation.allow_partial=true."
    ]


def render_report_lines(report: dict, run: RunDirectory) -> str:
    lines = ["", f"Privacy report: {run.report_dir / 'privacy-report.html'} (also .md and .json)"]
    for name, r in report["regions"].items():
        verdict = r["verdict"]
        lines.append(
            f"  {name:<8} audit: {verdict['status']}"
            + (f" ({'; '.join(verdict['signals'])})" if verdict["signals"] else "")
        )
    return "\n".join(lines)


def _watch(superlink: LocalSuperLink, run_id: int, run: RunDirectory, cfg: FedsovConfig, out) -> RunStatus:
    """Print events as the ServerApp writes them; read Flower's status for the verdict."""
    seen = 0
    last_check = 0.0
    while True:
        events = run.read_events()
        for event in events[seen:]:
            line = render_event(event, cfg)
            if line:
                out(line)
        seen = len(events)
        done = any(e["event"] in ("run_finished", "run_failed") for e in events)
        if done or time.monotonic() - last_check > 15:
            last_check = time.monotonic()
            if not superlink.alive():
                raise FederationError(f"The SuperLink stopped unexpectedly; see {superlink.log_path}.")
            status = superlink.status(run_id)
            if status.finished:
                return status
        time.sleep(1.0)


def _headline(cfg: FedsovConfig, run: RunDirectory, n_nodes: int) -> str:
    regions = ", ".join(f"{r.name} x{r.clients}" for r in cfg.regions.values())
    p = cfg.privacy
    if not p.enabled:
        dp = "NO differential privacy (privacy.enabled=false)"
    elif p.target_epsilon is not None:
        dp = f"DP-SGD ({cfg.federation.optimizer.value}), target epsilon {p.target_epsilon:g} for this run"
    else:
        dp = f"DP-SGD ({cfg.federation.optimizer.value}), sigma {p.noise_multiplier:g}"
    resumed = " (resuming)" if cfg.resume else ""
    if cfg.secure_aggregation.enabled:
        secure = (
            f"secure aggregation on (threshold {cfg.secure_aggregation.threshold_fraction:.0%} of each round's clients)"
        )
    else:
        secure = "WARNING: secure aggregation OFF (secure_aggregation.enabled=false): the coordinator sees each update"
    return (
        f"fedsov simulate{resumed}: run {run.run_id}\n"
        f"  {n_nodes} clients in {len(cfg.regions)} regions ({regions}), {cfg.federation.rounds} rounds, {dp}\n"
        f"  coordinator in {cfg.federation.coordinator_jurisdiction}; each region enforces its own policy "
        f"(delta, budget, unit, bounds)\n"
        f"  {secure}\n"
        f"  run directory: {run.path}"
    )


def _fmt_eps(e) -> str:
    if e is None:
        return "-"
    return "inf (no DP)" if e == "inf" else f"{e:.2f}"


def render_event(event: dict, cfg: FedsovConfig) -> str | None:
    """One progress line per event worth showing, or None."""
    kind = event["event"]
    total = cfg.federation.rounds
    if kind == "node_joined":
        return (
            f"  node {event['node']:<6} region {event['region']:<3} ({event['law']}) {event['units']:>5} units; "
            f"excluded by policy: {event['excluded_no_consent']} without consent, {event['excluded_special']} "
            f"special-category; epsilon spent so far {_fmt_eps(event['epsilon'])}"
        )
    if kind == "node_unavailable":
        return f"  a node refused to take part: {event['reason']}"
    if kind == "region_excluded":
        return f"  region {event['region']} EXCLUDED: {event['reason']}"
    if kind == "policy_mismatch":
        return (
            f"  note: {event['node']}'s own policy ({event['node_policy'][:12]}) differs from the coordinator's "
            f"copy ({event['coordinator_copy'][:12]}); the node's governs"
        )
    if kind == "resumed":
        return f"  resuming after round {event['round']} from {event['checkpoint']}"
    if kind == "evaluated" and event["round"] == 0:
        return "  round 0/{}  held-out perplexity before training: {}".format(total, _fmt_ppl(event["perplexity"]))
    if kind == "round_started":
        return f"  round {event['round']}/{total} ..."
    if kind == "node_trained":
        loss = "update masked" if event["loss"] is None else f"loss {event['loss']:.3f}"
        return (
            f"    {event['node']:<6} trained  {loss}  epsilon {_fmt_eps(event['epsilon'])}  ({event['seconds']:.1f}s)"
        )
    if kind == "secure_aggregation_disabled":
        return f"  WARNING: secure aggregation is OFF: {event['reason']}"
    if kind == "node_refused":
        return f"    {event['node']:<6} REFUSED: {event['reason']}"
    if kind == "node_failed":  # lost, unreachable or broken: not the node's decision
        return f"    {event['node']:<6} no contribution (not a refusal): {event['reason']}"
    if kind == "update_rejected":
        return f"    {event['node']:<6} update REJECTED by the coordinator: {event['reason']}"
    if kind == "round_skipped":
        return f"    round {event['round']} skipped: {event['reason']}"
    if kind == "round_finished":
        eps = "  ".join(f"{r} {_fmt_eps(e)}" for r, e in event["epsilon"].items())
        loss = "  ".join(f"{r} {v:.3f}" for r, v in event.get("train_loss", {}).items())
        return (
            f"  round {event['round']}/{total} done in {event['seconds']:.1f}s  train loss {loss or '-'}"
            f"  | perplexity {_fmt_ppl(event['perplexity'])}  | epsilon {eps}"
        )
    if kind == "audit_started":
        return "  memorisation audit on each node (canaries, membership inference, PII in generations) ..."
    if kind == "audit_node":
        m = event["metrics"]
        top = max(
            (k for k in m if k.startswith("exposure-rep") and k.endswith("-max")),
            key=lambda k: int(k.split("rep")[1].split("-")[0]),
            default=None,
        )
        exposure = f"max exposure of the most repeated canaries {m[top]:.1f} bits, " if top else ""
        return (
            f"    {event['node']:<6} audited: {exposure}membership AUC {m.get('mia-loss-auc', float('nan')):.2f}, "
            f"{int(m.get('pii-spans', 0))} PII-like spans in {int(m.get('generations', 0))} generations"
        )
    if kind == "audit_failed":
        return f"    {event['node']:<6} audit failed: {event['reason']}"
    if kind == "evaluation_failed":
        return f"    evaluation of round {event['round']} failed: {event['reason']}"
    if kind == "run_failed":
        return f"  run failed: {event['error']}"
    return None


def _fmt_ppl(perplexity: dict) -> str:
    return "  ".join(f"{k} {v:.2f}" for k, v in perplexity.items())


def render_summary(summary: dict, cfg: FedsovConfig, seconds: float) -> str:
    p = summary["privacy"]
    lines = [
        "",
        f"Summary: run {summary['run_id']} completed {summary['rounds_completed']}/{cfg.federation.rounds} rounds "
        f"in {seconds / 60:.1f} min",
        f"  {'region':<8}{'nodes':>6}   {'held-out perplexity before -> after':<38}{'epsilon spent':>14}   budget",
    ]
    for name, r in summary["regions"].items():
        before, after = r["perplexity_before"], r["perplexity_after"]
        if before and after:
            change = f"{before:8.2f} -> {after:8.2f}  ({(after - before) / before:+.0%})"
        else:
            change = "n/a"
        budget = f"{r['epsilon_budget']:g}" if p["enabled"] and r["epsilon_budget"] else "-"
        lines.append(f"  {name:<8}{len(r['nodes']):>6}   {change:<38}{_fmt_eps(r['epsilon']):>14}   {budget}")
        for refusal in r["refusals"]:
            lines.append(f"      refused: {refusal}")
    for region, reason in summary["excluded_regions"].items():
        lines.append(f"  {region:<8}{'-':>6}   EXCLUDED: {reason}")
    for reason in sorted(set(summary["unavailable_nodes"])):
        count = summary["unavailable_nodes"].count(reason)
        lines.append(f"  {count} node(s) did not take part: {reason}")
    o = summary["overall"]
    if o["perplexity_before"] and o["perplexity_after"]:
        lines.append(f"  {'overall':<14}   {o['perplexity_before']:8.2f} -> {o['perplexity_after']:8.2f}")
    if not summary["secure_aggregation"]:
        lines.append("  secure aggregation was OFF: the coordinator saw every client's update")
    units = ", ".join(f"{n}: delta {r['delta']:g} per {r['unit']}" for n, r in summary["regions"].items() if r["delta"])
    privacy = (
        f"epsilon is cumulative per dataset across runs, kept in each node's privacy ledger ({units})"
        if p["enabled"]
        else "NO differential privacy in this run"
    )
    out = summary["outputs"]
    lines += [
        f"  {privacy}",
        f"  adapter : {out['adapter']}   (PeftModel.from_pretrained(base, path); base: {summary['model']['path']})",
        f"  provenance: {Path(out['adapter']) / 'fedsov-manifest.json'}; "
        f"audit log: {Path(out['run_dir']) / 'audit.jsonl'}",
        f"  metrics : {out['metrics']}",
        f"  config  : {out['config']}",
        f"  summary : {Path(out['run_dir']) / 'summary.json'}",
    ]
    return "\n".join(lines)
