"""Running fedsov on Flower's deployment engine: coordinator, run submission, watching, outputs.

The coordinator is a Flower SuperLink (TLS and SuperNode authentication on unless `insecure` is
asked for, runtime dependency installs off); regional nodes are SuperNodes (`client.supernode`).
Runs are submitted with `flwr run` and followed through Flower's own run log, in which the
ServerApp echoes its progress events, so watching works from any machine that can reach the
SuperLink's Control API. A run's status always comes from that API (what `flwr ls` shows; `flwr run
--stream` exits 0 even when a run fails).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import FedsovConfig, config_to_yaml
from common.credentials import TlsFiles, make_certificates, make_node_key
from common.errors import ConfigError, FederationError
from common.flowerproc import signals_deferred
from common.paths import writable_folder
from common.runconfig import write_flower_app, write_run_config
from server.rundir import RunDirectory, parse_events
from server.simulation import partial_verdict, render_event, render_report_lines, render_summary, resolve_run_config
from server.superlink import FlowerControl, LocalSuperLink, RunStatus

DEFAULT_PORT = 9093
INSECURE_WARNING = (
    "WARNING: insecure mode: no TLS and no node authentication. Anyone on the network can read the "
    "traffic and join as a node. Use it only for tests on a closed network."
)


@dataclass(frozen=True)
class Connection:
    """How a command reaches a coordinator's SuperLink."""

    superlink: str
    ca_cert: Path | None  # None only in explicit insecure mode
    home: Path  # FLWR_HOME for the flwr CLI calls this command makes

    @classmethod
    def from_args(
        cls, superlink: str, ca_cert: str | None, insecure: bool, home: str | Path, out: Callable[[str], None] = print
    ) -> Connection:
        if insecure:
            if ca_cert:
                raise ConfigError("Both --ca and --insecure given: choose one (TLS with --ca is the default).")
            out(INSECURE_WARNING)
            return cls(superlink, None, Path(home).expanduser().resolve())
        if not ca_cert:
            raise ConfigError(
                "No CA certificate: pass --ca <ca.crt> (the CA that signed the coordinator's certificate; "
                "`python scripts/make_certs.py` makes one for tests), or --insecure for a plaintext test setup."
            )
        ca = Path(ca_cert).expanduser().resolve()
        if not ca.is_file():
            raise ConfigError(f"--ca {ca}: no such file. Copy the coordinator's ca.crt here, or fix the path.")
        return cls(superlink, ca, Path(home).expanduser().resolve())

    def control(self) -> FlowerControl:
        return FlowerControl(self.home, self.superlink, self.ca_cert)


# -- the coordinator ---------------------------------------------------------------------------


def start_coordinator(
    home: Path,
    *,
    certs: Path | None,
    insecure: bool,
    host: str,
    port: int,
    model_cache: Path | str = "~/.cache/fedsov",
    out: Callable[[str], None] = print,
) -> LocalSuperLink:
    """Start the SuperLink (not waiting for it to end); runs live under `home`, models in `model_cache`."""
    home = home.expanduser().resolve()
    if insecure:
        if certs:
            raise ConfigError("Both --certs and --insecure given: choose one (TLS is the default).")
        out(INSECURE_WARNING)
        tls = None
    else:
        if certs is None:
            raise ConfigError(
                "The coordinator needs TLS files: pass --certs <dir> holding ca.crt, server.crt and server.key "
                "(`python scripts/make_certs.py --out <dir> --host <this machine's name or IP>` makes them), "
                "or --insecure for a plaintext test setup."
            )
        tls = TlsFiles.in_dir(certs.expanduser().resolve())
        tls.check(server=True)
    superlink = LocalSuperLink(
        home / "flower-home",
        home / "logs" / "superlink.log",
        simulation=False,
        host=host,
        port=port,
        tls=tls,
        node_auth=not insecure,
        database=home / "superlink.db",
    )
    from server.app import MODEL_CACHE_ENV, RUNS_DIR_ENV

    cache = Path(model_cache).expanduser().resolve()
    superlink.start(extra_env={RUNS_DIR_ENV: str(home / "runs"), MODEL_CACHE_ENV: str(cache)})
    try:
        out(
            f"Coordinator (Flower SuperLink) listening on {host}:{superlink.port}, "
            f"{'TLS + node authentication' if tls else 'INSECURE'}; runs in {home / 'runs'}; log {superlink.log_path}"
        )
    except BaseException:  # a closed stdout or a Ctrl-C here must not leave the SuperLink running
        superlink.stop()
        raise
    return superlink


