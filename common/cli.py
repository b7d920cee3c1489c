"""The `fedsov` command line."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import select
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from common.errors import ConfigError, FedsovError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsov",
        description="Federated DP-LoRA fine-tuning across jurisdictions. Settings are Hydra "
        "overrides, e.g. `fedsov simulate federation.rounds=3 regions=[eu,us]`.",
    )
    parser.add_argument(
        "--config-dir", type=Path, default=None, help="fedsov's configs/ folder (default: the bundled one)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a simulated federation on this machine (Flower + Ray)")
    sim.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="sweep: one run per combination of comma-separated values, e.g. privacy.target_epsilon=3,8",
    )
    _hydra_flags(sim)
    sim.add_argument("overrides", nargs="*", help="config overrides key=value; resume=<run_dir> continues a run")

    policy = sub.add_parser("policy", help="region policies: validate, explain, dry-run a round plan")
    psub = policy.add_subparsers(dest="action", required=True)
    validate = psub.add_parser("validate", help="check region policy files against the schema")
    validate.add_argument("files", nargs="+", type=Path)
    explain = psub.add_parser("explain", help="a policy in plain words")
    explain.add_argument("region", help="a region name (configs/regions/<name>.yaml) or a policy file")
    dry = psub.add_parser("dry-run", help="check the round plan against every region's policy")
    dry.add_argument("overrides", nargs="*", help="config overrides, as for simulate")

    audit = sub.add_parser("audit", help="audit logs and privacy ledgers")
    asub = audit.add_subparsers(dest="action", required=True)
    verify = asub.add_parser("verify", help="verify keyed hash-chained logs; report the first tampered entry")
    verify.add_argument("files", nargs="+", type=Path)
    verify.add_argument("--key-dir", type=Path, help="the log's evidence-key folder (default: the one its .head names)")
    verify.add_argument("--anchor", help="an anchor kept elsewhere, ENTRIES:HASH: the log must contain it")
    verify.add_argument(
        "--manifest", type=Path, help="a run's adapter/fedsov-manifest.json: check the log against the anchors it kept"
    )
    verify.add_argument("--node", help="with --manifest: the node whose anchors to use (e.g. eu-1)")
    compare = asub.add_parser("compare", help="run the same federation without and with DP (epsilon 8) and audit both")
    compare.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite compare.md/.json from the two arms' finished runs under <workdir>/compare, running nothing",
    )
    compare.add_argument("overrides", nargs="*", help="config overrides for both arms")

    report = sub.add_parser("report", help="(re)write a run's privacy report")
    report.add_argument("run_dir", type=Path)

    gen = sub.add_parser("generate", help="generate text with an adapter; flags PII; prints the privacy card")
    gen.add_argument("adapter", type=Path, help="a run directory, its adapter/ folder, or a `fedsov export` folder")
    gen.add_argument(
        "--base",
        type=Path,
        help="the base model folder (default: the run's own, where it is on this machine); its fingerprint must match",
    )
    gen.add_argument("--prompt", default="", help="text to continue (default: unconditional)")
    gen.add_argument("--samples", type=_positive_int, default=1)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=60)

    export = sub.add_parser("export", help="copy a run's adapter to a destination its contributing regions allow")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--to", dest="destination", type=Path, required=True)
    export.add_argument("--jurisdiction", required=True, help="where the model will be deployed, e.g. EU, US-CA")
    _deployment_parsers(sub)
    _lifecycle_parsers(sub)
    return parser


def _hydra_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cfg", choices=("job",), help="print the composed, validated config and exit (as Hydra's --cfg job)"
    )
    p.add_argument("--info", action="store_true", help="print where the config comes from and exit (as Hydra's --info)")


def _hydra_habits(args) -> int | None:
    """--cfg job and --info answer without running anything; None when neither was asked."""
    from server.sweep import expand, show_config, show_info

    if args.info:
        return show_info(args.overrides, args.config_dir)
    if args.cfg:
        return show_config(
            expand(args.overrides) if getattr(args, "multirun", False) else [args.overrides], args.config_dir
        )
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error argparse has already explained on one line
        return done.code if isinstance(done.code, int) else 0

    # Nothing fedsov runs may fetch models or data sets.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.config_dir:
        # Absolute, for Hydra and for the processes fedsov starts in other working folders.
        args.config_dir = args.config_dir.expanduser().resolve()
        os.environ["FEDSOV_CONFIG_DIR"] = str(args.config_dir)
    _stacks_on_sigusr1()
    _stop_signals_deliverable()
    sigterm = _SigtermAsInterrupt()
    try:
        if args.command == "simulate":
            from server.simulation import simulate

            answered = _hydra_habits(args)
            if answered is not None:
                return answered
            if args.multirun:
                from server.sweep import sweep

                return sweep(args.overrides, args.config_dir, lambda job: simulate(job, args.config_dir))
            return simulate(args.overrides, args.config_dir)
        if args.command == "policy":
            return _policy(args)
        if args.command == "audit" and args.action == "verify":
            return _verify(args.files, args.key_dir, args.anchor, args.manifest, args.node)
        if args.command == "audit":
            from server.compare import compare

            return compare(args.overrides, report_only=args.report_only)
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "generate":
            from server.generate import generate

            return generate(
                args.adapter, args.prompt, samples=args.samples, max_new_tokens=args.max_new_tokens, base=args.base
            )
        if args.command == "export":
            from server.provenance import export_adapter

            out = export_adapter(args.run_dir, args.destination, args.jurisdiction)
            print(
                f"Exported {args.run_dir / 'adapter'} to {out} for deployment in {args.jurisdiction}: adapter, "
                f"tokenizer, model card (README.md), manifest and base-model-reference/. Load it with "
                f"PeftModel.from_pretrained(<base>, '{out}'), or `fedsov generate {out} --base <base folder>`."
            )
            return 0
        if args.command == "data" and args.action == "check":
            from client.datacheck import check_data

            return check_data(args)
        if args.command == "data":
            from common.config import load_config
            from common.data.prepare import ensure_synthetic_data

            for region, folder in ensure_synthetic_data(load_config(args.overrides)).items():
                print(f"{region}: {folder} (start its node with --data {folder} --synthetic-data)")
            return 0
        if args.command in ("retention", "ledger", "dpo-record") or (
            (args.command, getattr(args, "action", None)) in (("node", "erase"), ("run", "branch"))
        ):
            return _lifecycle(args)
        if args.command == "roster" or (args.command == "node" and args.action == "identity"):
            return _roster(args)
        if args.command in ("certs", "coordinator", "node", "run", "deploy"):
            return _deployment(args)
    except FedsovError as err:
        if sigterm.received:
            return _stopped(sigterm)
        print(f"fedsov: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stopped(sigterm)
    except BrokenPipeError:
        if not _stdout_closed():
            return _internal_error()
        return 141  # like any tool whose reader (`| head`) has gone: quietly
    except Exception:
        # A SIGTERM that cut a library short mid-update (OmegaConf composing the config) can surface as that
        # library's own error, with the interrupt swallowed: it is still the stop, not a fault to report.
        return _stopped(sigterm) if sigterm.received else _internal_error()
    finally:
        sigterm.restore()
    return 1


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints where every thread is: for a stop that hangs. Not where stderr is no file (a
    test capturing it)."""
    if hasattr(signal, "SIGUSR1"):
        with contextlib.suppress(ValueError, OSError):
            faulthandler.register(signal.SIGUSR1, all_threads=True)


