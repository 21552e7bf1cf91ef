"""``conveyor audit …`` and ``conveyor approve``: the policy service for people.

``conveyor audit verify`` asks the service to verify its log (or, with
``--file``, verifies an export offline with nothing but the file);
``conveyor audit export`` writes an export file; ``conveyor audit decisions``
lists decisions; ``conveyor approve`` records the caller's approval of a
version for an alias. Failures print like every other command
(``conveyor: <CODE>: <message>`` and a hint) and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from conveyor.policy.v1 import policy_messages_pb2 as rpc
from conveyor.policy.v1 import policy_service_pb2, policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.services.policy.audit import VerificationResult
from conveyor.services.policy.audit_export import verify_export_file, write_export
from conveyor.services.policy.servicer import verification_response
from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import reported
from conveyor.shared.errors import ConveyorError
from conveyor.shared.settings import ClientSettings

if TYPE_CHECKING:
    Policy = policy_service_pb2_grpc.PolicyServiceAsyncStub

POLICY_SERVICE = policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"]
PolicyCommand = Callable[["Policy", argparse.Namespace], Awaitable[int]]

_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: (
        "no valid credentials: set CONVEYOR_TOKEN_FILE to a token file "
        "(`conveyor up` writes development ones under <data-dir>/credentials)"
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        "your role does not allow this: the audit log is for security auditors, "
        "approvals for approvers"
    ),
    grpc.StatusCode.UNAVAILABLE: (
        "is the policy service running? start it with `conveyor serve policy`, or point "
        "at it with --policy HOST:PORT or CONVEYOR_POLICY_ADDR"
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags every policy command takes."""
    parser.add_argument(
        "--policy",
        metavar="HOST:PORT",
        help="policy service address (default: $CONVEYOR_POLICY_ADDR, else 127.0.0.1:50057)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the API's messages)")


def run(command: PolicyCommand, args: argparse.Namespace) -> int:
    """Runs ``command`` against the policy service; every expected failure exits 1."""

    def call() -> int:
        settings = ClientSettings()
        target = args.policy or settings.policy_addr
        return asyncio.run(_with_stub(command, args, settings, target))

    return reported(call, lambda failure: _HINTS.get(failure.code, ""))


def verify_offline(args: argparse.Namespace) -> int:
    """``conveyor audit verify --file F``: no service needed."""
    try:
        result = verify_export_file(args.file)
    except ConveyorError as error:
        return out.report(error, "export a log with `conveyor audit export -o FILE`")
    except OSError as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return 1
    return _print_verification(verification_response(result), args.json, result)


async def audit_verify(policy: Policy, args: argparse.Namespace) -> int:
    """``conveyor audit verify``: the service checks its whole log (or a range)."""
    response = await policy.VerifyAuditLog(
        rpc.VerifyAuditLogRequest(start_sequence=args.start, end_sequence=args.end)
    )
    return _print_verification(response, args.json)


async def audit_export(policy: Policy, args: argparse.Namespace) -> int:
    """``conveyor audit export -o FILE``: the log as a self-verifying file."""
    keys: list[pb.VerificationKey] = []
    entries: list[pb.Decision] = []
    request = rpc.ExportAuditLogRequest(start_sequence=args.start, end_sequence=args.end)
    async for chunk in policy.ExportAuditLog(request, timeout=None):
        keys.extend(chunk.verification_keys)
        entries.extend(chunk.entries)
    partial = args.output.with_name(args.output.name + ".part")
    with partial.open("w", encoding="utf-8") as output:
        count = write_export(output, keys, entries)
    partial.replace(args.output)
    print(
        f"exported {count} entries to {args.output}; check it with "
        f"`conveyor audit verify --file {args.output}`"
    )
    return 0


async def audit_decisions(policy: Policy, args: argparse.Namespace) -> int:
    """``conveyor audit decisions``: recorded decisions, newest first."""
    response = await policy.ListDecisions(
        rpc.ListDecisionsRequest(
            filter=args.filter or "", order_by="sequence desc", page_size=args.limit
        )
    )
    if args.json:
        for decision in response.decisions:
            print(
                json_format.MessageToJson(decision, preserving_proto_field_name=True, indent=None)
            )
        return 0
    for decision in response.decisions:
        outcome = pb.Outcome.Name(decision.outcome).removeprefix("OUTCOME_").lower()
        kind = pb.PrincipalKind.Name(decision.principal.kind).removeprefix("PRINCIPAL_KIND_")
        principal = f"{kind.lower()}:{decision.principal.id}"
        print(
            f"{decision.sequence:>6}  {decision.create_time.ToJsonString()}  {outcome:<5}  "
            f"{principal}  {decision.action}  {decision.resource.name}"
        )
        for reason in decision.reasons:
            print(f"        {reason}")
    return 0


async def approve(policy: Policy, args: argparse.Namespace) -> int:
    """``conveyor approve MODEL/versions/N --alias production``."""
    parent = args.version if args.version.startswith("models/") else f"models/{args.version}"
    response = await policy.CreateApproval(
        rpc.CreateApprovalRequest(
            parent=parent, approval=pb.Approval(alias=args.alias, comment=args.comment or "")
        )
    )
    approval = response.approval
    if args.json:
        print(json_format.MessageToJson(approval, preserving_proto_field_name=True))
    else:
        print(f"approved {parent} for {args.alias!r}: {approval.name}")
    return 0


def _print_verification(
    response: rpc.VerifyAuditLogResponse, as_json: bool, result: VerificationResult | None = None
) -> int:
    if as_json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    elif response.verified:
        print(
            f"verified: {response.verified_count} entries, head {response.head_sequence} "
            f"({response.head_hash[:16]}…), last signed head {response.last_signed_sequence}"
        )
    else:
        found = response.first_break
        kind = pb.ChainBreakKind.Name(found.kind).removeprefix("CHAIN_BREAK_KIND_").lower()
        print(
            f"BROKEN at entry {found.sequence} ({kind}): {found.detail}; "
            f"{response.verified_count} entries verified before it",
        )
    return 0 if response.verified else 3


async def _with_stub(
    command: PolicyCommand, args: argparse.Namespace, settings: ClientSettings, target: str
) -> int:
    channel = settings.channel(target, [POLICY_SERVICE])
    async with channel:
        return await command(policy_service_pb2_grpc.PolicyServiceStub(channel), args)