def serve_coordinator(superlink: LocalSuperLink, out: Callable[[str], None] = print) -> int:
    """Keep the coordinator up until Ctrl-C / SIGTERM, then stop every process it started."""
    try:
        while True:
            if not superlink.alive():
                out(f"The SuperLink exited (code {superlink.process.returncode}); see {superlink.log_path}.")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (fedsov's main raises it for both): the way to stop
        out("Stopping the coordinator ...")
    finally:
        superlink.stop()
    out("Coordinator stopped.")
    return 0


# -- runs ----------------------------------------------------------------------------------------


def submit_run(
    connection: Connection, overrides: Sequence[str], out: Callable[[str], None] = print, config_dir: Path | None = None
) -> tuple[int, FedsovConfig]:
    cfg = resolve_run_config(overrides, config_dir)
    staging = connection.home / "submitted" / Path(cfg.run_dir).name
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "config.yaml").write_text(config_to_yaml(cfg))
    app_dir = write_flower_app(staging / "flower-app")
    run_config = write_run_config(staging / "flower-run-config.toml", cfg)
    run_id = connection.control().submit(app_dir, run_config)
    out(f"Submitted Flower run {run_id} (fedsov run {Path(cfg.run_dir).name}) to {connection.superlink}.")
    return run_id, cfg


STATUS_EVERY_S, LOCAL_POLL_S = 15.0, 0.5


@dataclass
class LocalRunFiles:
    """A run directory on this machine, for watch_run: the events after `skip` are this run's."""

    run_dir: Path
    skip: int
    alive: Callable[[], bool]  # the SuperLink process; when it is gone, Flower's status says why at once

    def events(self) -> list[dict]:
        return RunDirectory(self.run_dir).read_events() if (self.run_dir / "events.jsonl").exists() else []


def watch_run(
    connection: Connection,
    run_id: int,
    cfg: FedsovConfig | None = None,
    out: Callable[[str], None] = print,
    poll_s: float = 3.0,
    timeout_s: float | None = None,
    on_event: Callable[[dict], None] | None = None,
    local: LocalRunFiles | None = None,
) -> RunStatus:
    """Print the run's progress events as they appear; return its final status from Flower.

    Remotely the events come from the run's Flower log, the whole log at each read. Where the run directory is
    on this machine (`local`) its events file is read instead, and Flower's status only every STATUS_EVERY_S,
    when the run says it ended, or when the SuperLink process is gone.
    """
    control = connection.control()
    seen = local.skip if local else 0
    started = last_status = time.monotonic()
    ended = False
    while True:
        if local is None:
            status = control.status(run_id)
            events = parse_events(control.logs(run_id))
        else:
            events = local.events()
            # Once the run says it ended, ask Flower each time until it agrees (its ServerApp is still exiting).
            ended = ended or any(e["event"] in ("run_finished", "run_failed") for e in events[seen:])
            if ended or not local.alive() or time.monotonic() - last_status > STATUS_EVERY_S:
                status, last_status = control.status(run_id), time.monotonic()
            else:  # not asked this time: the last answer was "running", or nothing has been asked yet
                status = RunStatus(run_id, "running", "")
        for event in events[seen:]:
            if cfg is None and event["event"] == "run_config":
                from common.config import config_from_json

                cfg = config_from_json(json.dumps(event["config"]))
            if on_event is not None:
                on_event(event)
            line = render_event(event, cfg) if cfg is not None else None
            if line:
                out(line)
            if event["event"] == "run_finished" and event.get("result") and cfg is not None:
                out(render_summary(event["result"], cfg, time.monotonic() - started))
        seen = len(events)
        if status.finished:
            return status
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise FederationError(f"Run {run_id} did not finish within {timeout_s:.0f}s (status {status.status}).")
        time.sleep(LOCAL_POLL_S if local else poll_s)


def run_outcome(status: RunStatus, run_dir: Path | None, out: Callable[[str], None]) -> int:
    """Exit code from Flower's real status (never from `flwr run`'s), with the reason on failure."""
    if status.completed:
        if run_dir is not None and (run_dir / "report" / "privacy-report.json").exists():
            report = json.loads((run_dir / "report" / "privacy-report.json").read_text())
            out(render_report_lines(report, RunDirectory(run_dir)))
        summary = RunDirectory(run_dir).read_summary() if run_dir is not None else None
        code, lines = partial_verdict(summary or {})
        for line in lines:
            out(line)
        return code
    reason = status.details
    if run_dir is not None and (run_dir / "events.jsonl").exists():
        failure = next((e for e in reversed(RunDirectory(run_dir).read_events()) if e["event"] == "run_failed"), None)
        reason = failure["error"] if failure else reason
    out(f"Run FAILED ({status.status}): {reason}")
    return 1