def _stop_signals_deliverable() -> None:
    """Ctrl-C and SIGTERM must reach fedsov, which then stops everything it started. A blocked signal mask is
    inherited across exec (some launchers block SIGINT in their children): unblocked here, or they would stay
    pending for ever. An ignored SIGINT (a background job of a non-interactive shell) is left as the shell set it."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _stopped(sigterm: _SigtermAsInterrupt) -> int:
    # Every `finally` on the way has stopped the processes this command started.
    print(f"fedsov: {'stopped by SIGTERM' if sigterm.received else 'interrupted'}", file=sys.stderr)
    return 143 if sigterm.received else 130


class _SigtermAsInterrupt:
    """SIGTERM stops fedsov as Ctrl-C does: every `finally` runs and stops the processes it started."""

    def __init__(self):
        self.received = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # only it may set signal handlers
            self._previous = signal.signal(signal.SIGTERM, self._interrupt)

    def _interrupt(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _one_line(err: BaseException | None) -> str:
    # Some messages quote multi-line text from other libraries (YAML parsers); a terminal line stays whole.
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _stdout_closed() -> bool:
    """Whether the broken pipe is stdout's (its reader has gone), not some other connection's."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
    if closed:
        # Python flushes stdout again on exit; point it at /dev/null so that cannot fail loudly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return closed


