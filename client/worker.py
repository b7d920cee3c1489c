"""A regional node's warm worker: one long-lived process runs every message its SuperNode receives.

Flower 1.42 starts a `flwr-clientapp` process per message (ten per node and round with secure
aggregation), and each one imports torch and reloads the model, the data and the start checks.
Here the SuperNode runs with `--isolation process`: it starts no process of its own, and this
worker claims its tasks from the SuperNode's Runtime API (loopback; `AcquireTask` signed with the
SuperExec secret, which only this mode enforces) and runs fedsov's ClientApp in-process with the
helpers Flower's own `flwr-clientapp` uses (`pull_task_input`, `push_message`, `push_task_output`).
As there, each task's context comes from the SuperNode and goes back with the reply, so what a node
keeps between the messages of a run (its secure-aggregation session) lives where Flower keeps it.
The node's caches (`client.app`, `client.node`) live as long as the worker: the node starts once
per run and policy version, the model loads once.

Why not a thin ClientApp talking to a node-local trainer service over a socket (public API only):
it would still start a Flower process per message (the imports alone cost about a second each),
add a second local protocol to secure, and leave task tokens on command lines. These helpers are
internal to Flower: fedsov pins `flwr==1.42.*`, and tests/test_warm_worker.py checks the contract.

Only fedsov's installed ClientApp runs here: a run whose app bundle names another ClientApp is
refused, and nothing from a bundle is installed or imported. A worker that dies is restarted by
its supervisor (`WorkerProcess`); a task it left unfinished is answered with an error at the next
start (its token is kept, mode 0600, in the node's state folder while the task runs), so the
coordinator learns at once instead of after Flower's 60-second heartbeat timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from common.flowerproc import ActivityPoll, retry_objects_sooner

ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
TASK_FILE = "worker-task.json"  # the task in flight: token and message header (no content), 0600
# Claim tasks every FAST_POLL_S while messages came within ACTIVE_WINDOW_S (a run's next stage is on its
# way), else every IDLE_POLL_S (SuperExec's own pace). Each poll is one loopback HTTP request of about 2 ms
# of CPU: at 0.1 s, a node spends 2% of a core on it while a run is active, and a message waits 50 ms on average.
FAST_POLL_S, IDLE_POLL_S, ACTIVE_WINDOW_S = 0.1, 1.0, 60.0
# A worker that dies sooner than this after starting is restarted after a growing pause (at most 30 s).
CRASH_LOOP_S = 10.0


class WorkerStopping(BaseException):
    """SIGTERM or SIGINT: answer the message in flight with an error, then exit."""


def runtime_client(address: str, *interceptors):
    """A Runtime API client without Flower's retry invoker, which SIGINTs its own process on a 401."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
    )