def fetch_outputs(runs_dir: Path, run_name: str, dest: Path, out: Callable[[str], None] = print) -> Path:
    """Copy a finished run's outputs (adapter + manifest, report, metrics, summary, config) to `dest`.

    Run on the coordinator machine (its runs folder); from elsewhere copy the same folder with
    your usual tools (scp/rsync): fedsov adds no file transport of its own.
    """
    run = RunDirectory(runs_dir.expanduser() / run_name)
    if not run.config_path.exists():
        known = sorted(p.name for p in runs_dir.expanduser().glob("*") if (p / "config.yaml").exists())
        raise ConfigError(f"No run '{run_name}' in {runs_dir}. Runs there: {', '.join(known) or 'none'}.")
    if not run.summary_path.exists():
        raise FederationError(
            f"Run {run_name} has no summary yet: it is still running or it failed (see {run.events_path})."
        )
    dest = writable_folder(dest.expanduser().resolve() / run_name, "--to <folder>")
    for name in ("adapter", "report"):
        if (run.path / name).exists():
            shutil.copytree(run.path / name, dest / name, dirs_exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "events.jsonl", "audit-results.json", "audit.jsonl"):
        if (run.path / name).exists():
            shutil.copy2(run.path / name, dest / name)
    out(f"Outputs of run {run_name} copied to {dest}")
    return dest


# -- everything on this machine ----------------------------------------------------------------


class LocalDeployment:
    """Coordinator + one SuperNode per configured client, as separate processes on this machine.

    The same pieces a multi-machine deployment uses (a fresh local CA, one registered key per
    node); every process is stopped by its own process group on exit. `node_superlink` lets a
    test put something (a recording proxy) between the nodes and the SuperLink.
    """

    def __init__(
        self,
        overrides: Sequence[str],
        out: Callable[[str], None] = print,
        *,
        insecure: bool = False,
        config_dir: Path | None = None,
        node_superlink: Callable[[str], str] | None = None,
    ):
        self.cfg = resolve_run_config(overrides, config_dir)
        self.overrides = [*overrides, f"run_dir={self.cfg.run_dir}"]
        self.out, self.insecure, self.config_dir = out, insecure, config_dir
        self.root = Path(self.cfg.workdir) / "deployment"
        self.certs = self.root / "certs"
        self.coordinator_home = self.root / "coordinator"
        self.run_dir = self.coordinator_home / "runs" / Path(self.cfg.run_dir).name
        self.node_superlink = node_superlink or (lambda address: address)
        self.superlink: LocalSuperLink | None = None
        self.nodes: dict = {}
        self.connection: Connection | None = None

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        from common.data.prepare import ensure_synthetic_data
        from common.model.loading import resolve_model_path

        cfg, out = self.cfg, self.out
        writable_folder(cfg.workdir, "workdir=<folder>")
        ensure_synthetic_data(cfg, log=lambda m: out(f"  {m}"))
        resolve_model_path(cfg.model, log=lambda m: out(f"  {m}"))
        if not self.insecure and not (self.certs / "server.crt").exists():
            make_certificates(self.certs, ["localhost", "127.0.0.1"], force=True)  # this deployment's own CA
        self.superlink = start_coordinator(
            self.coordinator_home,
            certs=None if self.insecure else self.certs,
            insecure=self.insecure,
            host="127.0.0.1",
            port=0,
            model_cache=cfg.model.cache_dir,
            out=out,
        )
        self.connection = Connection(
            self.superlink.address, None if self.insecure else self.certs / "ca.crt", self.root / "cli"
        )
        self.write_roster()
        for region in cfg.regions.values():
            for index in range(region.clients):
                self.start_node(region.name, index)
        for node in self.nodes.values():
            node.wait_connected()
        out(f"  {len(self.nodes)} regional SuperNodes connected; logs in {self.root / 'logs'}")

    def write_roster(self) -> None:
        """Every local node's identity key in one roster, as each region's operator would install it."""
        from common.secagg.identity import Identity, add_to_roster

        for region in self.cfg.regions.values():
            for index in range(region.clients):
                name = f"{region.name}-{index + 1}"
                identity = Identity.load_or_create(self.root / "keys" / name)
                add_to_roster(self.root / "roster.json", name, region.name, identity.public_key)

    def start_node(self, region: str, index: int):
        """Start (or restart, with the same key and state) one regional SuperNode."""
        from client.supernode import SuperNodeProcess

        name = f"{region}-{index + 1}"
        key = None
        if not self.insecure:
            key = self.certs / "nodes" / name
            if not key.exists():
                make_node_key(key)
                register_node(self.connection, key.with_name(key.name + ".pub"), self.out)
        node = SuperNodeProcess(
            superlink=self.node_superlink(self.superlink.address),
            node_config=local_node_config(self.cfg, region, index, self.cfg.regions[region].clients, self.root, name),
            log_path=self.root / "logs" / f"supernode-{name}.log",
            ca_cert=None if self.insecure else self.certs / "ca.crt",
            private_key=key,
        )
        node.start(self.root / "nodes" / name / "flower-home")
        self.nodes[name] = node
        return node

    def run(self, on_event: Callable[[dict], None] | None = None) -> int:
        """Submit the federation, follow it, return the exit code from Flower's real status."""
        # The run directory is on this machine: its events file is read, not Flower's whole log every few seconds.
        if self.superlink is None:
            raise FederationError("The coordinator is not started: use LocalDeployment as a context manager.")
        local = LocalRunFiles(self.run_dir, 0, self.superlink.alive)
        local.skip = len(local.events())  # a resumed run's earlier sessions
        run_id, cfg = submit_run(self.connection, self.overrides, self.out, self.config_dir)
        status = watch_run(self.connection, run_id, cfg, self.out, on_event=on_event, local=local)
        self.connection.control().save_logs(run_id, self.root / "logs" / f"flower-run-{run_id}.log")
        code = run_outcome(status, self.run_dir, self.out)
        self.out(f"Run directory: {self.run_dir}")
        return code

    def stop(self) -> None:
        with signals_deferred():  # a second Ctrl-C must not leave the rest running
            for node in self.nodes.values():
                node.stop()
            if self.superlink is not None:
                self.superlink.stop()


