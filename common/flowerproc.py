"""Flower's processes as fedsov starts them: the executables beside this Python, a safe
environment (offline, no telemetry, no runtime dependency installs), stopping everything a
process started (the SuperLink's simulation and Ray workers, a SuperNode's worker), and the
shorter waits that let one message follow another without Flower's per-process pauses.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil


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


# An object not there yet is asked for again after 20 ms, doubling up to 250 ms (Flower: 1 s doubling up to 10 s).
OBJECT_RETRY_S, OBJECT_RETRY_CAP_S = 0.02, 0.25
_PULL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("fedsov_pull_deadline", default=None)


def retry_objects_sooner(module) -> None:
    """Make the object pulls of a Flower module retry within milliseconds, in this process.

    A SuperNode offers a task before it has fetched the message's content from the SuperLink, and a reply
    shows at the SuperLink before its content: Flower's 1-2-4 s backoff, hidden while each message started
    a process, would be most of a warm message's time. (Internal to flwr 1.42; tests/test_warm_worker.py.)
    Inside `object_pulls_until`, a pull also gives up at that deadline.
    """
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        pull = getattr(module, name, None)
        if pull is not None and not getattr(pull, "fedsov_sooner", False):  # once per process
            setattr(module, name, _sooner(pull))


def _sooner(pull):
    @functools.wraps(pull)
    def sooner(*args, **kwargs):
        deadline = _PULL_DEADLINE.get()
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            kwargs["max_time"] = min(left, kwargs.get("max_time") or left)
        kwargs.setdefault("initial_backoff", OBJECT_RETRY_S)
        kwargs.setdefault("backoff_cap", OBJECT_RETRY_CAP_S)
        return pull(*args, **kwargs)

    sooner.fedsov_sooner = True  # type: ignore[attr-defined]
    return sooner


@contextlib.contextmanager
def object_pulls_until(deadline: float) -> Iterator[None]:
    """Object pulls in this block give up at `deadline` (time.monotonic()).

    Flower gives up on a reply whose content never comes after 500 tries: 125 s at our retry pace. A node
    that dies between announcing its reply and uploading it would hold the coordinator that long, whatever
    the stage's timeout, and the other nodes' replies with it.
    """
    token = _PULL_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _PULL_DEADLINE.reset(token)


class ActivityPoll:
    """How long to wait before the next poll: short while a run is active (something came within `window`
    seconds), Flower's own pace otherwise."""

    def __init__(self, fast: float, idle: float, window: float):
        self.fast, self.idle, self.window = fast, idle, window
        self._last: float | None = None

    def active(self) -> None:
        self._last = time.monotonic()

    def interval(self) -> float:
        recent = self._last is not None and time.monotonic() - self._last < self.window
        return self.fast if recent else self.idle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, so a second one cannot cut a clean-up short."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_process_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the process and everything it started: SIGTERM every process group in its tree, then SIGKILL.

    Flower's SuperLink starts its SuperExec in a session of its own, and the SuperExec starts the
    simulation and Ray there: stopping the SuperLink's group alone leaves them running. The tree is
    read before anything is signalled, because a process whose parent dies loses its place in it.
    """
    with signals_deferred():
        descendants = _descendants(process.pid)
        groups = {process.pid} | {g for g in map(_group_of, descendants) if g is not None}
        groups.discard(os.getpgrp())  # never this program's own group
        for group in groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        while any(_running(p) for p in descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        for p in descendants:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if process.poll() is None:
            process.wait(timeout=5)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _group_of(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
