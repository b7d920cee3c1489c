"""Starting a regional node on Flower's deployment engine: a SuperNode with fedsov's node config.

`fedsov node start` first runs every start check itself (policy vs region, residency of each
data file and record, ledger integrity, model), so a node with the wrong data never even
connects; then it hands over to `flower-supernode` and the node's warm worker (`client.worker`),
which answers every message in one long-lived process. It finds the node's data, policy and
state through `--node-config`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.worker import WorkerProcess
from common.errors import ConfigError, FederationError
from common.flowerproc import flower_environment, free_port, stop_process_group
from common.paths import writable_folder

# flower-supernode's exit code when the SuperLink refuses its key (Flower's ExitCode).
NODE_NOT_REGISTERED = 305
SUPEREXEC_SECRET_FILE = "superexec.secret"


def node_config_string(values: Mapping[str, Any]) -> str:
    """Flower's --node-config: space-separated TOML key=value pairs."""
    import tomli_w

    parts = []
    for key, value in values.items():
        if value is None:
            continue
        text = tomli_w.dumps({"k": value}).strip()  # 'k = "value"' with TOML quoting
        parts.append(f"{key}={text.split('=', 1)[1].strip()}")
    return " ".join(parts)


@dataclass
class SuperNodeProcess:
    """One `flower-supernode` started by this program, stopped by its process group."""

    superlink: str
    node_config: dict[str, Any]
    log_path: Path
    ca_cert: Path | None = None  # None: plaintext (explicit insecure mode only)
    private_key: Path | None = None
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Flower retries forever by default; a node started next to its coordinator should say when it cannot reach
    # it. None: retry forever, as a plain SuperNode does (`node start`, which may start before its coordinator).
    max_wait_s: float | None = 600.0
    process: subprocess.Popen | None = None
    worker: WorkerProcess | None = None
    _log_offset: int = field(default=0, repr=False)  # where this start's lines begin in the shared log

    def args(self, secret_file: Path) -> list[str]:
        if self.ca_cert is None and self.private_key is not None:
            raise ConfigError("Node authentication needs TLS in Flower: give the CA certificate, or drop the key.")
        security = ["--root-certificates", str(self.ca_cert)] if self.ca_cert else ["--insecure"]
        auth = ["--auth-supernode-private-key", str(self.private_key)] if self.private_key else []
        return [
            # Flower's flower-supernode, polling sooner while a run is active (client.supernode_loop).
            sys.executable,
            "-m",
            "client.supernode_loop",
            "--superlink",
            self.superlink,
            *security,
            *auth,
            # The node's warm worker, not a process per message, runs the ClientApp (client.worker); only
            # this mode makes the Runtime API, which stays on loopback, require the worker's secret.
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(secret_file),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--node-config",
            node_config_string(self.node_config),
            *(["--max-wait-time", f"{self.max_wait_s:g}"] if self.max_wait_s is not None else []),
        ]

    def start(self, flwr_home: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The log is appended to across restarts: only this start's lines count.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.port = self.port or free_port()
        state_dir = Path(str(self.node_config.get("state-dir") or flwr_home))
        secret_file = write_secret(state_dir / SUPEREXEC_SECRET_FILE)
        env = {**flower_environment(flwr_home), **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args(secret_file), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.worker = WorkerProcess(
            f"127.0.0.1:{self.port}", secret_file, state_dir, self.log_path.with_suffix(".worker.log"), env
        )
        self.worker.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_connected(self, timeout: float = 60.0) -> None:
        """Until the SuperNode logs its node id; fail with the reason when it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_since_start()
            # Flower prints the node id only once the SuperLink accepted the node; a refused node
            # logs its exit code first (and may still start its SuperExec on the way out).
            if "Exit Code:" in text:
                self.stop(grace=2)
                raise FederationError(
                    refusal_reason(self.process.returncode if self.process else None, text, self.log_path)
                )
            if "SuperNode ID:" in text:
                return
            if not self.alive():
                raise FederationError(
                    refusal_reason(self.process.returncode if self.process else None, text, self.log_path)
                )
            time.sleep(0.3)
        raise FederationError(f"The SuperNode did not connect within {timeout:.0f}s; see {self.log_path}.")

    def log_since_start(self) -> str:
        """What this start of the SuperNode has logged (the log file is shared across restarts)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def stop(self, grace: float = 10.0) -> None:
        # The worker first: it answers the message in flight with an error while the SuperNode can still send it.
        if self.worker is not None:
            self.worker.stop(grace)
        if self.process is not None:
            stop_process_group(self.process, grace)


def wait_for_coordinator(
    supernode: SuperNodeProcess, address: str, out=print, first_s: float = 5.0, every_s: float = 60.0
) -> None:
    """Until the SuperLink accepts the node; a coordinator not up yet is waited for (Ctrl-C stops), a refusal raises."""
    started = time.monotonic()
    timeout = first_s
    while True:
        try:
            supernode.wait_connected(timeout=timeout)
            return
        except FederationError:
            if not supernode.alive():  # refused, or flower-supernode gave up: the reason is in the error
                raise
        out(
            f"Waiting for the coordinator at {address} ({(time.monotonic() - started) / 60:.0f} min so far): it is "
            "not reachable yet and the node keeps trying. Ctrl-C stops the node."
        )
        timeout = every_s


def write_secret(path: Path) -> Path:
    """A fresh random SuperExec secret, readable by this user only: whoever holds it can claim the node's tasks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file keeps its mode under O_CREAT
        f.write(secrets.token_bytes(32))
    return path


def refusal_reason(code: int | None, log_text: str, log_path: Path) -> str:
    if f"Exit Code: {NODE_NOT_REGISTERED}" in log_text or code == NODE_NOT_REGISTERED:
        return (
            f"The coordinator refused this node: its public key is not registered (Flower exit code "
            f"{NODE_NOT_REGISTERED}). Register it on the coordinator with `fedsov coordinator register "
            f"<key>.pub`, then start the node again. Log: {log_path}"
        )
    return f"flower-supernode exited with code {code}; see {log_path}."


def node_config_from_args(args, state_dir: Path) -> dict[str, Any]:
    """The SuperNode's --node-config from `fedsov node start`'s (or `data check`'s) flags, paths absolute."""
    consent = None if args.plain_text_consent is None else args.plain_text_consent == "true"
    paths = [str(Path(p).expanduser().resolve()) for p in args.data.split(":") if p.strip()]
    if not paths:
        raise ConfigError(f"--data {args.data!r} names no file or folder; give the node's data paths, ':'-separated.")
    node_config = {
        "region": args.region,
        "data-path": ":".join(paths),
        "state-dir": str(state_dir),
        "name": getattr(args, "name", None),  # data check names its throwaway node itself
        "synthetic-data": bool(args.synthetic_data),
        "plain-text-consent": consent,
        "model-path": str(Path(args.model_path).expanduser().resolve()) if args.model_path else None,
        "model-cache": str(Path(args.model_cache).expanduser().resolve()),
        "config-dir": str(args.config_dir.resolve()) if args.config_dir else None,
        "key-dir": _absolute(getattr(args, "key_dir", None)),
        "ledger-dir": _absolute(getattr(args, "ledger_dir", None)),
        "ledger-key-dir": _absolute(getattr(args, "ledger_key_dir", None)),
        "roster": _absolute(getattr(args, "roster", None)),
    }
    return {k: v for k, v in node_config.items() if v is not None}


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def start_node(args, out=print) -> int:
    """`fedsov node start`: start checks here, then a SuperNode until Ctrl-C or the coordinator refuses it."""
    from client.datacheck import data_summary
    from client.node import RegionNode, deployment_settings
    from common.config import load_config
    from server.deployment import INSECURE_WARNING

    if args.insecure:
        if args.ca or args.key:
            raise ConfigError("--insecure with --ca/--key: choose one (TLS with node authentication is the default).")
        out(INSECURE_WARNING)
    else:
        missing = [flag for flag, value in (("--ca", args.ca), ("--key", args.key)) if not value]
        if missing:
            raise ConfigError(
                f"Missing {' and '.join(missing)}: a node connects with TLS (--ca <coordinator CA>) and "
                "authenticates with its registered key (--key <private key>, made by `fedsov node key`). "
                "Use --insecure only on a closed test network."
            )
        for path in (Path(args.ca), Path(args.key)):
            if not path.expanduser().is_file():
                raise ConfigError(f"{path}: no such file.")
    from common.config import default_config_dir
    from common.coordinator_pins import jurisdiction_for_ca, local_jurisdiction

    config_dir = args.config_dir.resolve() if args.config_dir else default_config_dir()
    state_dir = writable_folder(args.state_dir.expanduser().resolve(), "--state-dir <folder>")
    node_config = node_config_from_args(args, state_dir)
    # Where the coordinator is comes from this node's pins: the CA that authenticates it, or `local`.
    node_config["coordinator-jurisdiction"] = (
        local_jurisdiction(config_dir) if args.insecure else jurisdiction_for_ca(config_dir, Path(args.ca).expanduser())
    )
    settings = deployment_settings(load_config(args.overrides, args.config_dir), node_config)
    # Every start check runs before the node connects: wrong-region data never reaches the network.
    out(f"Start checks on {node_config['data-path']} (PII scrubbing reads every record: large data takes a while)")
    node = RegionNode(settings)
    out(f"Node {settings.name} ({settings.region}, {node.policy.law}): start checks passed: {node.data.counts}")
    for line in data_summary(node)[1:]:
        out(line)
    del node
    from client.settings import node_identity, node_roster

    out(f"Node identity key (for the federation roster): {node_identity(settings).public_key.hex()}")
    try:
        node_roster(settings)
    except ConfigError as err:  # the node still starts; it refuses secure-aggregation rounds until it is listed
        out(f"WARNING: {err}")
    supernode = SuperNodeProcess(
        superlink=args.superlink,
        node_config=node_config,
        log_path=state_dir / "logs" / "supernode.log",
        ca_cert=None if args.insecure else Path(args.ca).expanduser().resolve(),
        private_key=None if args.insecure else Path(args.key).expanduser().resolve(),
        max_wait_s=None,
    )
    try:
        supernode.start(state_dir / "flower-home")
        wait_for_coordinator(supernode, args.superlink, out)
        out(
            f"Connected to the coordinator at {args.superlink}; logs {supernode.log_path} and (the node's warm "
            f"worker) {supernode.worker.log_path}. Ctrl-C stops the node."
        )
        while supernode.alive():
            time.sleep(0.5)
        out(refusal_reason(supernode.process.returncode, supernode.log_since_start(), supernode.log_path))
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (fedsov's main raises it for both), even while connecting
        out("Stopping the node ...")
    finally:
        supernode.stop()
    out("Node stopped.")
    return 0