class Worker:
    """Claims the SuperNode's tasks one at a time and answers each with fedsov's ClientApp."""

    def __init__(self, runtime: str, secret: bytes, state_dir: Path, log: Callable[[str], None] = print):
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

        self.runtime, self.state_dir, self.log = runtime, state_dir, log
        self.task_file = state_dir / TASK_FILE
        self.acquirer = runtime_client(
            runtime, SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK})
        )
        self.poll = ActivityPoll(FAST_POLL_S, IDLE_POLL_S, ACTIVE_WINDOW_S)
        self._apps: dict[str, str | None] = {}  # app bundle hash -> why it is refused (None: fedsov's)

    def serve(self) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while True:
            try:
                claimed = self.acquirer.AcquireTask(request)
            except httpx.TransportError:  # the SuperNode is starting or restarting
                time.sleep(IDLE_POLL_S)
                continue
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (401, 403):
                    raise SystemExit(
                        f"The SuperNode at {self.runtime} refused this worker's SuperExec secret "
                        f"(HTTP {err.response.status_code}): start both with the same secret file."
                    ) from err
                raise
            if claimed.HasField("task") and claimed.token:
                self.run_task(claimed.token)
                self.poll.active()
            else:
                time.sleep(self.poll.interval())

    def run_task(self, token: str) -> None:
        """One message, as `flwr-clientapp` runs it: pull, answer, push the reply and the updated context.

        A task ends only once it has a reply: a task finished without one would leave the SuperNode
        waiting for ever, while an unfinished one gets Flower's "stopped responding" reply in 60 s.
        """
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        from client.node import STARTS

        client = runtime_client(self.runtime, RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(_heartbeat(client))
        heartbeat.start()
        started, message, context, status, replied = time.monotonic(), None, None, SubStatus.FAILED, False
        try:
            message, context, _, fab = pull_task_input(client)
            self._keep_task(token, message)
            self.log(f"task started: {message.metadata.message_type} (round {message.metadata.group_id})")
            refused = self._app_refusal(fab)
            if refused:
                reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=refused), reply_to=message)
            else:
                reply = self._answer(message, context)
            push_message(client, reply, context)
            replied, status = True, SubStatus.FAILED if refused else SubStatus.COMPLETED
        except WorkerStopping:
            replied = self._reply_error(client, message, context, "the node is stopping; nothing was sent")
            raise
        except Exception as err:  # noqa: BLE001 - Flower I/O failed: this task fails, the worker serves on
            self.log(f"task failed: {type(err).__name__}: {err}")
            replied = self._reply_error(client, message, context, f"node worker error ({type(err).__name__})")
        finally:
            heartbeat.stop()  # before the task ends: a heartbeat for an ended task SIGINTs its sender
            if replied:
                self.task_file.unlink(missing_ok=True)  # nothing left to answer after a crash
                try:
                    push_task_output(client, context, status, "" if status == SubStatus.COMPLETED else "see worker log")
                finally:
                    client.close()
            else:
                client.close()
            meta = message.metadata if message is not None else None
            self.log(
                "task "
                + json.dumps(
                    {
                        "message_type": meta and meta.message_type,
                        "round": meta and meta.group_id,
                        "run_id": meta and meta.run_id,
                        "status": status if replied else "unanswered",
                        "seconds": round(time.monotonic() - started, 3),
                        "node_starts": STARTS["node"],
                        "model_loads": STARTS["model"],
                    }
                )
            )

    def _reply_error(self, client, message, context, reason: str) -> bool:
        """Answer `message` with an error instead of its reply; False when that fails too."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode
        from flwr.supernode.runtime.run_clientapp import push_message

        if message is None or context is None:
            return False
        try:
            push_message(
                client,
                Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message),
                context,
            )
        except Exception as err:  # noqa: BLE001 - left to Flower's heartbeat timeout
            self.log(f"could not answer the {message.metadata.message_type} with an error: {err}")
            return False
        return True

    def _answer(self, message, context):
        """fedsov's ClientApp answers; it turns its own errors into refusals, so anything here is Flower's."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        from client.app import app

        try:
            return app(message, context)
        except Exception as err:  # noqa: BLE001 - the text may carry data: it stays in the worker log
            self.log(f"ClientApp raised {type(err).__name__}: {err}")
            why = f"node error ({type(err).__name__}); details stay on the node"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=why), reply_to=message)

    def _app_refusal(self, fab) -> str | None:
        """None for fedsov's own app bundle; else why it is refused (this node runs no other code)."""
        from flwr.common.config import get_fab_config

        from common.runconfig import APP_PYPROJECT

        expected = APP_PYPROJECT["tool"]["flwr"]["app"]["components"]["clientapp"]
        if fab.hash_str not in self._apps:
            try:
                named = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]["clientapp"]
            except Exception:  # noqa: BLE001 - any unreadable bundle is simply not fedsov's
                named = None
            self._apps[fab.hash_str] = (
                None
                if named == expected
                else (
                    f"this node runs only fedsov's installed ClientApp ({expected}); the run's app bundle names "
                    f"{named!r}. Submit the run with `fedsov run submit`."
                )
            )
        return self._apps[fab.hash_str]

    def _keep_task(self, token: str, message) -> None:
        """Keep what a restarted worker needs to answer this task if this process dies: token and header."""
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto

        header = message_to_proto(remove_content_from_message(message)).SerializeToString()
        self.task_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.task_file.with_name(self.task_file.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"token": token, "message": header.hex()}, f)
        os.replace(tmp, self.task_file)

    def answer_abandoned_task(self) -> None:
        """A task the previous worker died in gets an error reply now (if its token is still valid)."""
        import httpx
        from flwr.app import Context, Error, Message, RecordDict
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.common.serde import message_from_proto
        from flwr.proto.message_pb2 import Message as MessageProto
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        if not self.task_file.exists():
            return
        kept = json.loads(self.task_file.read_text())
        self.task_file.unlink()
        message = message_from_proto(MessageProto.FromString(bytes.fromhex(kept["message"])))
        meta = message.metadata
        client = runtime_client(self.runtime, RuntimeTokenHttpInterceptor(kept["token"]))
        reason = "the node's worker stopped while handling this message and was restarted; nothing was sent"
        try:
            push_message(
                client,
                Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message),
                Context(
                    run_id=meta.run_id, node_id=meta.dst_node_id, node_config={}, state=RecordDict(), run_config={}
                ),
            )
            push_task_output(client, None, SubStatus.FAILED, reason)
            self.log(f"answered the unfinished {meta.message_type} (round {meta.group_id}) with an error")
        except httpx.HTTPError as err:  # its token expired (Flower answered "stopped responding"), or a new SuperNode
            self.log(
                f"left the unfinished {meta.message_type} (round {meta.group_id}) to Flower's heartbeat timeout "
                f"({type(err).__name__})"
            )
        finally:
            client.close()


