"""``conveyor models …`` and ``conveyor registry …``: the registry for people.

Each public function takes the parsed arguments of one command (wired in
:mod:`conveyor.services.cli`) and returns its exit code. A command opens one
channel to the registry (``--registry``, else ``CONVEYOR_REGISTRY_ADDR``, else
loopback) with the light client's retries for idempotent calls, and gives every
call a deadline. A failed call prints ``conveyor: <CODE>: <message>``, the field
violations and a hint of what to do next, and exits 1 — never a traceback.
Transfers live in :mod:`conveyor.services.registry.cli_transfer`, presentation
in :mod:`conveyor.services.registry.cli_output`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pydantic

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import cli_output as out
from conveyor.shared.errors import ConveyorError, from_rpc_error
from conveyor.shared.settings import ClientSettings

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

REGISTRY_SERVICE = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]
BACKUP_MODULE = "conveyor.services.registry.backup"
PAGE_SIZE = 500
T = TypeVar("T")


class CommandError(Exception):
    """A failure found on this side of the wire: printed like a failed call."""

    def __init__(self, code: str, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


class HintedRpcError(Exception):
    """A failed call with a hint that only the command knows (a kept partial file)."""

    def __init__(self, error: grpc.RpcError, hint: str) -> None:
        super().__init__(str(error))
        self.error, self.hint = error, hint


@dataclasses.dataclass(frozen=True)
class Session:
    """What a command needs to call the registry."""

    registry: Registry
    timeout: float
    """Deadline of each unary call, in seconds."""
    transfer_timeout: float
    """Deadline of a whole upload or download, in seconds."""


EXIT_INTERRUPTED = 130
"""The exit code of a command stopped with Ctrl-C (128 + SIGINT), as shells use."""

TRANSFER_TIMEOUT_S = 3600.0
"""Deadline of an upload or download when ``--timeout`` is not given."""

Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


def reported(call: Callable[[], int], hint_for: Callable[[ConveyorError], str]) -> int:
    """Runs one command (``call`` opens its channels and runs it) and prints
    every expected failure the way all commands do: a failed call as
    ``conveyor: <CODE>: <message>``, its field violations and what ``hint_for``
    advises, exit 1; a :class:`CommandError` likewise; a local error (a file,
    a setting) on one line, exit 1; Ctrl-C, exit 130. Never a traceback."""
    try:
        return call()
    except grpc.RpcError as error:
        failure = from_rpc_error(error)
    except ConveyorError as error:
        failure = error
    except CommandError as error:
        print(f"conveyor: {error.code}: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return 1
    except (OSError, pydantic.ValidationError) as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nconveyor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return out.report(failure, hint_for(failure))


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs ``command`` against the registry; maps every expected failure to exit 1."""
    target = args.registry or "the registry"
    model = getattr(args, "model", None) or _model_of(getattr(args, "reference", ""))

    def call() -> int:
        nonlocal target
        settings = ClientSettings()
        target = args.registry or settings.registry_addr
        try:
            return asyncio.run(_with_session(command, args, settings, target))
        except HintedRpcError as error:
            failure = from_rpc_error(error.error)
            return out.report(failure, error.hint)

    return reported(call, lambda failure: out.hint(failure.code, model=model, target=target))


# -- models ------------------------------------------------------------------


