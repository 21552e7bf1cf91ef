"""``conveyor promote`` and ``conveyor rollback``: moving an alias, for people.

Both are the registry's ``SetAlias`` with compare-and-set (the alias must
still point where it pointed when the command read it), so two people moving
the same alias cannot overwrite each other unseen. The registry asks the
policy service's promotion gates before the move; a refusal prints each failed
gate and what clears it (an approval, an explanation report, …) and exits 1.
A rollback moves the alias back to the version it pointed at before (its
``previous_version``) or to ``--to N``; it passes the same gates, so a
rollback target must still be approved, and the audit log records it like any
other move.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.optimizer.cli import source_name
from conveyor.services.registry.authorization import GATE_VIOLATION
from conveyor.services.registry.cli import CommandError, Session, model_name
from conveyor.services.registry.cli_output import message_dict, model_id, print_json
from conveyor.shared.errors import FailedPreconditionError, from_rpc_error

REFUSED_BY_GATES = "PROMOTION_REFUSED"
"""The registry's ``ErrorInfo.reason`` when promotion gates refuse a move."""

GATE_HINTS = {
    "approval": "an approver runs `conveyor approve {model}/versions/{version} --alias {alias}` "
    "(someone other than who trained or registered it)",
    "explanation-report": "attach one: `conveyor explain {model}@{version} --attach`",
    "artifact-signature": "the artifact's signature does not verify: register the version again",
}
"""What clears a failed gate, by gate name (metric gates: train a better version)."""


def add_arguments(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Declares ``promote`` and ``rollback``; returns their parsers, whose
    handlers run :func:`promote` and :func:`rollback` in a registry session."""
    promote = commands.add_parser(
        "promote",
        parents=parents,
        help="point an alias (production by default) at a version, through the promotion gates",
        description="Move an alias to a version. The policy service's promotion gates "
        "decide (metric thresholds, signature, explanation report, approvals); a refusal "
        "names each failed gate and what clears it.",
    )
    promote.add_argument(
        "reference",
        type=source_name,
        metavar="MODEL@VERSION",
        help="cancer@3, models/cancer/versions/3, or MODEL@ALIAS for the version it points at",
    )
    promote.add_argument("--to", default="production", metavar="ALIAS", help="default: production")
    promote.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    promote.add_argument("--json", action="store_true", help="print the alias (the API's message)")
    rollback = commands.add_parser(
        "rollback",
        parents=parents,
        help="move an alias back to the version it pointed at before",
        description="Move an alias (production by default) back to its previous version, "
        "or to --to-version N. The move passes the promotion gates like any other.",
    )
    rollback.add_argument("model", help="model id or models/{model}")
    rollback.add_argument("--alias", default="production", help="default: production")
    rollback.add_argument(
        "--to-version", type=int, metavar="N", help="default: the alias's previous version"
    )
    rollback.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    rollback.add_argument("--json", action="store_true", help="print the alias (the API's message)")
    return promote, rollback


async def promote(session: Session, args: argparse.Namespace) -> int:
    """``conveyor promote MODEL@VERSION --to ALIAS``."""
    version = await _concrete_version(session, args.reference)
    model = version.rpartition("/versions/")[0]
    alias = await _alias(session, model, args.to)
    current = alias.version if alias else ""
    if current == version:
        print(f"{model}@{args.to} already points at {version}", file=sys.stderr)
        if args.json and alias is not None:
            print_json(message_dict(alias))
        return 0
    return await _move(session, f"{model}/aliases/{args.to}", version, current, args)


async def rollback(session: Session, args: argparse.Namespace) -> int:
    """``conveyor rollback MODEL``: the alias back to its previous version."""
    model = model_name(args.model)
    alias = await _alias(session, model, args.alias)
    if alias is None:
        raise CommandError(
            "NOT_FOUND",
            f"{model}/aliases/{args.alias} does not exist",
            hint=f"`conveyor models alias list {model_id(model)}` shows the aliases",
        )
    if args.to_version is not None:
        target = f"{model}/versions/{args.to_version}"
    elif alias.previous_version:
        target = alias.previous_version
    else:
        raise CommandError(
            "FAILED_PRECONDITION",
            f"{alias.name} has never pointed at another version: nothing to roll back to",
            hint=f"name one: `conveyor rollback {model_id(model)} --to-version N`",
        )
    if target == alias.version:
        print(f"{alias.name} already points at {target}", file=sys.stderr)
        if args.json:
            print_json(message_dict(alias))
        return 0
    return await _move(session, alias.name, target, alias.version, args)


async def _move(
    session: Session, alias: str, version: str, expected: str, args: argparse.Namespace
) -> int:
    request = rpc.SetAliasRequest(
        name=alias, version=version, reason=args.reason, expected_version=expected or "-"
    )
    try:
        reply = await session.registry.SetAlias(request, timeout=session.timeout)
    except grpc.RpcError as error:
        failure = from_rpc_error(error)
        if isinstance(failure, FailedPreconditionError) and failure.reason == REFUSED_BY_GATES:
            return _print_refusal(failure, alias, version)
        raise
    moved = reply.alias
    if args.json:
        print_json(message_dict(moved))
        return 0
    was = f" (was {moved.previous_version})" if moved.previous_version else ""
    print(f"{moved.name} -> {moved.version}{was}, revision {moved.revision}")
    return 0


def _print_refusal(failure: FailedPreconditionError, alias: str, version: str) -> int:
    model, _, alias_id = alias.partition("/aliases/")
    number = version.rpartition("/")[2]
    decision = failure.metadata.get("decision", "")
    print(
        f"conveyor: refused: moving {alias_id} to {version} failed "
        f"{len(failure.violations)} promotion gate(s)" + (f" ({decision})" if decision else ""),
        file=sys.stderr,
    )
    for violation in failure.violations:
        if violation.type != GATE_VIOLATION:
            continue
        print(f"  ✗ {violation.subject}: {violation.description}", file=sys.stderr)
        hint = GATE_HINTS.get(violation.subject)
        if hint:
            text = hint.format(model=model_id(model), version=number, alias=alias_id)
            print(f"    to clear it: {text}", file=sys.stderr)
    return 1


async def _concrete_version(session: Session, reference: str) -> str:
    """``models/m/versions/N`` for a version name or ``models/m@alias``."""
    if "@" not in reference:
        return reference
    reply = await session.registry.GetModelVersion(
        rpc.GetModelVersionRequest(name=reference), timeout=session.timeout
    )
    return reply.model_version.name


async def _alias(session: Session, model: str, alias_id: str) -> pb.Alias | None:
    reply = await session.registry.ListAliases(
        rpc.ListAliasesRequest(parent=model, page_size=1000), timeout=session.timeout
    )
    for alias in reply.aliases:
        if alias.name == f"{model}/aliases/{alias_id}":
            return alias
    return None