def _internal_error() -> int:
    """A mistake fedsov has no message for: one line, and the traceback kept in a file for the report."""
    fd, path = tempfile.mkstemp(prefix="fedsov-error-", suffix=".log")
    with os.fdopen(fd, "w") as log:
        traceback.print_exc(file=log)
    err = sys.exc_info()[1]
    print(
        f"fedsov: internal error: {type(err).__name__}: {_one_line(err)}. fedsov has no message for this "
        f"failure yet: please report it with the traceback in {path}",
        file=sys.stderr,
    )
    return 1


CLI_HOME = "~/.cache/fedsov/flwr-cli"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one of 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; give 1 or more")
    return value


def _node_data_args(p: argparse.ArgumentParser) -> None:
    """The flags that say where a node's data and policy are: the same for `node start` and `data check`."""
    p.add_argument("--region", required=True)
    p.add_argument("--data", required=True, help="data files or folders, ':'-separated")
    p.add_argument("--synthetic-data", action="store_true", help="data are fedsov's generated demo data")
    p.add_argument(
        "--plain-text-consent",
        choices=("true", "false"),
        help="consent for every line of the plain-text (.txt) files, which carry none (default: refused)",
    )
    p.add_argument("--model-path", help="local base model folder (default: the run's model)")
    p.add_argument("--model-cache", default="~/.cache/fedsov", help="where this node keeps the embedded model")


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address HOST:PORT")
    p.add_argument("--ca", help="CA certificate that signed the coordinator's certificate (TLS is on by default)")
    p.add_argument("--insecure", action="store_true", help="plaintext, no TLS: closed test networks only")
    p.add_argument("--home", default=CLI_HOME, help="folder for the flwr CLI's connection settings")


