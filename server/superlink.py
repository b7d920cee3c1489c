"""Starting a Flower SuperLink and driving it: `flwr run` and `flwr supernode` submit runs and register nodes;
status, logs and stop are Control API requests made in this process, as the flwr CLI makes them.

Flower's engine does the transport and scheduling; this module only starts its processes,
passes them a safe environment, and reads run status from the Control API as `flwr ls` does (`flwr run
--stream` exits 0 even when a run fails, so status is always read back explicitly).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.credentials import TlsFiles
from common.errors import FederationError
from common.flowerproc import flower_bin, flower_environment, free_port, stop_process_group

CONNECTION = "fedsov"


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


class FlowerControl:
    """One SuperLink's Control API: the `flwr` CLI with its own FLWR_HOME, and the CLI's client in this process."""

    def __init__(self, home: Path, address: str, ca_cert: Path | None):
        self.home = home
        self.address = address
        self.ca_cert = ca_cert
        self._api = None  # Flower's Control API client, made at the first request
        self.env = flower_environment(home)
        home.mkdir(parents=True, exist_ok=True)
        # Flower 1.42 reads connections from $FLWR_HOME/config.toml only.
        security = f'root-certificates = "{ca_cert.resolve()}"' if ca_cert else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n'
        )

    def submit(self, app_dir: Path, run_config: Path, federation_config: dict[str, Any] | None = None) -> int:
        fed = " ".join(f"{k}={json.dumps(v)}" for k, v in (federation_config or {}).items())
        args = ["run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--format", "json"]
        if fed:
            args += ["--federation-config", fed]
        out = self._flwr(args)
        if not out.get("success") or not out.get("run-id"):
            raise FederationError(f"flwr run did not start the run: {out.get('error-message', out)}")
        return int(out["run-id"])

    def status(self, run_id: int) -> RunStatus:
        from flwr.proto.control_pb2 import ListRunsRequest

        response = self._call("read run", run_id, lambda api: api.ListRuns(ListRunsRequest(run_id=run_id)))
        run = response.run_dict.get(run_id)
        if run is None:
            raise FederationError(f"The SuperLink at {self.address} has no run {run_id}.")
        status = run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
        return RunStatus(run_id, status, run.status.details)

    def logs(self, run_id: int) -> str:
        """Everything the run's ServerApp has logged so far (what `flwr log --show` prints)."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        def first_reply(api) -> str:
            # The SuperLink's first reply holds the whole log so far; later ones would wait for more.
            for reply in api.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
                return reply.log_output
            return ""

        return self._call("read the log of run", run_id, first_reply)

    def save_logs(self, run_id: int, path: Path) -> None:
        from server.rundir import OUTPUT_LINE

        # The outputs a coordinator published in the log are in the run directory already: keep the log readable.
        lines = [line for line in self.logs(run_id).splitlines() if OUTPUT_LINE not in line]
        path.write_text("\n".join(lines) + "\n")

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        response = self._call("stop run", run_id, lambda api: api.StopRun(StopRunRequest(run_id=run_id)))
        if not response.success:
            raise FederationError(f"The SuperLink at {self.address} did not stop run {run_id}.")

    def _call(self, what: str, run_id: int, call):
        """One Control API request from this process, as `flwr ls`, `log` and `stop` make it.

        A `flwr` process per request costs about a second of CPU, and a run is watched every few seconds. The
        client and the error handling are the flwr CLI's own (internal to flwr 1.42, pinned)."""
        import click
        from flwr.cli.utils import flwr_cli_exc_handler

        if self._api is None:
            from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            self._api = ControlHttpClient.from_server_address(
                server_address=self.address,
                insecure=self.ca_cert is None,
                root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
                interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
            )
        try:
            with flwr_cli_exc_handler():
                return call(self._api)
        except click.ClickException as err:
            raise FederationError(f"Could not {what} {run_id} at the SuperLink {self.address}: {err.message}") from None

    def register_node(self, public_key: Path) -> int:
        out = self._flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"])
        if not out.get("success") or "node-id" not in out:
            raise FederationError(
                f"Registering {public_key} with the SuperLink failed: {out.get('error-message', out)}"
            )
        return int(out["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        out = self._flwr(["supernode", "ls", CONNECTION, "--format", "json"])
        if not out.get("success"):
            raise FederationError(f"Listing SuperNodes failed: {out.get('error-message', out)}")
        return list(out.get("nodes") or [])

    def _flwr(self, args: list[str]) -> dict[str, Any]:
        result = subprocess.run([flower_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=180)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as err:
            raise FederationError(
                f"`flwr {' '.join(args[:2])}` gave no JSON (exit {result.returncode}): "
                f"{result.stdout[-500:]} {result.stderr[-500:]}"
            ) from err


class LocalSuperLink:
    """A SuperLink process this program started, stopped by its own process group.

    `tls=None` means plaintext, which only simulation (loopback) and explicitly insecure test
    deployments use; node authentication needs TLS in Flower and is on for deployments.
    """

    def __init__(
        self,
        flwr_home: Path,
        log_path: Path,
        *,
        simulation: bool,
        host: str = "127.0.0.1",
        port: int | None = None,
        tls: TlsFiles | None = None,
        node_auth: bool = False,
        database: Path | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.flwr_home = flwr_home
        self.log_path = log_path
        self.host = host
        self.port = port or free_port()
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.address = f"{connect_host}:{self.port}"
        self.tls = tls
        self.env = flower_environment(flwr_home)
        security = (
            [
                "--ssl-ca-certfile",
                str(tls.ca_cert),
                "--ssl-certfile",
                str(tls.server_cert),
                "--ssl-keyfile",
                str(tls.server_key),
            ]
            if tls
            else ["--insecure"]
        )
        self._args = [
            flower_bin("flower-superlink"),
            "--host",
            host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
            *(["--simulation"] if simulation else []),
            *security,
            *(["--enable-supernode-auth"] if node_auth else []),
            # On disk, node registrations and run states survive a coordinator restart.
            *(["--database", str(database)] if database else []),
            *extra_args,
        ]
        self.process: subprocess.Popen | None = None
        self.control = FlowerControl(flwr_home, self.address, tls.ca_cert if tls else None)

    def start(self, timeout: float = 60.0, extra_env: dict[str, str] | None = None) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**self.env, **(extra_env or {})}
        # A new session: stopping the group also stops the simulation process and Ray it spawns.
        self.process = subprocess.Popen(
            self._args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        import httpx

        scheme = "https" if self.tls else "http"
        verify: Any = str(self.tls.ca_cert) if self.tls else True
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise FederationError(
                        f"flower-superlink exited with code {self.process.returncode}; see {self.log_path}."
                    )
                try:
                    if httpx.get(f"{scheme}://{self.address}/health", timeout=1.0, verify=verify).is_success:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            raise FederationError(
                f"flower-superlink did not become healthy within {timeout:.0f}s; see {self.log_path}."
            )
        except BaseException:  # also Ctrl-C or SIGTERM while waiting: nothing started here may outlive it
            self.stop()
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.process is None:
            return
        stop_process_group(self.process, grace)

    # The simulation launcher's shorthands for the Control API.
    def submit(self, app_dir: Path, run_config: Path, federation_config: dict[str, Any]) -> int:
        return self.control.submit(app_dir, run_config, federation_config)

    def status(self, run_id: int) -> RunStatus:
        return self.control.status(run_id)

    def save_logs(self, run_id: int, path: Path) -> None:
        self.control.save_logs(run_id, path)
