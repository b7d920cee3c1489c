"""Starting a Flower SuperLink and driving it with the `flwr` CLI (submit, status, logs, stop).

Flower's engine does the transport and scheduling; this module only starts its processes,
passes them a safe environment, and reads run status the way `flwr ls` reports it (`flwr run
--stream` exits 0 even when a run fails, so status is always read back explicitly).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from common.errors import FederationError

CONNECTION = "fedsov"


def flower_bin(name: str) -> str:
    """A Flower executable from the same environment as this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: offline, no telemetry, no runtime installs."""
    env = dict(os.environ)
    # The SuperLink spawns flower-superexec / flwr-simulation by name: find them beside this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # The SuperLink would otherwise `uv sync` app dependencies (downloads) at run time.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunStatus:
    run_id: int
    status: str  # e.g. "running", "finished:completed", "finished:failed"
    details: str

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


class LocalSuperLink:
    """A SuperLink process this program started, stopped by its own process group."""

    def __init__(self, flwr_home: Path, log_path: Path, *, simulation: bool, extra_args: Sequence[str] = ()):
        self.flwr_home = flwr_home
        self.log_path = log_path
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flower_environment(flwr_home)
        self._args = [
            flower_bin("flower-superlink"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            *(["--simulation"] if simulation else []),
            *extra_args,
        ]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        log = open(self.log_path, "ab")
        # A new session: stopping the group also stops the simulation process and Ray it spawns.
        self.process = subprocess.Popen(self._args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FederationError(f"flower-superlink exited with code {self.process.returncode}; see {self.log_path}.")
            try:
                if httpx.get(f"http://{self.address}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise FederationError(f"flower-superlink did not become healthy within {timeout:.0f}s; see {self.log_path}.")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever the SuperLink left in its group (simulation process, Ray workers) goes too.
        _signal_group(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=5)

    # -- the flwr CLI -------------------------------------------------------------------------
    def submit(self, app_dir: Path, run_config: Path, federation_config: dict[str, Any]) -> int:
        fed = " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())
        args = ["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"]
        if fed:
            args += ["--federation-config", fed]
        out = self._flwr(args)
        if not out.get("success") or not out.get("run-id"):
            raise FederationError(f"flwr run did not start the run: {out.get('error-message', out)}")
        return int(out["run-id"])

    def status(self, run_id: int) -> RunStatus:
        out = self._flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
        runs = out.get("runs") or []
        if not out.get("success") or not runs:
            raise FederationError(f"flwr ls could not read run {run_id}: {out.get('error-message', out)}")
        run = runs[0]
        return RunStatus(run_id, str(run.get("status", "")), str(run.get("status-details", "")))

    def save_logs(self, run_id: int, path: Path) -> None:
        result = subprocess.run(
            [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--show"],
            env=self.env, capture_output=True, text=True, timeout=120,
        )
        path.write_text(result.stdout + result.stderr)

    def _flwr(self, args: list[str]) -> dict[str, Any]:
        result = subprocess.run([flower_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=180)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as err:
            raise FederationError(
                f"`flwr {' '.join(args[:2])}` gave no JSON (exit {result.returncode}): {result.stdout[-500:]} {result.stderr[-500:]}"
            ) from err


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