def _deployment_parsers(sub) -> None:
    certs = sub.add_parser(
        "certs", help="make a local CA and the coordinator's TLS certificate (tests, first deployments)"
    )
    certs.add_argument("--out", type=Path, required=True)
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or IP the coordinator is reached by (repeat; default localhost, 127.0.0.1)",
    )
    certs.add_argument("--force", action="store_true", help="replace an existing CA and server certificate there")

    coord = sub.add_parser("coordinator", help="the coordinator (Flower SuperLink): start it, register node keys")
    csub = coord.add_subparsers(dest="action", required=True)
    cstart = csub.add_parser("start", help="start the SuperLink with TLS and node authentication; runs until Ctrl-C")
    cstart.add_argument("--certs", type=Path, help="folder with ca.crt, server.crt, server.key")
    cstart.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (tests only)")
    cstart.add_argument("--host", default="0.0.0.0", help="interface to listen on (default all)")
    cstart.add_argument("--port", type=int, default=9093)
    cstart.add_argument("--home", type=Path, default=Path("fedsov-coordinator"), help="runs and logs")
    cstart.add_argument(
        "--model-cache",
        type=Path,
        default=Path("~/.cache/fedsov"),
        help="where this machine keeps (or builds) the base model",
    )
    creg = csub.add_parser(
        "register", help="register a regional node's public key (run where the Control API is reachable)"
    )
    creg.add_argument("public_key", type=Path)
    _connection_args(creg)
    cls = csub.add_parser("nodes", help="list registered nodes and whether they are online")
    _connection_args(cls)

    node = sub.add_parser("node", help="a regional node (Flower SuperNode): make its key, start it")
    nsub = node.add_subparsers(dest="action", required=True)
    nkey = nsub.add_parser("key", help="make the node's key pair (register the .pub with the coordinator)")
    nkey.add_argument("--out", type=Path, required=True)
    nstart = nsub.add_parser("start", help="run the node's start checks, then connect it to the coordinator")
    _node_data_args(nstart)
    nstart.add_argument("--state-dir", type=Path, required=True, help="ledger, audit log, canaries (keep it)")
    nstart.add_argument("--key", type=Path, help="the node's private key (required unless --insecure)")
    nstart.add_argument(
        "--name", help="node name (default: the state folder name, with the region in front unless it has it)"
    )
    nstart.add_argument(
        "--key-dir", help="the node's evidence-key folder, apart from its state (default <state-dir>.keys)"
    )
    nstart.add_argument(
        "--ledger-dir",
        help="the privacy ledger's folder, shared by nodes that split one data folder (default: the state folder)",
    )
    nstart.add_argument("--ledger-key-dir", help="the ledger's evidence-key folder (default: --key-dir)")
    nstart.add_argument("--roster", help="the federation roster (default: roster.json in the config folder)")
    nidentity = nsub.add_parser("identity", help="print this node's identity key for the roster (made on first use)")
    nidentity.add_argument("--key-dir", type=Path, required=True, help="the node's key folder")
    ntrust = nsub.add_parser("trust", help="pin a coordinator's CA to the jurisdiction it is in (this node's config)")
    ntrust.add_argument("--ca", type=Path, required=True, help="the coordinator's CA certificate")
    ntrust.add_argument("--jurisdiction", required=True, help="where that coordinator is, e.g. EU, US-CA, CN")
    ntrust.add_argument("--name", required=True, help="a label for this coordinator")
    _erase_parser(nsub)
    _connection_args(nstart)
    nstart.add_argument("overrides", nargs="*", help="config overrides for the start checks (e.g. model settings)")

    run = sub.add_parser("run", help="submit a federation run to a coordinator, watch it, fetch its outputs")
    rsub = run.add_subparsers(dest="action", required=True)
    rsubmit = rsub.add_parser("submit", help="submit a run; --watch follows it to the end")
    _connection_args(rsubmit)
    rsubmit.add_argument("--watch", action="store_true")
    _hydra_flags(rsubmit)
    rsubmit.add_argument("overrides", nargs="*")
    rwatch = rsub.add_parser("watch", help="follow a run (rounds, epsilon per region); exit 1 if it fails")
    rwatch.add_argument("run_id", type=int)
    _connection_args(rwatch)
    rstatus = rsub.add_parser("status", help="a run's status as the SuperLink reports it")
    rstatus.add_argument("run_id", type=int)
    _connection_args(rstatus)
    rstop = rsub.add_parser("stop", help="stop a running run (flwr stop); its checkpoints stay for resume=")
    rstop.add_argument("run_id", type=int)
    _connection_args(rstop)
    rlogs = rsub.add_parser("logs", help="a run's log from the coordinator (flwr log), progress rendered")
    rlogs.add_argument("run_id", type=int)
    rlogs.add_argument("--follow", "-f", action="store_true", help="keep printing until the run finishes")
    rlogs.add_argument("--raw", action="store_true", help="the log exactly as Flower keeps it")
    _connection_args(rlogs)
    rpull = rsub.add_parser(
        "pull", help="copy a finished run's outputs from the coordinator, from any machine holding the CA (flwr pull)"
    )
    rpull.add_argument("run_id", type=int)
    rpull.add_argument("--to", type=Path, required=True, help="folder to write <run name>/ into")
    _connection_args(rpull)
    rfetch = rsub.add_parser("fetch", help="copy a finished run's outputs (on the coordinator machine)")
    rfetch.add_argument("run_name", help="the fedsov run name (the run directory's name)")
    rfetch.add_argument("--runs-dir", type=Path, default=Path("fedsov-coordinator/runs"))
    rfetch.add_argument("--to", type=Path, required=True)
    _branch_parser(rsub)

    roster = sub.add_parser("roster", help="the federation roster: the nodes whose secure-aggregation keys count")
    rosub = roster.add_subparsers(dest="action", required=True)
    radd = rosub.add_parser("add", help="add a node (its name, region and identity key) to a roster file")
    radd.add_argument("--roster", type=Path, required=True, help="the roster file (installed on every node)")
    radd.add_argument("--name", required=True, help="the node's name, e.g. eu-1")
    radd.add_argument("--region", required=True)
    radd.add_argument("--identity", help="the node's identity public key (hex), as `fedsov node identity` prints it")
    radd.add_argument("--key-dir", type=Path, help="instead of --identity: the node's key folder (on the node)")
    rshow = rosub.add_parser("show", help="list a roster's nodes and its fingerprint (compare it between regions)")
    rshow.add_argument("--roster", type=Path, required=True)

    data = sub.add_parser("data", help="check a node's data files; write demo data")
    dsub_data = data.add_subparsers(dest="action", required=True)
    dcheck = dsub_data.add_parser("check", help="run a node's start checks on its data (same flags as node start)")
    _node_data_args(dcheck)
    dcheck.add_argument("overrides", nargs="*", help="config overrides, as for node start (e.g. model.max_length=256)")
    dgen = dsub_data.add_parser(
        "generate", help="write fedsov's synthetic demo data for some regions (data.root=<dir>)"
    )
    dgen.add_argument("overrides", nargs="*", help="e.g. regions=[eu] data.root=/data/demo")

    deploy = sub.add_parser("deploy", help="deployment on this machine")
    dsub = deploy.add_subparsers(dest="action", required=True)
    dlocal = dsub.add_parser("local", help="coordinator + one SuperNode per configured client, TLS and node auth on")
    dlocal.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (tests only)")
    _hydra_flags(dlocal)
    dlocal.add_argument("overrides", nargs="*")