async def models_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models list``: every model, page after page."""

    async def page(token: str) -> tuple[list[pb.Model], str]:
        request = rpc.ListModelsRequest(
            page_size=PAGE_SIZE,
            page_token=token,
            filter=args.filter or "",
            show_archived=args.archived,
        )
        reply = await session.registry.ListModels(request, timeout=session.timeout)
        return list(reply.models), reply.next_page_token

    models = await every_page(page)
    if args.json:
        out.print_json({"models": [out.message_dict(m) for m in models]})
    elif models:
        out.print_table(
            ("name", "owner team", "risk tier", "latest", "aliases"), out.model_rows(models)
        )
    else:
        print("no models" + (" match the filter" if args.filter else ""), file=sys.stderr)
    return 0


async def models_show(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models show``: a model's fields and its aliases."""
    name = model_name(args.model)
    reply = await session.registry.GetModel(rpc.GetModelRequest(name=name), timeout=session.timeout)
    aliases = await list_aliases(session, name)
    if args.json:
        out.print_json(
            {
                "model": out.message_dict(reply.model),
                "aliases": [out.message_dict(a) for a in aliases],
            }
        )
    else:
        out.print_fields(out.model_fields(reply.model, aliases))
    return 0


async def models_versions(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models versions``: a model's versions, newest first by default."""

    async def page(token: str) -> tuple[list[pb.ModelVersion], str]:
        request = rpc.ListModelVersionsRequest(
            parent=model_name(args.model),
            page_size=PAGE_SIZE,
            page_token=token,
            filter=args.filter or "",
            order_by=args.order_by or "",
            show_archived=args.archived,
        )
        reply = await session.registry.ListModelVersions(request, timeout=session.timeout)
        return list(reply.model_versions), reply.next_page_token

    versions = await every_page(page)
    if args.json:
        out.print_json({"model_versions": [out.message_dict(v) for v in versions]})
    elif versions:
        headers = ("version", "format", "stage", "aliases", "metrics", "sha256", "size", "created")
        out.print_table(headers, out.version_rows(versions))
    else:
        print(f"{model_name(args.model)} has no matching versions", file=sys.stderr)
    return 0


async def models_create(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models create``: a new model; prints its name."""
    model = pb.Model(
        owner_team=args.owner_team,
        risk_tier=pb.RiskTier.Value(f"RISK_TIER_{args.risk_tier.upper()}"),
        tags=args.tag or [],
        display_name=args.display_name or "",
        description=args.description or "",
    )
    model_id = out.model_id(args.model)
    reply = await session.registry.CreateModel(
        rpc.CreateModelRequest(model_id=model_id, model=model), timeout=session.timeout
    )
    print(reply.model.name)
    return 0


# -- aliases -----------------------------------------------------------------


async def alias_set(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models alias set``: create or move an alias (compare-and-set)."""
    name = model_name(args.model)
    expected = args.expected or ""
    if expected and expected != "-":
        expected = f"{name}/versions/{expected}"
    request = rpc.SetAliasRequest(
        name=f"{name}/aliases/{args.alias}",
        version=f"{name}/versions/{args.version}",
        reason=args.reason,
        expected_version=expected,
    )
    reply = await session.registry.SetAlias(request, timeout=session.timeout)
    alias = reply.alias
    moved = f" (was {alias.previous_version})" if alias.previous_version else ""
    print(f"{alias.name} -> {alias.version}{moved}, revision {alias.revision}")
    return 0


async def alias_delete(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models alias delete``."""
    name = f"{model_name(args.model)}/aliases/{args.alias}"
    reply = await session.registry.DeleteAlias(
        rpc.DeleteAliasRequest(name=name, reason=args.reason), timeout=session.timeout
    )
    print(f"deleted {name} (pointed at {reply.alias.version}), revision {reply.alias.revision}")
    return 0


async def alias_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor models alias list``."""
    aliases = await list_aliases(session, model_name(args.model))
    if args.json:
        out.print_json({"aliases": [out.message_dict(a) for a in aliases]})
    elif aliases:
        headers = ("alias", "version", "previous", "revision", "updated", "by", "reason")
        out.print_table(headers, out.alias_rows(aliases))
    else:
        print(f"{model_name(args.model)} has no aliases", file=sys.stderr)
    return 0


async def list_aliases(session: Session, model: str) -> list[pb.Alias]:
    """Every alias of ``model``, page after page."""

    async def page(token: str) -> tuple[list[pb.Alias], str]:
        reply = await session.registry.ListAliases(
            rpc.ListAliasesRequest(parent=model, page_size=PAGE_SIZE, page_token=token),
            timeout=session.timeout,
        )
        return list(reply.aliases), reply.next_page_token

    return await every_page(page)


async def every_page(fetch: Callable[[str], Awaitable[tuple[list[T], str]]]) -> list[T]:
    """Everything a List method returns, following ``next_page_token`` to the end."""
    items: list[T] = []
    token = ""
    while True:
        page, token = await fetch(token)
        items.extend(page)
        if not token:
            return items


async def pages_up_to(
    fetch: Callable[[str, int], Awaitable[tuple[list[T], str]]], limit: int, page_size: int
) -> tuple[list[T], bool]:
    """At most ``limit`` items of a List method (``fetch(token, size)``), page
    after page; and whether more were left."""
    items: list[T] = []
    token = ""
    while len(items) < limit:
        page, token = await fetch(token, min(page_size, limit - len(items)))
        items.extend(page)
        if not token:
            return items, False
    return items, True


# -- backup and restore ------------------------------------------------------


def registry_backup(args: argparse.Namespace) -> int:
    """``conveyor registry backup <dir>``: a consistent snapshot of a registry's store."""
    return _run_backup_function("backup_registry", args)


def registry_restore(args: argparse.Namespace) -> int:
    """``conveyor registry restore <dir>``: rebuild a registry's store from a snapshot."""
    return _run_backup_function("restore_registry", args)


def _run_backup_function(function_name: str, args: argparse.Namespace) -> int:
    # Imported when used: the commands that call the registry over gRPC must work
    # where the backup module is missing (a light install, or not written yet).
    try:
        module = importlib.import_module(BACKUP_MODULE)
        function: Callable[..., object] = getattr(module, function_name)
    except (ImportError, AttributeError):
        print(f"conveyor: {BACKUP_MODULE}.{function_name} is not available", file=sys.stderr)
        print("hint: install Conveyor with its server extras", file=sys.stderr)
        return 1
    from conveyor.services.registry.settings import RegistrySettings

    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.database_url is not None:
        overrides["database_url"] = args.database_url
    directory: Path = args.directory
    try:
        settings = RegistrySettings(**overrides)
        result = function(settings, directory)
        if inspect.isawaitable(result):
            result = asyncio.run(_wait(result))
    except ConveyorError as error:
        return out.report(error)
    except (OSError, ValueError) as error:
        print(
            f"conveyor: {function_name.replace('_registry', '')} failed: {error}", file=sys.stderr
        )
        return 1
    verb = "backed up to" if function_name == "backup_registry" else "restored from"
    print(f"registry {verb} {directory}")
    for label, value in out.manifest_summary(result, directory):
        print(f"  {label}: {value}")
    return 0


async def _wait(result: Awaitable[object]) -> object:
    return await result


# -- shared ------------------------------------------------------------------


def model_name(text: str) -> str:
    """``models/churn`` from ``churn`` or ``models/churn``."""
    return text if text.startswith("models/") else f"models/{text}"


def _model_of(reference: str) -> str:
    """``churn`` from ``models/churn@production`` (``<model>`` from nothing)."""
    model = reference.removeprefix("models/").partition("@")[0].partition("/")[0]
    return model or "<model>"


async def _with_session(
    command: Command, args: argparse.Namespace, settings: ClientSettings, target: str
) -> int:
    """Runs ``command`` over one channel (retries for idempotent calls, TLS when set)."""
    channel = settings.channel(target, [REGISTRY_SERVICE])
    async with channel:
        session = Session(
            registry=registry_service_pb2_grpc.RegistryServiceStub(channel),
            timeout=args.timeout or settings.default_timeout.total_seconds(),
            transfer_timeout=args.timeout or TRANSFER_TIMEOUT_S,
        )
        return await command(session, args)
