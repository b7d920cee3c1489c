"""Flower's run verbs for a fedsov coordinator: `run stop`, `run logs`, `run pull` (`flwr stop`, `log`, `pull`).

All three go through the SuperLink's Control API, so they work from any machine holding the CA that can
reach it. Flower's own `flwr pull` needs an artifact provider, which the open-source SuperLink of 1.42
does not have ("initialized without artifact provider"); the one channel for data is the run's log. So a
coordinator started by `fedsov coordinator start` publishes a finished run's outputs into its Flower run
log (base64 chunks, each file with its SHA-256), and `run pull` reassembles and checks them. Anyone who may
read the run log (every CA holder) may read them: the same people whose nodes received the global adapter
every round.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import ConfigError, FederationError
from common.paths import writable_folder
from server.rundir import EVENT_LINE, OUTPUT_LINE, RunDirectory, parse_events

Out = Callable[[str], None]
# What a run's outputs are (as `run fetch` copies them), relative to its run directory.
OUTPUTS = (
    "adapter",
    "report",
    "tensorboard",
    ".hydra",
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "events.jsonl",
    "audit-results.json",
    "audit.jsonl",
)
CHUNK_BYTES = 48 * 1024  # 64 KiB of base64 per log line
# A run log lives in the SuperLink's database: larger outputs are left for `run fetch` on the coordinator.
MAX_PUBLISHED_BYTES = 32 * 1024 * 1024
# The ServerApp's log uploader sends every 0.2 s; what is printed last needs a moment before the process ends.
UPLOAD_GRACE_S = 2.0


def output_files(run: RunDirectory) -> list[Path]:
    files: list[Path] = []
    for name in OUTPUTS:
        path = run.path / name
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
    return files


def publish_outputs(run: RunDirectory, emit: Out = print) -> None:
    """Print the run's outputs into its Flower log (the ServerApp's stdout), for `fedsov run pull`."""
    published, skipped, total = 0, [], 0
    for path in output_files(run):
        data = path.read_bytes()
        name = path.relative_to(run.path).as_posix()
        if total + len(data) > MAX_PUBLISHED_BYTES:
            skipped.append(name)
            continue
        total += len(data)
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        emit(
            OUTPUT_LINE
            + json.dumps(
                {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunks": len(chunks)}
            )
        )
        for index, chunk in enumerate(chunks):
            emit(OUTPUT_LINE + json.dumps({"file": name, "chunk": index, "data": base64.b64encode(chunk).decode()}))
        published += 1
    emit(OUTPUT_LINE + json.dumps({"end": True, "run_dir": str(run.path), "files": published, "skipped": skipped}))
    time.sleep(UPLOAD_GRACE_S)


def collect_outputs(log_text: str) -> tuple[dict[str, bytes], dict] | None:
    """The files a run published in its log, each checked against its SHA-256, and the end record; None if the
    log holds no complete publication."""
    headers: dict[str, dict] = {}
    chunks: dict[str, dict[int, bytes]] = {}
    end = None
    for line in log_text.splitlines():
        at = line.find(OUTPUT_LINE)
        if at < 0:
            continue
        try:
            entry = json.loads(line[at + len(OUTPUT_LINE) :])
        except json.JSONDecodeError:
            continue  # a line cut by log shipping: the file it belongs to then fails its hash check below
        if entry.get("end"):
            end = entry
        elif "chunk" in entry:
            chunks.setdefault(entry["file"], {})[int(entry["chunk"])] = base64.b64decode(entry["data"])
        else:
            headers[entry["file"]] = entry
    if end is None:
        return None
    files = {}
    for name, header in headers.items():
        parts = chunks.get(name, {})
        data = b"".join(parts.get(i, b"") for i in range(header["chunks"]))
        if len(parts) != header["chunks"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
            raise FederationError(
                f"The run log holds a damaged copy of {name} (missing chunks or a wrong SHA-256): "
                "pull again, or copy the run from the coordinator with `fedsov run fetch`."
            )
        files[name] = data
    return files, end


def pull_outputs(control, run_id: int, dest: Path, out: Out = print, wait_s: float = 10.0) -> Path:
    """`fedsov run pull`: the outputs a finished run published in its log, written under dest/<run name>."""
    status = control.status(run_id)
    if not status.finished:
        raise FederationError(
            f"Run {run_id} is still {status.status}: pull it when it has finished "
            f"(`fedsov run watch {run_id} ...` follows it)."
        )
    deadline = time.monotonic() + wait_s
    while True:
        found = collect_outputs(control.logs(run_id))
        if found is not None or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # the last log lines may still be on their way from the ServerApp
    if found is None:
        raise FederationError(
            f"Run {run_id} ({status.status}) published no outputs in its log: only runs that reach their summary "
            "on a coordinator started by `fedsov coordinator start` do. On the coordinator machine, `fedsov run "
            "fetch <run name>` copies what the run directory holds."
        )
    files, end = found
    name = Path(end["run_dir"]).name
    target = writable_folder(dest.expanduser().resolve() / name, "--to <folder>")
    if any(target.iterdir()):
        raise ConfigError(f"{target} is not empty: pull into a new folder (--to), so old and new outputs never mix.")
    for relative, data in files.items():
        path = target / relative
        if target not in path.resolve().parents:
            raise FederationError(f"The run log names a file outside the run ({relative!r}); nothing more is written.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out(f"Pulled {len(files)} files of run {name} (Flower run {run_id}, {status.status}) into {target}")
    if end.get("skipped"):
        out(
            f"  not in the log (over {MAX_PUBLISHED_BYTES >> 20} MiB in all): {', '.join(end['skipped'])}; copy them "
            f"on the coordinator with `fedsov run fetch {name} --to <folder>`"
        )
    return target


def stop_run(control, run_id: int, out: Out = print) -> int:
    """`fedsov run stop`: stop a running run through the Control API (its checkpoints stay: resume it later)."""
    status = control.status(run_id)
    if status.finished:
        raise FederationError(f"Run {run_id} has already finished ({status.status}): there is nothing to stop.")
    control.stop_run(run_id)
    run_dir = next((e.get("run_dir") for e in parse_events(control.logs(run_id)) if e["event"] == "run_config"), None)
    out(
        f"Run {run_id} stopped."
        + (
            f" Its run directory on the coordinator, {run_dir}, keeps the last checkpoint: "
            f"continue it with `fedsov run submit ... resume={run_dir}` on the coordinator "
            "machine."
            if run_dir
            else ""
        )
    )
    return 0


def readable_log(log_text: str, render: Callable[[dict], str | None] | None = None) -> list[str]:
    """The run log as a person reads it: progress events rendered, published outputs summed up in one line."""
    lines, outputs = [], 0
    for line in log_text.splitlines():
        if OUTPUT_LINE in line:
            if '"end": true' in line:
                outputs += 1
                lines.append("(the run's outputs were published here: `fedsov run pull` writes them to a folder)")
            continue
        at = line.find(EVENT_LINE)
        if at >= 0 and render is not None:
            try:
                shown = render(json.loads(line[at + len(EVENT_LINE) :]))
            except (json.JSONDecodeError, KeyError):
                shown = line
            if shown:
                lines.append(shown)
            continue
        lines.append(line)
    return lines


def show_logs(
    control, run_id: int, out: Out = print, follow: bool = False, raw: bool = False, poll_s: float = 3.0
) -> int:
    """`fedsov run logs`: the run's Flower log; --follow keeps printing until the run finishes."""
    from common.config import config_from_json
    from server.simulation import render_event

    cfg = None

    def render(event: dict) -> str | None:
        nonlocal cfg
        if event["event"] == "run_config":
            cfg = config_from_json(json.dumps(event["config"]))
            return f"fedsov run {Path(event['run_dir']).name} (run directory {event['run_dir']} on the coordinator)"
        return render_event(event, cfg) if cfg is not None else None

    printed = 0
    while True:
        status = control.status(run_id)  # read first: a log read after it is complete when the run has finished
        text = control.logs(run_id)
        lines = text.splitlines() if raw else readable_log(text, render)
        for line in lines[printed:]:
            out(line)
        printed = len(lines)
        if not follow or status.finished:
            out(f"run {run_id}: {status.status} {status.details}".rstrip())
            return 0 if not status.finished or status.completed else 1
        time.sleep(poll_s)