def _deployment(args) -> int:
    from common.paths import writable_folder
    from server import deployment as d

    if args.command == "certs":
        from common.credentials import make_certificates

        if not args.out.is_file():
            writable_folder(args.out, "--out <folder>")
        files = make_certificates(args.out, args.host or ["localhost", "127.0.0.1"], force=args.force)
        print(
            f"CA {files.ca_cert} (give it to every node and CLI user); server certificate {files.server_cert} "
            f"and key {files.server_key} (coordinator only); CA key {args.out / 'ca.key'} (keep offline)."
        )
        return 0
    if args.command == "deploy" or (args.command == "run" and args.action == "submit"):
        answered = _hydra_habits(args)
        if answered is not None:
            return answered
    if args.command == "deploy":
        return d.local_deployment(args.overrides, insecure=args.insecure, config_dir=args.config_dir)
    if args.command == "coordinator" and args.action == "start":
        writable_folder(args.home, "--home <folder>")
        superlink = d.start_coordinator(
            args.home,
            certs=args.certs,
            insecure=args.insecure,
            host=args.host,
            port=args.port,
            model_cache=args.model_cache,
        )
        return d.serve_coordinator(superlink)
    if args.command == "node" and args.action == "key":
        from common.credentials import make_node_key

        writable_folder(args.out.expanduser().resolve().parent, "--out <folder>/<key name>")
        private, public = make_node_key(args.out)
        print(f"Node key {private} (stays on the node); register {public} with the coordinator.")
        return 0
    if args.command == "node" and args.action == "trust":
        from common.config import default_config_dir
        from common.coordinator_pins import PINS_FILE, add_pin

        config_dir = args.config_dir.resolve() if args.config_dir else default_config_dir()
        fingerprint = add_pin(config_dir, args.name, args.ca, args.jurisdiction)
        print(
            f"Pinned coordinator '{args.name}' (CA sha256 {fingerprint}) to {args.jurisdiction} in "
            f"{config_dir / PINS_FILE}. Check the fingerprint with the coordinator's operator."
        )
        return 0
    if args.command == "node":
        from client.supernode import start_node

        return start_node(args)
    if args.command == "run" and args.action == "fetch":
        d.fetch_outputs(args.runs_dir, args.run_name, args.to)
        return 0
    connection = d.Connection.from_args(args.superlink, args.ca, args.insecure, args.home)
    if args.command == "coordinator" and args.action == "register":
        d.register_node(connection, args.public_key)
        return 0
    if args.command == "coordinator":
        for n in connection.control().nodes():
            print(f"  node {n.get('node-id')}: {n.get('status')} (online since {n.get('online-at')})")
        return 0
    if args.action == "status":
        status = connection.control().status(args.run_id)
        print(f"run {args.run_id}: {status.status} {status.details}".rstrip())
        return 0 if not status.finished or status.completed else 1
    if args.action in ("stop", "logs", "pull"):
        from server import runcontrol

        if args.action == "stop":
            return runcontrol.stop_run(connection.control(), args.run_id)
        if args.action == "logs":
            return runcontrol.show_logs(connection.control(), args.run_id, follow=args.follow, raw=args.raw)
        runcontrol.pull_outputs(connection.control(), args.run_id, args.to)
        return 0
    if args.action == "submit":
        run_id, cfg = d.submit_run(connection, args.overrides, config_dir=args.config_dir)
        if not args.watch:
            print(f"Follow it with: fedsov run watch {run_id} --superlink {args.superlink} ...")
            return 0
        return d.run_outcome(d.watch_run(connection, run_id, cfg), None, print)
    return d.run_outcome(d.watch_run(connection, args.run_id), None, print)


