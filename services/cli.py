"""The ``conveyor`` command.

``conveyor serve <service>`` runs one service in this process;
``conveyor up`` runs every implemented service (or those ``--services`` names),
each in its own process, on loopback with embedded defaults (``--base-port``
moves their ports), prints their addresses, restarts a crashed one with backoff
and drains them all on Ctrl-C or SIGTERM (:mod:`conveyor.services.supervisor`);
with ``--lifecycle`` (``make run``) it then runs ``conveyor lifecycle``, a model
from training to production and back (:mod:`conveyor.services.lifecycle`).
``conveyor health HOST:PORT`` exits 0 when a server is SERVING.
``conveyor models …`` lists, shows, uploads, downloads and aliases models in a
registry and ``conveyor registry backup|restore`` snapshots one
(:mod:`conveyor.services.registry.cli`); ``conveyor audit …`` and ``conveyor
approve`` talk to the policy service (:mod:`conveyor.services.policy.cli`);
``conveyor train``, ``conveyor jobs …`` and ``conveyor sweeps …`` create, follow
and cancel training jobs and hyperparameter sweeps
(:mod:`conveyor.services.trainer.cli`); ``conveyor optimize`` and ``conveyor
optimizations …`` create, follow, read and cancel optimisation jobs
(:mod:`conveyor.services.optimizer.cli`); ``conveyor drift`` prints a model
version's drift report from the monitor (:mod:`conveyor.services.monitor.cli`)
and ``conveyor alerts …`` its alerts and alert rules
(:mod:`conveyor.services.monitor.alerts_cli`); ``conveyor promote`` and ``conveyor
rollback`` move an alias through the promotion gates
(:mod:`conveyor.services.registry.cli_promotion`); ``conveyor deploy``,
``conveyor deployments status`` and ``conveyor predict`` serve and call a model
(:mod:`conveyor.services.inference.cli`);
``conveyor explain`` explains one prediction of a model version, as a table and
a picture (:mod:`conveyor.services.explainer.cli`); ``conveyor credentials``
writes development tokens. This module only wires their arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import grpc

from conveyor.services import catalog, lifecycle
from conveyor.services.explainer import cli as explainer_cli
from conveyor.services.inference import cli as inference_cli
from conveyor.services.monitor import cli as monitor_cli
from conveyor.services.monitor.alerts_cli import add_alerts_commands
from conveyor.services.optimizer import cli as optimizer_cli
from conveyor.services.policy import cli as policy_cli
from conveyor.services.registry import cli as registry_cli
from conveyor.services.registry import cli_promotion
from conveyor.services.registry import cli_transfer as transfer
from conveyor.services.supervisor import ChildSpec, Supervisor, SupervisorPolicy
from conveyor.services.trainer import cli as trainer_cli
from conveyor.services.trainer import sweep_cli
from conveyor.shared.auth.credentials import DEV_USERS, write_dev_credentials
from conveyor.shared.errors import ConveyorError
from conveyor.shared.health import serving_status
from conveyor.shared.ports import SERVICE_PORTS, default_address
from conveyor.shared.secrets.settings import SecretStoreSettings, open_secret_store
from conveyor.shared.settings import TelemetrySettings
from conveyor.shared.telemetry import (
    configure_logging,
    create_tracer_provider,
    install_tracer_provider,
)

STARTUP_TIMEOUT_S = 60.0
"""How long ``conveyor up`` waits for a (re)started service to report SERVING."""
FIRST_PORT = min(SERVICE_PORTS.values())
DRAIN_MARGIN_S = 10.0
"""Beyond a service's ``shutdown_delay`` + ``shutdown_grace``, how long ``conveyor
up`` lets it finish (close databases, exit) after SIGTERM before killing it."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conveyor`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.service, listen=args.listen, data_dir=args.data_dir)
    if args.command == "up":
        return _up(args)
    if args.command == "health":
        return _health(args.address, service=args.service)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is not None:
        return handler(args)
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=catalog.ALL_SERVICES)
    serve.add_argument("--listen", help="HOST:PORT (default: loopback, the service's port)")
    serve.add_argument("--data-dir", type=Path, help="root data directory (default: .data)")
    up = commands.add_parser("up", help="run every implemented service on this machine")
    up.add_argument("--data-dir", type=Path, default=Path(".data"), help="default: .data")
    up.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    up.add_argument(
        "--services",
        type=_service_list,
        default=catalog.IMPLEMENTED,
        metavar="NAME,…",
        help="comma-separated services to run, started in the usual order (default: "
        f"all: {', '.join(catalog.IMPLEMENTED)})",
    )
    up.add_argument(
        "--base-port",
        type=int,
        metavar="N",
        help="listen on N+1 (registry) … N+7 (policy) instead of 50051 … 50057",
    )
    up.add_argument(
        "--logs",
        type=Path,
        metavar="DIR",
        help="write each service's log to DIR/<service>.log (default: the terminal; "
        "with --lifecycle: DATA_DIR/logs)",
    )
    up.add_argument(
        "--lifecycle",
        action="store_true",
        help="once every service is up, run `conveyor lifecycle` (what `make run` does)",
    )
    lifecycle_parser = commands.add_parser(
        "lifecycle",
        help="train, optimise, explain, promote, serve, watch and roll back a model",
        description=lifecycle.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lifecycle.add_arguments(lifecycle_parser)
    lifecycle_parser.set_defaults(handler=lambda args: lifecycle.run(args, main))
    health = commands.add_parser("health", help="exit 0 if a server reports SERVING")
    health.add_argument("address", help="HOST:PORT")
    health.add_argument("--service", default="", help="one service's full name (default: all)")
    credentials = commands.add_parser(
        "credentials",
        help="write development tokens (one per role) under DATA_DIR/credentials",
    )
    credentials.add_argument("--data-dir", type=Path, default=Path(".data"), help="default: .data")
    credentials.set_defaults(handler=lambda args: _credentials(args.data_dir))
    _add_models_commands(commands)
    _add_promotion_commands(commands)
    _add_registry_commands(commands)
    _add_policy_commands(commands)
    _add_trainer_commands(commands)
    _add_optimizer_commands(commands)
    _add_monitor_commands(commands)
    add_alerts_commands(commands)
    _add_explainer_commands(commands)
    _add_inference_commands(commands)
    return parser


Handler = Callable[[argparse.Namespace], int]
_Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it


def _add_models_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--registry",
        metavar="HOST:PORT",
        help="registry address (default: $CONVEYOR_REGISTRY_ADDR, else 127.0.0.1:50051)",
    )
    client.add_argument(
        "--timeout",
        type=optimizer_cli.seconds,
        metavar="SECONDS",
        help="deadline per call (default: 30; uploads and downloads: 3600)",
    )
    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--json", action="store_true", help="print JSON (the API's messages)")
    models = commands.add_parser("models", help="list, inspect, upload, download, alias models")
    models.set_defaults(handler=_usage(models))
    sub = models.add_subparsers(metavar="COMMAND")

    def command(
        name: str, run: registry_cli.Command, help: str, json: bool = False
    ) -> argparse.ArgumentParser:
        parents = [client, machine] if json else [client]
        parser = sub.add_parser(name, help=help, description=help, parents=parents)
        parser.set_defaults(handler=partial(registry_cli.run, run))
        return parser

    listing = command("list", registry_cli.models_list, "list models", json=True)
    listing.add_argument(
        "--filter", help="AIP-160 filter, e.g. 'tags:\"fraud\" AND risk_tier=HIGH'"
    )
    listing.add_argument("--archived", action="store_true", help="include archived models")
    show = command("show", registry_cli.models_show, "a model's fields and aliases", json=True)
    show.add_argument("model", help="model id or models/{model}")
    versions = command("versions", registry_cli.models_versions, "a model's versions", json=True)
    versions.add_argument("model")
    versions.add_argument("--filter", help="AIP-160 filter, e.g. 'metrics.accuracy>=0.9'")
    versions.add_argument("--order-by", help="'create_time desc' (default), 'metrics.f1 desc', …")
    versions.add_argument("--archived", action="store_true", help="include archived versions")
    download = command("download", transfer.models_download, "download a version's artifact")
    download.add_argument(
        "reference",
        type=transfer.version_reference,
        help="MODEL@ALIAS, MODEL/versions/N or MODEL@latest",
    )
    download.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    download.add_argument("--resume", action="store_true", help="continue FILE.part")
    upload = command("upload", transfer.models_upload, "upload a file as a new version")
    upload.add_argument("model")
    upload.add_argument("file", type=Path)
    upload.add_argument("--format", required=True, choices=sorted(transfer.FORMATS))
    upload.add_argument("--task", choices=sorted(transfer.TASKS))
    upload.add_argument("--description")
    upload.add_argument(
        "--metrics",
        "--metric",
        type=transfer.metric,
        nargs="+",
        action="extend",
        metavar="NAME=VALUE",
        help="evaluation metrics, e.g. accuracy=0.97",
    )
    upload.add_argument(
        "--label", type=transfer.key_value, nargs="+", action="extend", metavar="KEY=VALUE"
    )
    for flag in ("input", "output"):
        upload.add_argument(
            f"--{flag}",
            type=transfer.tensor_spec,
            action="append",
            metavar="NAME:DTYPE:SHAPE",
            help=f"an {flag} tensor of the signature, e.g. {flag}:FP32:-1,30 (repeatable)",
        )
    upload.add_argument("--parent", help="the version this one derives from (lineage)")
    create = command("create", registry_cli.models_create, "create a model")
    create.add_argument("model", help="the new model's id")
    create.add_argument("--owner-team", required=True)
    create.add_argument("--risk-tier", required=True, choices=("low", "medium", "high"))
    create.add_argument("--tag", nargs="+", action="extend", help="search keywords")
    create.add_argument("--display-name")
    create.add_argument("--description")
    _add_alias_commands(sub, client, machine)


def _add_alias_commands(
    models: _Subparsers[argparse.ArgumentParser],
    client: argparse.ArgumentParser,
    machine: argparse.ArgumentParser,
) -> None:
    alias = models.add_parser("alias", help="set, delete or list aliases")
    alias.set_defaults(handler=_usage(alias))
    sub = alias.add_subparsers(metavar="COMMAND")
    set_alias = sub.add_parser("set", help="create or move an alias", parents=[client])
    set_alias.set_defaults(handler=partial(registry_cli.run, registry_cli.alias_set))
    set_alias.add_argument("model")
    set_alias.add_argument("alias")
    set_alias.add_argument("version", type=int, help="the version number to point at")
    set_alias.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    set_alias.add_argument(
        "--expected",
        metavar="N|-",
        help="only if the alias points at version N now (- : only if it does not exist)",
    )
    delete = sub.add_parser("delete", help="delete an alias", parents=[client])
    delete.set_defaults(handler=partial(registry_cli.run, registry_cli.alias_delete))
    delete.add_argument("model")
    delete.add_argument("alias")
    delete.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    listing = sub.add_parser("list", help="a model's aliases", parents=[client, machine])
    listing.set_defaults(handler=partial(registry_cli.run, registry_cli.alias_list))
    listing.add_argument("model")


def _add_promotion_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--registry", metavar="HOST:PORT", help="registry address")
    client.add_argument(
        "--timeout", type=optimizer_cli.seconds, metavar="SECONDS", help="default: 30"
    )
    promote, rollback = cli_promotion.add_arguments(commands, parents=[client])
    promote.set_defaults(handler=partial(registry_cli.run, cli_promotion.promote))
    rollback.set_defaults(handler=partial(registry_cli.run, cli_promotion.rollback))


def _add_registry_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    registry = commands.add_parser("registry", help="back up or restore a registry's store")
    registry.set_defaults(handler=_usage(registry))
    sub = registry.add_subparsers(metavar="COMMAND")
    for name, handler, help in (
        ("backup", registry_cli.registry_backup, "snapshot the store (while it serves)"),
        ("restore", registry_cli.registry_restore, "rebuild the store from a snapshot"),
    ):
        parser = sub.add_parser(name, help=help, description=help)
        parser.set_defaults(handler=handler)
        parser.add_argument("directory", type=Path, help="the snapshot's directory")
        parser.add_argument(
            "--data-dir",
            type=Path,
            help="the registry's data root (default: $CONVEYOR_REGISTRY_DATA_DIR, else .data)",
        )
        parser.add_argument(
            "--database-url", help="its database (default: SQLite under the data directory)"
        )


def _add_policy_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    policy_cli.add_arguments(client)
    span = argparse.ArgumentParser(add_help=False)
    span.add_argument("--start", type=int, default=0, help="first sequence (default: the first)")
    span.add_argument("--end", type=int, default=0, help="last sequence (default: the head)")
    audit = commands.add_parser("audit", help="verify, export and read the audit log")
    audit.set_defaults(handler=_usage(audit))
    sub = audit.add_subparsers(metavar="COMMAND")
    verify = sub.add_parser(
        "verify",
        help="verify the hash chain and signed heads (exit 3 when broken)",
        parents=[client, span],
    )
    verify.add_argument("--file", type=Path, help="verify an export file offline instead")
    verify.set_defaults(
        handler=lambda args: (
            policy_cli.verify_offline(args)
            if args.file
            else policy_cli.run(policy_cli.audit_verify, args)
        )
    )
    export = sub.add_parser(
        "export", help="write the log to a file that verifies offline", parents=[client, span]
    )
    export.add_argument("-o", "--output", type=Path, required=True)
    export.set_defaults(handler=partial(policy_cli.run, policy_cli.audit_export))
    decisions = sub.add_parser("decisions", help="recent decisions, newest first", parents=[client])
    decisions.add_argument(
        "--filter", help="AIP-160, e.g. 'principal.id = \"alice\" AND outcome = OUTCOME_DENY'"
    )
    decisions.add_argument("--limit", type=int, default=50)
    decisions.set_defaults(handler=partial(policy_cli.run, policy_cli.audit_decisions))
    approve = commands.add_parser(
        "approve", help="approve a model version for an alias (approvers)", parents=[client]
    )
    approve.add_argument("version", help="MODEL/versions/N or models/MODEL/versions/N")
    approve.add_argument("--alias", default="production")
    approve.add_argument("--comment")
    approve.set_defaults(handler=partial(policy_cli.run, policy_cli.approve))


def _add_trainer_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    trainer_cli.add_client_arguments(client)
    train = commands.add_parser(
        "train",
        help="train a model on a dataset (or sweep its hyperparameters) and follow the job",
        description="Create a training job and follow it: progress on stderr, the result "
        "on stdout. With --sweep, create a hyperparameter sweep instead and follow its "
        "trials. Ctrl-C stops following; the job or sweep keeps running.",
        parents=[client],
    )
    trainer_cli.add_train_arguments(train)
    sweep_cli.add_sweep_arguments(train)
    train.set_defaults(handler=_train)
    jobs = commands.add_parser("jobs", help="list, show, watch and cancel training jobs")
    jobs.set_defaults(handler=_usage(jobs))
    sub = jobs.add_subparsers(metavar="COMMAND")
    listing = sub.add_parser("list", help="training jobs, newest first", parents=[client])
    listing.add_argument("--state", type=str.lower, choices=trainer_cli.STATES)
    listing.add_argument("--filter", help="AIP-160, e.g. 'spec.data.dataset=\"datasets/digits\"'")
    listing.add_argument(
        "--limit", type=trainer_cli.positive, default=50, help="at most this many (default: 50)"
    )
    listing.set_defaults(handler=partial(trainer_cli.run, trainer_cli.jobs_list))
    for name, command, help in (
        ("show", trainer_cli.jobs_show, "a job's spec, progress, learning curve and result"),
        ("watch", trainer_cli.jobs_watch, "follow a job to its end (exit 0 if it succeeded)"),
        ("cancel", trainer_cli.jobs_cancel, "cancel a job (a running one stops after its step)"),
    ):
        parser = sub.add_parser(name, help=help, description=help, parents=[client])
        parser.add_argument("job", help="the job's id or trainingJobs/{id}")
        parser.set_defaults(handler=partial(trainer_cli.run, command))
    sweeps = commands.add_parser(
        "sweeps", help="list, show, watch and cancel hyperparameter sweeps"
    )
    sweeps.set_defaults(handler=_usage(sweeps))
    sub = sweeps.add_subparsers(metavar="COMMAND")
    listing = sub.add_parser("list", help="hyperparameter sweeps, newest first", parents=[client])
    listing.add_argument("--state", type=str.lower, choices=trainer_cli.STATES)
    listing.add_argument("--filter", help="AIP-160, e.g. 'labels.team=\"fraud\"'")
    listing.add_argument(
        "--limit", type=trainer_cli.positive, default=50, help="at most this many (default: 50)"
    )
    listing.set_defaults(handler=partial(sweep_cli.run, sweep_cli.sweeps_list))
    for name, command, help in (
        ("show", sweep_cli.sweeps_show, "a sweep's spec, state, trials and best trial"),
        ("watch", sweep_cli.sweeps_watch, "follow a sweep to its end (exit 0 if it succeeded)"),
        ("cancel", sweep_cli.sweeps_cancel, "cancel a sweep and its running trials"),
    ):
        parser = sub.add_parser(name, help=help, description=help, parents=[client])
        parser.add_argument("sweep", help="the sweep's id or sweepJobs/{id}")
        parser.set_defaults(handler=partial(sweep_cli.run, command))


def _add_optimizer_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    optimizer_cli.add_client_arguments(client)
    optimize = commands.add_parser(
        "optimize",
        help="make a registered model smaller and faster, gated on accuracy and latency",
        description="Create an optimisation job and follow it: progress on stderr, each "
        "technique's before/after report, gate and outcome on stdout. Each technique flag "
        "adds one result, in the order given; results that pass the gate are registered as "
        "new versions of the source's model. Ctrl-C stops following; the job keeps running.",
        parents=[client],
    )
    optimizer_cli.add_optimize_arguments(optimize)
    optimize.set_defaults(handler=partial(optimizer_cli.run, optimizer_cli.optimize))
    jobs = commands.add_parser(
        "optimizations", help="list, show, watch, cancel optimisation jobs and read reports"
    )
    jobs.set_defaults(handler=_usage(jobs))
    sub = jobs.add_subparsers(metavar="COMMAND")
    listing = sub.add_parser("list", help="optimisation jobs, newest first", parents=[client])
    listing.add_argument("--state", type=str.lower, choices=optimizer_cli.STATES)
    listing.add_argument(
        "--limit", type=trainer_cli.positive, default=50, help="at most this many (default: 50)"
    )
    listing.set_defaults(handler=partial(optimizer_cli.run, optimizer_cli.optimizations_list))
    for name, command, help in (
        ("show", optimizer_cli.optimizations_show, "a job's fields and each result's report"),
        ("watch", optimizer_cli.optimizations_watch, "follow a job to its end (exit 0 if done)"),
        ("cancel", optimizer_cli.optimizations_cancel, "cancel a job (registered results stay)"),
    ):
        parser = sub.add_parser(name, help=help, description=help, parents=[client])
        parser.add_argument("job", help="the job's id or optimizationJobs/{id}")
        parser.set_defaults(handler=partial(optimizer_cli.run, command))
    report = sub.add_parser(
        "report",
        help="one result's before/after report",
        description="one result's before/after report",
        parents=[client],
    )
    report.add_argument(
        "report",
        type=optimizer_cli.report_name,
        metavar="JOB/RESULT_ID",
        help="e.g. abc/static-int8, or optimizationJobs/abc/reports/static-int8",
    )
    report.set_defaults(handler=partial(optimizer_cli.run, optimizer_cli.optimizations_report))


def _add_monitor_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    monitor_cli.add_client_arguments(client)
    drift = commands.add_parser(
        "drift",
        help="a model version's data and prediction drift in one window",
        description="Print the drift report of a model version (its production alias by "
        "default) for the latest closed window: the dataset verdict, then per feature the "
        "test, statistic, p-values, threshold and verdict. --html also writes a page with "
        "a histogram per feature.",
        parents=[client],
    )
    monitor_cli.add_drift_arguments(drift)
    drift.set_defaults(handler=partial(monitor_cli.run, monitor_cli.drift))


def _add_inference_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    inference_cli.add_client_arguments(client)
    inference_cli.add_commands(commands, parents=[client])


def _add_explainer_commands(commands: _Subparsers[argparse.ArgumentParser]) -> None:
    client = argparse.ArgumentParser(add_help=False)
    explainer_cli.add_client_arguments(client)
    explain = commands.add_parser(
        "explain",
        help="explain one prediction of a model version (LIME or Kernel SHAP)",
        description="Explain a model version's prediction (its production alias by default) "
        "for one row of its reference sample (--row N) or a row given (--values): the "
        "summary, then each feature's (or superpixel's) contribution, largest first. The "
        "explainer's picture is saved as explanation.png (--picture PATH, --no-picture).",
        parents=[client],
    )
    explainer_cli.add_explain_arguments(explain)
    explain.set_defaults(handler=partial(explainer_cli.run, explainer_cli.explain))


def _train(args: argparse.Namespace) -> int:
    """``conveyor train``: with --sweep a hyperparameter sweep, else one training
    job (chosen here, as the sweep commands build on the job commands)."""
    if args.parameters:
        return sweep_cli.run(sweep_cli.sweep, args)
    return trainer_cli.run(sweep_cli.train_job, args)


def _usage(parser: argparse.ArgumentParser) -> Handler:
    def print_usage(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return print_usage


def _health(address: str, *, service: str) -> int:
    try:
        status = serving_status(address, service=service)
    except grpc.RpcError as error:
        print(f"{address}: {error.code().name} {error.details()}", file=sys.stderr)
        return 1
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


def _serve(name: str, *, listen: str | None, data_dir: Path | None) -> int:
    try:
        entry = catalog.load(name)
    except KeyError:
        print(
            f"conveyor: the {name} service has no server yet; implemented: "
            f"{', '.join(catalog.IMPLEMENTED) or 'none'}",
            file=sys.stderr,
        )
        return 2
    overrides: dict[str, object] = {}
    if listen is not None:
        overrides["listen"] = listen
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = entry.settings_class(**overrides)
    if "listen" not in settings.model_fields_set:
        # Neither --listen nor CONVEYOR_<SERVICE>_LISTEN: the service's own port.
        settings = settings.model_copy(update={"listen": default_address(name)})
    _use_one_malloc_arena()
    configure_logging(name, level=settings.log_level, json_lines=settings.log_json)
    install_tracer_provider(create_tracer_provider(name, TelemetrySettings()))

    async def run() -> None:
        server = await entry.build_server(settings)
        await server.serve_until_signal()

    asyncio.run(run())
    return 0


def _use_one_malloc_arena() -> None:
    """Give glibc's allocator one arena, before any thread starts.

    With one arena per thread, a 1 MiB chunk read in a worker and freed on the
    event loop goes back to the kernel every time, so every artifact chunk
    page-faults its memory in again: measured, a download cost three times
    the CPU (bench/README.md). Python allocates small objects itself, so the
    shared arena is not a point of contention.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _credentials(data_dir: Path) -> int:
    """Write a development token per role under ``data_dir/credentials``."""
    try:
        written = _write_dev_credentials(data_dir)
    except (ConveyorError, OSError) as error:
        print(f"conveyor credentials: {error}", file=sys.stderr)
        return 1
    _print_credentials(written)
    return 0


def _write_dev_credentials(data_dir: Path) -> dict[str, Path]:
    # The same secret store the services open (CONVEYOR_SECRETS_*, else the local
    # one under the data directory), so that they accept these tokens.
    store = open_secret_store(SecretStoreSettings(), data_dir)
    return write_dev_credentials(store, data_dir / "credentials")


def _print_credentials(written: dict[str, Path]) -> None:
    roles = {user.id: ", ".join(user.roles) for user in DEV_USERS}
    print("Development credentials (valid 8 hours; `conveyor credentials` renews them):")
    for user, path in written.items():
        print(f"  {user:<6} {roles.get(user, ''):<18} export CONVEYOR_TOKEN_FILE={path}")


def _service_list(text: str) -> tuple[str, ...]:
    """``--services registry,policy``: implemented names, in start-up order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names.difference(catalog.IMPLEMENTED))
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected names among {', '.join(catalog.IMPLEMENTED)}; got {text!r}"
        )
    return tuple(name for name in catalog.IMPLEMENTED if name in names)


