"""The audit log outside the service: export files and their offline verification.

An export file is JSON Lines: the first line is ``{"verification_keys": [...]}``
(``VerificationKey`` messages), every next line one ``Decision`` in proto3 JSON
with proto field names, in sequence order, exactly as ``ExportAuditLog`` streamed
it. :func:`verify_export_file` checks it with nothing but the file: every hash,
the order, no gaps, and each chain-head signature against the public keys in the
file (``conveyor audit verify --file``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from google.protobuf import json_format

from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.policy.audit import (
    AuditRecord,
    HeadSignature,
    PublicKey,
    VerificationResult,
    verify_records,
)
from conveyor.shared.errors import InvalidArgumentError, NotFoundError
from conveyor.shared.secrets import SecretStore, SignatureAlgorithm


def verification_keys(store: SecretStore, key_name: str) -> list[pb.VerificationKey]:
    """Every version's public key of the audit signing key (none before the first
    head was signed)."""
    try:
        pems = store.public_keys_pem(key_name)
    except NotFoundError:
        return []
    return [
        pb.VerificationKey(
            key_id=key_id,
            algorithm=registry_pb.SignatureAlgorithm.Value(_algorithm(pem).proto_name),
            public_key_pem=pem,
        )
        for key_id, pem in pems.items()
    ]


def write_export(
    output: IO[str], keys: Iterable[pb.VerificationKey], entries: Iterable[pb.Decision]
) -> int:
    """Write an export file; returns the number of entries written."""
    header = [json_format.MessageToDict(key, preserving_proto_field_name=True) for key in keys]
    output.write(json.dumps({"verification_keys": header}) + "\n")
    count = 0
    for entry in entries:
        document = json_format.MessageToDict(entry, preserving_proto_field_name=True)
        output.write(json.dumps(document, ensure_ascii=False) + "\n")
        count += 1
    return count


def verify_export_file(path: Path) -> VerificationResult:
    """Verify an export file offline."""
    with path.open(encoding="utf-8") as lines:
        header_line = lines.readline()
        try:
            header = json.loads(header_line)
            keys = {
                str(key["key_id"]): _public_key(str(key["public_key_pem"]))
                for key in header["verification_keys"]
            }
        except (ValueError, KeyError, TypeError):
            raise InvalidArgumentError(
                f"{path} is not an audit export: its first line holds no verification keys",
                reason="BAD_AUDIT_EXPORT",
            ) from None
        return verify_records(_records(lines), keys)


def _records(lines: Iterable[str]) -> Iterator[AuditRecord]:
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        try:
            document: object = json.loads(line)
        except ValueError:
            raise InvalidArgumentError(
                f"line {number} of the export is not JSON", reason="BAD_AUDIT_EXPORT"
            ) from None
        if not isinstance(document, dict):
            raise InvalidArgumentError(
                f"line {number} of the export is not a JSON object", reason="BAD_AUDIT_EXPORT"
            )
        yield record_from_json(document)


def record_from_json(document: dict[str, Any]) -> AuditRecord:
    """The audit record of a ``Decision`` in proto3 JSON (as exported)."""
    body = dict(document)
    entry_hash = str(body.pop("entry_hash", ""))
    signed = body.pop("signature", None)
    signature = None
    if signed is not None:
        message = json_format.ParseDict(signed, pb.ChainSignature())
        signature = HeadSignature(
            sequence=int(body.get("sequence", 0)),
            entry_hash=entry_hash,
            algorithm=SignatureAlgorithm(
                registry_pb.SignatureAlgorithm.Name(message.algorithm).removeprefix(
                    "SIGNATURE_ALGORITHM_"
                )
            ),
            key_id=message.key_id,
            signature=message.signature,
            sign_time=message.sign_time.ToDatetime(tzinfo=UTC),
        )
    return AuditRecord.from_document(body, hash=entry_hash, signature=signature)


def _public_key(pem: str) -> PublicKey:
    key = load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, Ed25519PublicKey | EllipticCurvePublicKey):
        raise ValueError("unsupported public key type")
    return key


def _algorithm(pem: str) -> SignatureAlgorithm:
    key = load_pem_public_key(pem.encode("ascii"))
    if isinstance(key, Ed25519PublicKey):
        return SignatureAlgorithm.ED25519
    if isinstance(key, EllipticCurvePublicKey):
        return SignatureAlgorithm.ECDSA_P256_SHA256
    return SignatureAlgorithm.RSA_PSS_SHA256