def local_deployment(
    overrides: Sequence[str],
    out: Callable[[str], None] = print,
    *,
    insecure: bool = False,
    config_dir: Path | None = None,
) -> int:
    """`fedsov deploy local`: the whole deployment on this machine, one command."""
    with LocalDeployment(overrides, out, insecure=insecure, config_dir=config_dir) as deployment:
        return deployment.run()


def local_node_config(cfg: FedsovConfig, region: str, index: int, clients: int, root: Path, name: str) -> dict:
    """What `fedsov node start` would pass for this node, for a node on this machine."""
    import os

    from common.config import CONFIG_DIR_ENV, DataSource

    data = cfg.regions[region].data
    synthetic = data.source == DataSource.synthetic
    paths = [str(Path(cfg.data.root) / region)] if synthetic else list(data.paths)
    from common.config import default_config_dir
    from common.coordinator_pins import local_jurisdiction

    node_config = {
        "region": region,
        "name": name,
        "data-path": ":".join(paths),
        "state-dir": str(root / "nodes" / name / "state"),
        "key-dir": str(root / "keys" / name),
        "roster": str(root / "roster.json"),
        # The nodes of a region split one data folder here: they share its ledger.
        "ledger-dir": str(root / "ledgers" / region),
        "ledger-key-dir": str(root / "keys" / f"ledger-{region}"),
        # The coordinator runs on this machine: the node's `local` pin says where that is.
        "coordinator-jurisdiction": local_jurisdiction(default_config_dir()),
        "synthetic-data": synthetic,
        # The region's attestation for its plain-text files, as `node start --plain-text-consent` passes it.
        "plain-text-consent": data.plain_text_consent,
        "client-index": index,
        "num-clients": clients,
        "model-cache": cfg.model.cache_dir,
        "threads": cfg.simulation.client_cpus,
    }
    if os.environ.get(CONFIG_DIR_ENV):  # policies from the same configs folder this command uses
        node_config["config-dir"] = os.environ[CONFIG_DIR_ENV]
    return node_config


def register_node(connection: Connection, public_key: Path, out: Callable[[str], None] = print) -> int:
    if not public_key.is_file():
        raise ConfigError(f"{public_key}: no such public key. Make a node key with `fedsov node key --out <path>`.")
    node_id = connection.control().register_node(public_key)
    out(f"  registered node key {public_key.name} (node id {node_id})")
    return node_id