def _up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    services: Sequence[str] = args.services
    if not services:
        print("conveyor up: no service has a server yet; nothing to start.", file=sys.stderr)
        return 1
    try:
        credentials = _write_dev_credentials(data_dir)
    except (ConveyorError, OSError) as error:
        print(f"conveyor up: cannot write development credentials: {error}", file=sys.stderr)
        return 1
    addresses = {
        name: default_address(name, args.host)
        if args.base_port is None
        else f"{args.host}:{args.base_port + SERVICE_PORTS[name] - FIRST_PORT + 1}"
        for name in catalog.ALL_SERVICES
    }
    # The services find each other, and the lifecycle finds them, by these.
    os.environ.update({f"CONVEYOR_{name.upper()}_ADDR": a for name, a in addresses.items()})
    logs: Path | None = args.logs or (data_dir / "logs" if args.lifecycle else None)
    try:
        children = [
            _child(
                name,
                address=addresses[name],
                data_dir=data_dir,
                logs=logs,
                with_previous=index > 0
                and name not in catalog.STARTED_ALONE
                and services[index - 1] not in catalog.STARTED_ALONE,
            )
            for index, name in enumerate(services)
        ]
    except ValueError as error:  # pydantic's ValidationError: a bad CONVEYOR_* variable
        print(f"conveyor up: {error}", file=sys.stderr)
        return 1
    supervisor = Supervisor(
        children,
        SupervisorPolicy(startup_timeout_s=STARTUP_TIMEOUT_S),
        report=lambda line: print(f"conveyor up: {line}", file=sys.stderr, flush=True),
    )

    def announce() -> None:
        print("\nConveyor is up:")
        for child in children:
            print(f"  {child.name:<10} {child.address}")
        if logs is not None:
            print(f"Service logs: {logs}/<service>.log")
        _print_credentials(credentials)
        print(
            "A service that crashes is restarted. Ctrl-C drains and stops every service "
            "(twice: at once).\n",
            flush=True,
        )
        if args.lifecycle:
            lifecycle_args = argparse.Namespace(data_dir=data_dir, model="cancer", again=False)
            threading.Thread(
                target=lifecycle.run, args=(lifecycle_args, main), name="lifecycle", daemon=True
            ).start()

    with supervisor.stopping_on_signals():
        return supervisor.run(on_ready=announce)


def _child(
    name: str, *, address: str, data_dir: Path, logs: Path | None, with_previous: bool
) -> ChildSpec:
    """How ``conveyor up`` runs ``name``: ``conveyor serve`` in a child process,
    killed when its own drain (its settings' delay and grace) overruns; started
    together with the service before it when ``with_previous``."""
    settings = catalog.load(name).settings_class(listen=address, data_dir=data_dir)
    drain_s = (settings.shutdown_delay + settings.shutdown_grace).total_seconds()
    return ChildSpec(
        name=name,
        argv=(
            sys.executable,
            "-m",
            "conveyor.services.cli",
            "serve",
            name,
            "--listen",
            address,
            "--data-dir",
            str(data_dir),
        ),
        address=address,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        drain_timeout_s=drain_s + DRAIN_MARGIN_S,
        log_file=None if logs is None else logs / f"{name}.log",
        starts_with_previous=with_previous,
    )


if __name__ == "__main__":
    raise SystemExit(main())