def _node_state_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Where a stopped node's state is: the same values as its `fedsov node start` flags."""
    p.add_argument("--region", required=required)
    p.add_argument("--state-dir", type=Path, required=required, help="the node's state folder (as for node start)")
    p.add_argument("--name", help="node name (default: as node start derives it from the state folder)")
    p.add_argument("--key-dir", help="the node's evidence-key folder (default <state-dir>.keys)")
    p.add_argument("--ledger-dir", help="the privacy ledger's folder (default: the state folder)")
    p.add_argument("--ledger-key-dir", help="the ledger's evidence-key folder (default: --key-dir)")


def _erase_parser(nsub) -> None:
    erase = nsub.add_parser(
        "erase",
        help="record a person's erasure request: their records leave all later training; "
        "reports the runs trained on them",
    )
    erase.add_argument("--user", required=True, help="the user_id the person's records carry")
    erase.add_argument("--reference", required=True, help="the request's reference (e.g. a ticket number), for the log")
    _node_state_args(erase)


def _branch_parser(rsub) -> None:
    branch = rsub.add_parser(
        "branch",
        help="a new run continuing a run from one of its checkpoints (e.g. one that "
        "predates an erased person); resume it like any run",
    )
    branch.add_argument("run_dir", type=Path)
    branch.add_argument("--round", type=_positive_int, required=True, help="the checkpoint's round")
    branch.add_argument("--to", type=Path, help="the new run folder (default: beside the run, named after it)")


def _lifecycle_parsers(sub) -> None:
    retention = sub.add_parser("retention", help="delete what the regions' retention rules say must go")
    rsub = retention.add_subparsers(dest="action", required=True)
    enforce = rsub.add_parser(
        "enforce",
        help="on a coordinator: --runs-dir (checkpoints); on a node: --region and "
        "--state-dir (ledger backups); each deletion is logged",
    )
    enforce.add_argument("--runs-dir", type=Path, help="the coordinator's runs folder")
    enforce.add_argument("--dry-run", action="store_true", help="list what is due, delete nothing")
    _node_state_args(enforce, required=False)
    ledger = sub.add_parser("ledger", help="the privacy ledger's backups")
    lsub = ledger.add_subparsers(dest="action", required=True)
    backup = lsub.add_parser("backup", help="a verified copy of the ledger folder's keyed logs in <ledger-dir>/backups")
    _node_state_args(backup)
    dpo = sub.add_parser("dpo-record", help="a run's record of processing and DPIA inputs for the DPO (JSON, Markdown)")
    dpo.add_argument("run_dir", type=Path)
    dpo.add_argument("--out", type=Path, help="folder to write to (default: the run's report folder)")


def _node_folders(args):
    from client.settings import NodeFolders

    if not args.region or not args.state_dir:
        raise ConfigError(
            "Give the node's --region and --state-dir (as for `fedsov node start`), or --runs-dir on a coordinator."
        )
    if not args.state_dir.expanduser().is_dir():
        raise ConfigError(
            f"--state-dir {args.state_dir}: no such folder. Give the node's state folder, as for `fedsov node start`."
        )
    values = {
        "region": args.region,
        "state-dir": str(args.state_dir.expanduser().resolve()),
        "name": args.name,
        "key-dir": args.key_dir,
        "ledger-dir": args.ledger_dir,
        "ledger-key-dir": args.ledger_key_dir,
        "config-dir": str(args.config_dir) if args.config_dir else None,
    }
    return NodeFolders.of({k: v for k, v in values.items() if v})