def _heartbeat(client) -> Callable[[], bool]:
    """Flower's task heartbeat, minus the SIGINT it sends its own process when the task has ended."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError:
            return True  # the task is over (finished or expired): nothing to keep alive
        return True

    return beat


def _now() -> str:
    return datetime.now().isoformat(sep=" ", timespec="milliseconds")


def _stop(signum, frame) -> None:
    raise WorkerStopping()


def _exit_with_parent(parent: int) -> None:
    """The supervisor is gone (killed outright): stop as if it had stopped us."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", required=True, help="the SuperNode's Runtime API, host:port on loopback")
    parser.add_argument("--secret-file", required=True, type=Path, help="the SuperExec secret the SuperNode has")
    parser.add_argument("--state-dir", required=True, type=Path, help="the node's state folder")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from flwr.supernode.runtime import run_clientapp

    retry_objects_sooner(run_clientapp)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    worker = Worker(
        args.runtime,
        args.secret_file.read_bytes(),
        args.state_dir,
        log=lambda line: print(f"{_now()} {line}", flush=True),
    )
    try:
        worker.answer_abandoned_task()  # first: the coordinator is waiting for it
        # Imported before the first task so that no message waits for torch.
        import client.app  # noqa: F401
        import client.node  # noqa: F401

        worker.log(f"warm worker {os.getpid()} serving the SuperNode at {args.runtime}")
        worker.serve()
    except WorkerStopping:
        worker.log("warm worker stopped")
    return 0


@dataclass
class WorkerProcess:
    """The warm worker of one SuperNode, restarted whenever it exits until `stop()`."""

    runtime: str
    secret_file: Path
    state_dir: Path
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _watcher: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name=f"worker-{self.state_dir.name}", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "client.worker",
                    "--runtime",
                    self.runtime,
                    "--secret-file",
                    str(self.secret_file),
                    "--state-dir",
                    str(self.state_dir),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started = time.monotonic()

    def _watch(self) -> None:
        quick_exits = 0
        while not self._stopping.wait(0.2):
            code = self.process.poll() if self.process else None
            if code is None:
                continue
            lived = time.monotonic() - self._started
            quick_exits = quick_exits + 1 if lived < CRASH_LOOP_S else 0
            pause = min(30.0, 2.0**quick_exits) if quick_exits > 1 else 0.0
            with open(self.log_path, "a") as log:
                log.write(
                    f"{_now()} warm worker exited with code {code} after {lived:.0f} s; "
                    f"restarting{f' in {pause:.0f} s' if pause else ''}\n"
                )
            if self._stopping.wait(pause):
                return
            self._spawn()
            self.restarts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        from common.flowerproc import stop_process_group

        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.process is not None:
            stop_process_group(self.process, grace)


if __name__ == "__main__":
    sys.exit(main())