def _lifecycle(args) -> int:
    """Retention, ledger backups, erasure requests, run branches and the DPO record."""
    from server.rundir import RunDirectory

    if args.command == "dpo-record":
        from server.dpo import write_dpo_record

        json_path, md_path = write_dpo_record(RunDirectory(args.run_dir), args.out)
        print(f"DPO record: {md_path} (and {json_path.name}); the fields marked TO FILL are for the DPO.")
        return 0
    if args.command == "run":
        from server.rundir import branch_run

        branch = branch_run(RunDirectory(args.run_dir), args.round, args.to)
        print(
            f"{branch.path} continues {args.run_dir} from its round-{args.round} checkpoint. Train it with "
            f"`fedsov simulate resume={branch.path}` (on a coordinator: `fedsov run submit ... "
            f"resume={branch.path}`)."
        )
        return 0
    if args.command == "retention" and args.runs_dir:
        from server.retention import enforce_runs_retention, expired_checkpoints

        if args.region or args.state_dir:
            raise ConfigError("Give either --runs-dir (a coordinator) or --region and --state-dir (a node), not both.")
        if args.dry_run:
            due = [item for _, items in expired_checkpoints(args.runs_dir, args.config_dir) for item in items]
        else:
            due = enforce_runs_retention(args.runs_dir, args.config_dir)
        return _print_retention(due, args.dry_run, f"checkpoints under {args.runs_dir}")
    folders = _node_folders(args)
    if args.command == "node":
        from client.erasure import request_erasure

        for line in request_erasure(folders, args.user, args.reference).lines():
            print(line)
        return 0
    if args.command == "ledger":
        from client.retention import backup_ledger

        print(f"Ledger backup {backup_ledger(folders)} (verified); copy the backups folder off this machine as well.")
        return 0
    from client.retention import enforce_node_retention, expired_backups
    from client.settings import node_audit
    from common.config import load_region_file

    policy = load_region_file(folders.policy_file).policy
    due = (
        expired_backups(folders, policy)
        if args.dry_run
        else enforce_node_retention(folders, policy, node_audit(folders))
    )
    return _print_retention(due, args.dry_run, f"ledger backups of node {folders.name}")


def _print_retention(due, dry_run: bool, what: str) -> int:
    for item in due:
        print(f"{'due' if dry_run else 'deleted'}: {item.describe()}")
    if not due:
        print(f"Nothing is due: every one of the {what} is within its region's retention period.")
    return 0


def _roster(args) -> int:
    from common.secagg.identity import Identity, Roster, add_to_roster

    if args.command == "node":
        print(Identity.load_or_create(args.key_dir).public_key.hex())
        return 0
    if args.action == "show":
        roster = Roster.load(args.roster)
        for entry in sorted(roster.entries.values(), key=lambda e: (e.region, e.name)):
            print(f"  {entry.name:<16} {entry.region:<8} {entry.public_key.hex()}")
        print(
            f"{len(roster.entries)} node(s); roster fingerprint {roster.fingerprint()} (every region's copy must "
            "show the same)"
        )
        return 0
    if (args.identity is None) == (args.key_dir is None):
        raise FedsovError("Give exactly one of --identity <hex key> and --key-dir <the node's key folder>.")
    try:
        key = bytes.fromhex(args.identity) if args.identity else Identity.load_or_create(args.key_dir).public_key
    except ValueError:
        key = b""
    if len(key) != 32:
        raise FedsovError(
            f"--identity {args.identity!r} is not a 32-byte key in hex (`fedsov node identity` prints it)."
        )
    roster = add_to_roster(args.roster, args.name, args.region, key)
    print(
        f"{args.roster}: {len(roster.entries)} node(s), fingerprint {roster.fingerprint()}. Install the same file on "
        "every node (the `roster` node-config key, or roster.json in each node's config folder)."
    )
    return 0


def _region_file(name_or_path: str) -> Path:
    from common.config import default_config_dir

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    regions = default_config_dir() / "regions"
    if not (regions / f"{name_or_path}.yaml").is_file():
        known = sorted(f.stem for f in regions.glob("*.yaml") if f.stem != "template")
        raise ConfigError(
            f"No region '{name_or_path}': there is no {regions / name_or_path}.yaml. Known regions: "
            f"{', '.join(known) or 'none'}; or give a policy file's path (ending in .yaml)."
        )
    return regions / f"{name_or_path}.yaml"


def _policy(args) -> int:
    from common.config import load_config, load_region_file
    from common.policy import explain_policy, policy_hash

    if args.action == "validate":
        failed = 0
        for file in args.files:
            if file.is_dir():
                failed += 1
                print(f"INVALID {file}: a folder, not a policy file; give the files, e.g. {file}/*.yaml")
                continue
            try:
                region = load_region_file(file)
                print(
                    f"OK {file}: region {region.name} ({region.jurisdiction}), {region.policy.law}, "
                    f"policy hash {policy_hash(region.policy)[:16]}"
                )
            except FedsovError as err:
                failed += 1
                print(f"INVALID {err}")
        return 2 if failed else 0
    if args.action == "explain":
        region = load_region_file(_region_file(args.region))
        print(explain_policy(region.name, region.jurisdiction, region.policy))
        return 0
    from server.planning import dry_run

    cfg = load_config(args.overrides)
    policies = {name: load_region_file(_region_file(name)) for name in cfg.regions}
    result = dry_run(cfg, policies)
    print("\n".join(result.lines))
    return 0 if result.accepted else 1


def _report(run_dir: Path) -> int:
    from omegaconf import OmegaConf

    from common.config import config_from_container
    from server.report import write_privacy_report
    from server.rundir import RunDirectory

    run = RunDirectory(run_dir)
    if not run.config_path.is_file():
        raise FedsovError(f"{run_dir} holds no config.yaml: not a fedsov run directory.")
    report = write_privacy_report(run, config_from_container(OmegaConf.load(run.config_path)))
    print(f"Privacy report: {run.report_dir / 'privacy-report.html'} (and .md, .json)")
    for line in report["plain_summary"]:
        print(f"  {line}")
    return 1 if report["bound_violations"] else 0


def _verify(
    files: list[Path], key_dir: Path | None, anchor: str | None, manifest: Path | None, node: str | None
) -> int:
    if manifest is not None and not node:
        raise FedsovError("--manifest needs --node: the anchors in a manifest are per node (e.g. --node eu-1).")
    bad = 0
    for given in files:
        if given.is_dir():
            # A node's or a run's folder: every hash-chained log in it (the ones with a .head file).
            logs = sorted(f for f in given.glob("*.jsonl") if f.with_name(f.name + ".head").exists())
            if not logs:
                print(
                    f"{given}: a folder with no hash-chained logs (*.jsonl with a .head file beside it); give the "
                    "log files, e.g. <workdir>/nodes/<node>/audit.jsonl"
                )
                bad += 1
        else:
            logs = [given]
        for file in logs:
            bad += _verify_one(file, key_dir, _anchor_for(file, anchor, manifest, node))
    return 1 if bad else 0


def _verify_one(file: Path, key_dir: Path | None, expected: tuple[int, str] | None) -> int:
    """Verify one log (and that it holds `expected`, an anchor); print the verdict; 1 if it is bad."""
    from common.audit import EvidenceKeyError, TamperedLog, open_log

    if not file.exists():
        print(f"{file}: no such file")
        return 1
    try:
        with open(file, encoding="utf-8") as f:
            f.readline()
    except UnicodeDecodeError:
        print(f"{file}: not a fedsov log (not UTF-8 text)")
        return 1
    try:
        log = open_log(file, key_dir)
        result = log.verify()
    except EvidenceKeyError as err:
        print(f"{file}: cannot verify: {err}")
        return 1
    except UnicodeDecodeError:
        print(f"{file}: not a fedsov log (not UTF-8 text)")
        return 1
    print(result.describe(file))
    if not result.ok:
        return 1
    if expected is not None:
        try:
            log.check_anchor(*expected)
        except TamperedLog as err:
            print(f"{file}: ANCHOR MISSING: {err}")
            return 1
        print(f"{file}: contains the anchor {expected[0]}:{expected[1][:16]}...")
    return 0


def _anchor_for(file: Path, anchor: str | None, manifest: Path | None, node: str | None) -> tuple[int, str] | None:
    import json

    if anchor:
        count, _, head = anchor.partition(":")
        if not count.isdigit() or len(head) != 64:
            raise FedsovError(f"--anchor {anchor!r}: expected ENTRIES:HASH, e.g. 12:<64 hex digits>.")
        return int(count), head
    if manifest is None:
        return None
    anchors = json.loads(manifest.read_text()).get("evidence_anchors", {})
    if node not in anchors:
        raise FedsovError(
            f"{manifest} keeps no anchors for node {node!r}; it has: {', '.join(sorted(anchors)) or 'none'}."
        )
    kind = "ledger" if "ledger" in file.name else "audit"
    return int(anchors[node][f"{kind}-entries"]), str(anchors[node][f"{kind}-head"])


if __name__ == "__main__":
    sys.exit(main())
