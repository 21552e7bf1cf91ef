"""The audit log: every decision, allow or deny, in an append-only, hash-chained log.

Each entry is a :class:`AuditRecord` whose fields follow Open Policy Agent's
decision-log event where they apply (``decision_id``, ``timestamp``,
``principal``, the action as ``path``, ``resource``, ``input`` with secrets
masked, ``result``, ``reasons``, the policy-set digest, ``trace_id``,
``span_id``). Its hashed form is the proto3 JSON mapping of
``conveyor.policy.v1.Decision`` (proto field names, default values omitted,
``entry_hash`` and ``signature`` left out), as :meth:`AuditRecord.document`
builds it; so the Python names map onto the proto's:

=====================  ==========================
AuditRecord            Decision (JSON)
=====================  ==========================
``decision_id``        ``name`` (``decisions/{decision_id}``)
``sequence``           ``sequence`` (int64: a JSON string)
``timestamp``          ``create_time`` (RFC 3339, UTC)
``kind``               ``kind`` (``DECISION_KIND_*``)
``principal``          ``principal``
``action``             ``action``
``resource``           ``resource``
``input``              ``context``
``result``             ``outcome`` (``OUTCOME_ALLOW`` / ``OUTCOME_DENY``)
``previous_hash``      ``prev_hash``
``hash``               ``entry_hash``
=====================  ==========================

The chain: ``hash`` is the lowercase hex SHA-256 of the ASCII bytes of
``previous_hash`` followed by the RFC 8785 canonical JSON (:func:`canonical_json`)
of the document; the first entry's ``previous_hash`` is 64 zeros. An edit, a
removal or a reordering is therefore found at that entry, offline, from the
entries alone (:func:`verify_records`). The chain head is signed with the secret
store's key over the 32 raw bytes of its hash (:meth:`AuditLog.sign_head`), which
also shows when entries after a signed head were cut off.

Appends run in one write transaction that locks the head row: concurrent appends,
from threads or processes, on SQLite or PostgreSQL, queue and get consecutive
sequence numbers. An append that cannot be written raises
:class:`AuditLogUnavailableError`; the caller must then refuse the action it was
about to allow (fail closed).
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias, cast

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from sqlalchemy.engine import Connection, Engine, Row

from conveyor.services.policy.audit_schema import (
    GENESIS_HASH,
    HEAD_ROW_ID,
    audit_entries,
    audit_head,
    audit_signatures,
)
from conveyor.services.policy.engine import Principal, Resource
from conveyor.shared.errors import InvalidArgumentError, NotFoundError, UnavailableError
from conveyor.shared.pagination import (
    PageCursor,
    decode_page_token,
    encode_page_token,
    fingerprint,
    page_size,
)
from conveyor.shared.secrets import ArtifactSignatureValue, SecretStore, SignatureAlgorithm
from conveyor.shared.storage import read_transaction, write_transaction

logger = logging.getLogger(__name__)

Result = Literal["allow", "deny"]
DecisionKind = Literal["authorization", "promotion"]
Problem = Literal["changed", "removed", "reordered", "truncated", "signature"]

MASK = "***"
_MAX_SAFE_INTEGER = 2**53 - 1
_BATCH = 500

_SECRET_KEY = re.compile(
    r"(password|passwd|passphrase|secret|token|authorization|api_?key|private_?key|"
    r"credential|cookie|(^|_)key$)"
)
_RESULTS: dict[str, str] = {"allow": "OUTCOME_ALLOW", "deny": "OUTCOME_DENY"}
_KINDS: dict[str, str] = {
    "authorization": "DECISION_KIND_AUTHORIZATION",
    "promotion": "DECISION_KIND_PROMOTION",
}
_PRINCIPAL_KINDS: dict[str, str] = {
    "user": "PRINCIPAL_KIND_USER",
    "service": "PRINCIPAL_KIND_SERVICE",
}


class AuditLogUnavailableError(UnavailableError):
    """The audit log could not be written: the privileged action must be refused."""

    default_reason = "AUDIT_LOG_UNAVAILABLE"


# Canonical JSON (RFC 8785) -------------------------------------------------------


def canonical_json(value: object) -> bytes:
    """The RFC 8785 (JSON Canonicalization Scheme) form of ``value``, UTF-8.

    Objects (``Mapping`` with ``str`` keys) have their members sorted by the
    UTF-16 code units of the keys; arrays are lists or tuples; strings are
    escaped as ECMAScript's ``JSON.stringify`` does; numbers are ``int`` (within
    ±(2**53 - 1), the integers a JSON number represents exactly) or finite
    ``float`` (ECMAScript's shortest round-trip form); no whitespace. Anything
    else raises InvalidArgumentError.
    """
    parts: list[str] = []
    _write_canonical(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            "text with a lone UTF-16 surrogate has no canonical JSON form",
            reason="NOT_CANONICAL_JSON",
        ) from None


def _write_canonical(value: object, parts: list[str]) -> None:
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(_json_string(value))
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise InvalidArgumentError(
                "integers in audit entries must lie within ±(2**53 - 1)",
                reason="NOT_CANONICAL_JSON",
            )
        parts.append(str(value))
    elif isinstance(value, float):
        parts.append(_ecmascript_number(value))
    elif isinstance(value, Mapping):
        members: list[tuple[str, object]] = []
        for key, member in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(
                    "JSON object keys must be strings", reason="NOT_CANONICAL_JSON"
                )
            members.append((key, member))
        members.sort(key=lambda item: item[0].encode("utf-16-be", "surrogatepass"))
        parts.append("{")
        for index, (key, member) in enumerate(members):
            if index:
                parts.append(",")
            parts.append(_json_string(key))
            parts.append(":")
            _write_canonical(member, parts)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, item in enumerate(value):
            if index:
                parts.append(",")
            _write_canonical(item, parts)
        parts.append("]")
    else:
        raise InvalidArgumentError(
            f"a {type(value).__name__} has no JSON form", reason="NOT_CANONICAL_JSON"
        )


_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _json_string(text: str) -> str:
    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"

    return '"' + _NEEDS_ESCAPE.sub(escape, text) + '"'


def _ecmascript_number(value: float) -> str:
    """ECMAScript's Number::toString for a finite double (RFC 8785, section 3.2.2.3)."""
    if not math.isfinite(value):
        raise InvalidArgumentError(
            "NaN and infinities have no JSON form", reason="NOT_CANONICAL_JSON"
        )
    if value == 0:
        return "0"  # also -0
    sign = "-" if value < 0 else ""
    # repr gives the shortest digits that round-trip, as ECMAScript requires.
    mantissa, _, exponent_text = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # value = 0.digits... scaled: n is the position of the decimal point
    # relative to the first significant digit (ECMAScript's n).
    leading_zeros = len(whole + fraction) - len((whole + fraction).lstrip("0"))
    n = len(whole) - leading_zeros + int(exponent_text or "0")
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        exponent = n - 1
        exponent_part = f"e{'+' if exponent >= 0 else '-'}{abs(exponent)}"
        text = (digits if k == 1 else digits[0] + "." + digits[1:]) + exponent_part
    return sign + text


def entry_hash(previous_hash: str, document: Mapping[str, Any]) -> str:
    """SHA-256 (lowercase hex) of ``previous_hash``'s ASCII bytes followed by the
    canonical JSON of ``document``."""
    return hashlib.sha256(previous_hash.encode("ascii") + canonical_json(document)).hexdigest()


# Masking ------------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    """Whether a field named ``key`` holds a secret (a password, token, key, ...)."""
    normalized = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower().replace("-", "_")
    return bool(_SECRET_KEY.search(normalized))


def mask_secrets(value: Any) -> Any:
    """``value`` with every member whose key names a secret replaced by ``***``,
    at any depth; lists and tuples become lists, mappings dicts."""
    if isinstance(value, Mapping):
        return {
            str(key): MASK if is_secret_key(str(key)) else mask_secrets(member)
            for key, member in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask_secrets(item) for item in value]
    return value


# Records ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSignature:
    """A signature over a chain head: the 32 raw bytes of that entry's hash."""

    sequence: int
    entry_hash: str
    algorithm: SignatureAlgorithm
    key_id: str
    signature: bytes
    sign_time: datetime

    @property
    def value(self) -> ArtifactSignatureValue:
        """As the secret store verifies it."""
        return ArtifactSignatureValue(
            algorithm=self.algorithm, key_id=self.key_id, signature=self.signature
        )


@dataclass(frozen=True)
class AuditRecord:
    """One recorded decision (see the module docstring for the proto mapping)."""

    decision_id: str
    sequence: int
    timestamp: datetime
    principal: Principal
    action: str
    resource: Resource
    input: Mapping[str, Any]
    result: Result
    policy_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    policy_set_digest: str = ""
    kind: DecisionKind = "authorization"
    gates: tuple[Mapping[str, Any], ...] = ()
    caller: str = ""
    trace_id: str = ""
    span_id: str = ""
    previous_hash: str = GENESIS_HASH
    hash: str = ""
    signature: HeadSignature | None = field(default=None, compare=False)
    """Set on entries whose hash was signed as the chain head."""

    @property
    def name(self) -> str:
        return f"decisions/{self.decision_id}"

    def document(self) -> dict[str, Any]:
        """The hashed document: ``Decision``'s proto3 JSON mapping, defaults
        omitted, without ``entry_hash`` and ``signature``."""
        principal: dict[str, Any] = {
            "id": self.principal.id,
            "kind": _PRINCIPAL_KINDS[self.principal.kind],
        }
        if self.principal.roles:
            principal["roles"] = list(self.principal.roles)
        if self.principal.team:
            principal["team"] = self.principal.team
        resource: dict[str, Any] = {}
        for key, text in (
            ("name", self.resource.name),
            ("type", self.resource.type),
            ("owner_team", self.resource.owner_team),
        ):
            if text:
                resource[key] = text
        if self.resource.attributes:
            resource["attributes"] = dict(self.resource.attributes)
        document: dict[str, Any] = {
            "name": self.name,
            "sequence": str(self.sequence),
            "create_time": format_timestamp(self.timestamp),
            "kind": _KINDS[self.kind],
            "principal": principal,
            "outcome": _RESULTS[self.result],
            "prev_hash": self.previous_hash,
        }
        if resource:
            document["resource"] = resource
        if self.input:
            document["context"] = dict(self.input)
        optional: dict[str, Any] = {
            "action": self.action,
            "policy_ids": list(self.policy_ids),
            "reasons": list(self.reasons),
            "errors": list(self.errors),
            "policy_set_digest": self.policy_set_digest,
            "gates": [dict(gate) for gate in self.gates],
            "caller": self.caller,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
        }
        document.update({key: value for key, value in optional.items() if value})
        return document

    def computed_hash(self) -> str:
        """The hash this record's content gives (equal to ``hash`` unless edited)."""
        return entry_hash(self.previous_hash, self.document())

    @classmethod
    def from_document(
        cls,
        document: Mapping[str, Any],
        *,
        hash: str,
        signature: HeadSignature | None = None,
    ) -> AuditRecord:
        """The record of a :meth:`document` (as stored or exported)."""
        try:
            principal = document["principal"]
            resource = document.get("resource", {})
            name = str(document["name"])
            if not name.startswith("decisions/"):
                raise ValueError("not a decision name")
            return cls(
                decision_id=name.removeprefix("decisions/"),
                sequence=int(document["sequence"]),
                timestamp=parse_timestamp(str(document["create_time"])),
                principal=Principal(
                    kind=_reverse(_PRINCIPAL_KINDS, principal["kind"]),
                    id=str(principal["id"]),
                    roles=tuple(str(role) for role in principal.get("roles", ())),
                    team=str(principal.get("team", "")),
                ),
                action=str(document.get("action", "")),
                resource=Resource(
                    type=str(resource.get("type", "")),
                    name=str(resource.get("name", "")),
                    owner_team=str(resource.get("owner_team", "")),
                    attributes=dict(resource.get("attributes", {})),
                ),
                input=dict(document.get("context", {})),
                result=cast(Result, _reverse(_RESULTS, document["outcome"])),
                policy_ids=tuple(str(item) for item in document.get("policy_ids", ())),
                reasons=tuple(str(item) for item in document.get("reasons", ())),
                errors=tuple(str(item) for item in document.get("errors", ())),
                policy_set_digest=str(document.get("policy_set_digest", "")),
                kind=cast(DecisionKind, _reverse(_KINDS, document["kind"])),
                gates=tuple(dict(gate) for gate in document.get("gates", ())),
                caller=str(document.get("caller", "")),
                trace_id=str(document.get("trace_id", "")),
                span_id=str(document.get("span_id", "")),
                previous_hash=str(document["prev_hash"]),
                hash=hash,
                signature=signature,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise InvalidArgumentError(
                f"not an audit entry document: {type(error).__name__}",
                reason="BAD_AUDIT_ENTRY",
            ) from None


def _reverse(mapping: Mapping[str, str], value: object) -> str:
    for key, mapped in mapping.items():
        if mapped == value:
            return key
    raise ValueError("unknown enum value")


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC as protobuf's JSON mapping writes it: ``Z``, and 0, 3 or 6
    fractional digits."""
    if moment.tzinfo is None:
        raise InvalidArgumentError("audit timestamps must be timezone-aware")
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    micros = moment.microsecond
    if micros % 1_000_000 == 0:
        return text + "Z"
    if micros % 1000 == 0:
        return f"{text}.{micros // 1000:03d}Z"
    return f"{text}.{micros:06d}Z"


def parse_timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment.astimezone(UTC)


# Verification -------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationResult:
    """What :meth:`AuditLog.verify` or :func:`verify_records` found.

    ``first_bad_sequence`` and ``problem`` name the first entry that fails, in
    sequence order: ``changed`` (its content no longer gives its hash, or the
    stored copy disagrees with it), ``removed`` (entries before it are gone: a
    gap, or its ``previous_hash`` is not the previous entry's hash),
    ``reordered`` (it is not where its sequence number says), ``truncated``
    (entries up to a signed or recorded head are gone; the sequence is the first
    missing one) or ``signature`` (its chain-head signature does not verify).
    """

    verified_count: int
    first_bad_sequence: int | None = None
    problem: Problem | None = None
    detail: str = ""
    expected_hash: str = ""
    actual_hash: str = ""
    checked_count: int = 0
    head_sequence: int = 0
    head_hash: str = GENESIS_HASH
    last_signed_sequence: int = 0

    @property
    def verified(self) -> bool:
        return self.problem is None


SignatureVerifier: TypeAlias = Callable[[bytes, HeadSignature], bool]
"""Whether a head signature is valid for the 32 raw hash bytes it signs."""

PublicKey: TypeAlias = Ed25519PublicKey | EllipticCurvePublicKey


def public_key_verifier(keys: Mapping[str, PublicKey]) -> SignatureVerifier:
    """A verifier that checks signatures offline against public keys by key id
    (``local/{fingerprint}``, ``vault-transit/{name}/{version}``); an unknown key
    id fails."""

    def verify(message: bytes, signature: HeadSignature) -> bool:
        key = keys.get(signature.key_id)
        try:
            if isinstance(key, Ed25519PublicKey):
                if signature.algorithm is not SignatureAlgorithm.ED25519:
                    return False
                key.verify(signature.signature, message)
                return True
            if isinstance(key, EllipticCurvePublicKey):
                if signature.algorithm is not SignatureAlgorithm.ECDSA_P256_SHA256:
                    return False
                key.verify(signature.signature, message, ECDSA(SHA256()))
                return True
        except InvalidSignature:
            return False
        return False

    return verify


def store_verifier(secret_store: SecretStore, key_name: str) -> SignatureVerifier:
    """A verifier that asks the secret store (any version of ``key_name``)."""

    def verify(message: bytes, signature: HeadSignature) -> bool:
        return secret_store.verify(key_name, message, signature.value)

    return verify


class _ChainChecker:
    """Checks entries one by one, in the order of their positions."""

    def __init__(
        self,
        verifier: SignatureVerifier | None,
        *,
        expected_sequence: int = 1,
        expected_previous: str = GENESIS_HASH,
    ) -> None:
        self.verifier = verifier
        self.expected_sequence = expected_sequence
        self.expected_previous = expected_previous
        self.verified = 0
        self.checked = 0
        self.last_signed = 0
        self.failure: VerificationResult | None = None

    def fail(
        self,
        sequence: int,
        problem: Problem,
        detail: str,
        *,
        expected: str = "",
        actual: str = "",
    ) -> None:
        self.failure = VerificationResult(
            verified_count=self.verified,
            first_bad_sequence=sequence,
            problem=problem,
            detail=detail,
            expected_hash=expected,
            actual_hash=actual,
        )

    def check(
        self, position: int, record: AuditRecord, *, later_positions: frozenset[int] = frozenset()
    ) -> bool:
        """Check the entry at ``position`` (its sequence where stored); False once
        a break was found."""
        self.checked += 1
        expected = self.expected_sequence
        if position > expected and expected not in later_positions:
            self.fail(
                position,
                "removed",
                f"entries {expected}..{position - 1} are missing before entry {position}",
                expected=self.expected_previous,
                actual=record.previous_hash,
            )
            return False
        if position != expected:
            self.fail(expected, "reordered", f"entry {position} is where entry {expected} belongs")
            return False
        actual = record.computed_hash()
        if actual != record.hash:
            self.fail(
                position,
                "changed",
                f"entry {position}'s content does not give its recorded hash",
                expected=record.hash,
                actual=actual,
            )
            return False
        if record.sequence != position:
            self.fail(
                position,
                "reordered",
                f"entry {record.sequence} is at position {position}",
            )
            return False
        if record.previous_hash != self.expected_previous:
            self.fail(
                position,
                "removed",
                f"entry {position}'s previous hash is not entry {position - 1}'s hash",
                expected=self.expected_previous,
                actual=record.previous_hash,
            )
            return False
        signature = record.signature
        if signature is not None:
            good = (
                self.verifier is not None
                and signature.sequence == position
                and signature.entry_hash == record.hash
                and self.verifier(bytes.fromhex(record.hash), signature)
            )
            if not good:
                self.fail(
                    position,
                    "signature",
                    f"the chain-head signature on entry {position} (key {signature.key_id}) "
                    "does not verify",
                    expected=record.hash,
                    actual=signature.entry_hash,
                )
                return False
            self.last_signed = position
        self.verified += 1
        self.expected_sequence = position + 1
        self.expected_previous = record.hash
        return True

    def result(self, head_sequence: int, head_hash: str) -> VerificationResult:
        if self.failure is not None:
            return dataclasses.replace(
                self.failure,
                checked_count=self.checked,
                head_sequence=head_sequence,
                head_hash=head_hash,
                last_signed_sequence=self.last_signed,
            )
        return VerificationResult(
            verified_count=self.verified,
            checked_count=self.checked,
            head_sequence=head_sequence,
            head_hash=head_hash,
            last_signed_sequence=self.last_signed,
        )


def verify_records(
    records: Iterable[AuditRecord],
    verifier: SignatureVerifier | Mapping[str, PublicKey] | None = None,
) -> VerificationResult:
    """Verify exported records offline, in the order given (from the first entry).

    Signatures (``record.signature``) are checked with ``verifier``: a function,
    or public keys by key id (:func:`public_key_verifier`); without one, any
    signed entry fails.
    """
    check: SignatureVerifier | None
    check = public_key_verifier(verifier) if isinstance(verifier, Mapping) else verifier
    entries = list(records)
    checker = _ChainChecker(check)
    present = [record.sequence for record in entries]
    for index, record in enumerate(entries):
        if not checker.check(
            record.sequence, record, later_positions=frozenset(present[index + 1 :])
        ):
            break
    head = entries[-1] if entries else None
    return checker.result(head.sequence if head else 0, head.hash if head else GENESIS_HASH)


# The log ------------------------------------------------------------------------


class AuditLog:
    """The audit log in a SQL database migrated by ``conveyor.services.policy.migrate``.

    Chain heads are signed with ``signing_key`` (an Ed25519 key in the local
    store, any signing key type in Vault) of ``secret_store``.
    """

    def __init__(self, engine: Engine, secret_store: SecretStore, signing_key: str) -> None:
        self.engine = engine
        self.secret_store = secret_store
        self.signing_key = signing_key
        self._key_ready = False

    # Writing ------------------------------------------------------------------

    def append(
        self,
        *,
        principal: Principal,
        action: str,
        resource: Resource,
        result: Result,
        input: Mapping[str, Any] | None = None,
        policy_ids: Sequence[str] = (),
        reasons: Sequence[str] = (),
        errors: Sequence[str] = (),
        policy_set_digest: str = "",
        kind: DecisionKind = "authorization",
        gates: Sequence[Mapping[str, Any]] = (),
        caller: str = "",
        trace_id: str = "",
        span_id: str = "",
        decision_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> AuditRecord:
        """Record a decision as the next entry and return it.

        Secrets in ``input`` and in the resource's attributes are masked first.
        Raises InvalidArgumentError for content that has no canonical JSON form,
        and :class:`AuditLogUnavailableError` when the entry could not be written:
        the caller must then refuse the action (fail closed).
        """
        if result not in _RESULTS:
            raise InvalidArgumentError("result must be 'allow' or 'deny'")
        if kind not in _KINDS:
            raise InvalidArgumentError("kind must be 'authorization' or 'promotion'")
        if principal.kind not in _PRINCIPAL_KINDS:
            raise InvalidArgumentError("a principal is a 'user' or a 'service'")
        draft = AuditRecord(
            decision_id=decision_id or str(uuid.uuid4()),
            sequence=0,
            timestamp=(timestamp or datetime.now(UTC)).astimezone(UTC),
            principal=principal,
            action=action,
            resource=Resource(
                type=resource.type,
                name=resource.name,
                owner_team=resource.owner_team,
                attributes=mask_secrets(resource.attributes),
            ),
            input=mask_secrets(input or {}),
            result=result,
            policy_ids=tuple(policy_ids),
            reasons=tuple(reasons),
            errors=tuple(errors),
            policy_set_digest=policy_set_digest,
            kind=kind,
            gates=tuple(dict(gate) for gate in gates),
            caller=caller,
            trace_id=trace_id,
            span_id=span_id,
        )
        canonical_json(draft.document())  # refuse unrepresentable content up front
        try:
            with write_transaction(self.engine) as connection:
                head = connection.execute(
                    sa.select(audit_head.c.sequence, audit_head.c.entry_hash)
                    .where(audit_head.c.id == HEAD_ROW_ID)
                    .with_for_update()
                ).one()
                record, body = _sealed(draft, int(head.sequence) + 1, str(head.entry_hash))
                connection.execute(sa.insert(audit_entries).values(**_columns(record), body=body))
                connection.execute(
                    sa.update(audit_head)
                    .where(audit_head.c.id == HEAD_ROW_ID)
                    .values(sequence=record.sequence, entry_hash=record.hash)
                )
        except sa.exc.SQLAlchemyError as error:
            # The driver's message may quote the entry: log the class only.
            logger.error("the audit log could not be written (%s)", type(error).__name__)
            raise AuditLogUnavailableError(
                "the decision could not be recorded in the audit log; the action is refused"
            ) from None
        return record

    def sign_head(self) -> HeadSignature | None:
        """Sign the current head's hash (its 32 raw bytes) with the signing key and
        store the signature; None for an empty log. A head signed already keeps
        its first signature."""
        with read_transaction(self.engine) as connection:
            head = _head(connection)
            if head[0] == 0:
                return None
            existing = connection.execute(
                sa.select(audit_signatures).where(audit_signatures.c.sequence == head[0])
            ).first()
            if existing is not None:
                return _signature(existing)
        if not self._key_ready:
            self.secret_store.ensure_key(self.signing_key, "ed25519")
            self._key_ready = True
        value = self.secret_store.sign(self.signing_key, bytes.fromhex(head[1]))
        signature = HeadSignature(
            sequence=head[0],
            entry_hash=head[1],
            algorithm=value.algorithm,
            key_id=value.key_id,
            signature=value.signature,
            sign_time=datetime.now(UTC),
        )
        with write_transaction(self.engine) as connection:
            existing = connection.execute(
                sa.select(audit_signatures).where(audit_signatures.c.sequence == head[0])
            ).first()
            if existing is not None:
                return _signature(existing)
            connection.execute(
                sa.insert(audit_signatures).values(
                    sequence=signature.sequence,
                    entry_hash=signature.entry_hash,
                    algorithm=signature.algorithm.value,
                    key_id=signature.key_id,
                    signature=signature.signature,
                    sign_time=signature.sign_time,
                )
            )
        return signature

    # Reading ------------------------------------------------------------------

    def get(self, decision_id: str) -> AuditRecord:
        """The entry of ``decision_id``; NotFoundError if there is none."""
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                sa.select(audit_entries).where(audit_entries.c.decision_id == decision_id)
            ).first()
            if row is None:
                raise NotFoundError(
                    f"no decision decisions/{decision_id}", reason="DECISION_NOT_FOUND"
                )
            return _record(row, _signatures(connection, row.sequence, row.sequence))

    def list(
        self,
        *,
        principal_id: str | None = None,
        resource_name: str | None = None,
        result: Result | None = None,
        action: str | None = None,
        kind: DecisionKind | None = None,
        trace_id: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        descending: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[builtins.list[AuditRecord], str]:
        """One page of entries matching every filter given, oldest first (newest
        first with ``descending``), and the next page's token ("" at the end).

        ``resource_name`` ending in ``*`` matches a prefix; ``start_time`` is
        inclusive, ``end_time`` exclusive. ``page_size`` 0 is the default.
        """
        size = _page_size(page_size)
        request = fingerprint(
            principal_id, resource_name, result, action, kind, trace_id,
            start_time.isoformat() if start_time else None,
            end_time.isoformat() if end_time else None, descending,
        )  # fmt: skip
        cursor = decode_page_token(page_token, request) if page_token else None
        query = sa.select(audit_entries)
        column = audit_entries.c
        if principal_id is not None:
            query = query.where(column.principal_id == principal_id)
        if resource_name is not None:
            if resource_name.endswith("*"):
                prefix = resource_name[:-1]
                query = query.where(sa.func.substr(column.resource_name, 1, len(prefix)) == prefix)
            else:
                query = query.where(column.resource_name == resource_name)
        if result is not None:
            query = query.where(column.outcome == _RESULTS.get(result, ""))
        if action is not None:
            query = query.where(column.action == action)
        if kind is not None:
            query = query.where(column.kind == _KINDS.get(kind, ""))
        if trace_id is not None:
            query = query.where(column.trace_id == trace_id)
        if start_time is not None:
            query = query.where(column.create_time >= _utc(start_time))
        if end_time is not None:
            query = query.where(column.create_time < _utc(end_time))
        if cursor is not None:
            bound = cursor.offset
            query = query.where(column.sequence < bound if descending else column.sequence > bound)
        order = column.sequence.desc() if descending else column.sequence.asc()
        query = query.order_by(order).limit(size + 1)
        with read_transaction(self.engine) as connection:
            rows = connection.execute(query).all()
            page = rows[:size]
            if page:
                low = min(row.sequence for row in page)
                high = max(row.sequence for row in page)
                signatures = _signatures(connection, low, high)
            else:
                signatures = {}
            records = [_record(row, signatures) for row in page]
        token = ""
        if len(rows) > size:
            token = encode_page_token(PageCursor(offset=records[-1].sequence), request)
        return records, token

    def export(self, start_sequence: int = 1, end_sequence: int = 0) -> Iterator[AuditRecord]:
        """Entries ``start_sequence``..``end_sequence`` (0: the head when called) in
        sequence order, exactly as stored, with their head signatures; read in
        batches, each its own transaction."""
        with read_transaction(self.engine) as connection:
            end = end_sequence or _head(connection)[0]
        after = max(start_sequence, 1) - 1
        while after < end:
            with read_transaction(self.engine) as connection:
                rows = _entry_batch(connection, after, end)
                if not rows:
                    return
                signatures = _signatures(connection, rows[0].sequence, rows[-1].sequence)
            for row in rows:
                yield _record(row, signatures)
            after = int(rows[-1].sequence)

    def verify_range(self, start_sequence: int, end_sequence: int = 0) -> VerificationResult:
        """Check entries ``start_sequence``..``end_sequence`` (0: the head), starting
        from the first entry's recorded ``previous_hash``; the whole log (with the
        head row and truncation checks) when the range starts at the beginning and
        runs to the head."""
        if start_sequence <= 1 and end_sequence == 0:
            return self.verify()
        start = max(start_sequence, 1)
        with read_transaction(self.engine) as connection:
            head_sequence, head_hash = _head(connection)
        records = list(self.export(start, end_sequence))
        checker = _ChainChecker(
            store_verifier(self.secret_store, self.signing_key),
            expected_sequence=start,
            expected_previous=records[0].previous_hash if records else GENESIS_HASH,
        )
        for record in records:
            if not checker.check(record.sequence, record):
                break
        end = min(end_sequence or head_sequence, head_sequence)
        if checker.failure is None and checker.expected_sequence <= end:
            checker.fail(
                checker.expected_sequence,
                "truncated",
                f"entries {checker.expected_sequence}..{end} are gone",
            )
        return checker.result(head_sequence, head_hash)

    def verify(self) -> VerificationResult:
        """Check the whole log from its first entry, in one consistent snapshot:
        every hash, the order, no gaps, the stored columns against the hashed
        content, the head row, and every chain-head signature."""
        verifier = store_verifier(self.secret_store, self.signing_key)
        checker = _ChainChecker(verifier)
        with read_transaction(self.engine) as connection:
            head_sequence, head_hash = _head(connection)
            signed = {
                int(row.sequence): _signature(row)
                for row in connection.execute(sa.select(audit_signatures))
            }
            after = 0
            last = 0
            while checker.failure is None:
                rows = _entry_batch(connection, after, None)
                if not rows:
                    break
                for row in rows:
                    position = int(row.sequence)
                    try:
                        record = _record(row, signed)
                    except InvalidArgumentError:
                        checker.checked += 1
                        checker.fail(position, "changed", f"entry {position} does not parse")
                        break
                    if not checker.check(position, record):
                        break
                    mismatch = _column_mismatch(row, record)
                    if mismatch:
                        checker.verified -= 1
                        checker.fail(
                            position,
                            "changed",
                            f"entry {position}'s stored {mismatch} differs from its hashed content",
                        )
                        break
                    last = position
                after = int(rows[-1].sequence)
            if checker.failure is None:
                unsigned = [sequence for sequence in signed if sequence > last]
                if head_sequence > last or unsigned:
                    cut = max([head_sequence, *unsigned])
                    checker.fail(
                        last + 1,
                        "truncated",
                        f"entries {last + 1}..{cut} are gone (the head or a signature names "
                        f"entry {cut})",
                    )
                elif head_sequence != last or (last and head_hash != checker.expected_previous):
                    checker.fail(
                        last,
                        "changed",
                        "the recorded head does not match the last entry",
                        expected=head_hash,
                        actual=checker.expected_previous,
                    )
        return checker.result(head_sequence, head_hash)


def _page_size(requested: int) -> int:
    return page_size(requested)


def _sealed(draft: AuditRecord, sequence: int, previous_hash: str) -> tuple[AuditRecord, str]:
    """The entry at ``sequence`` and its stored body: the canonical JSON is made
    once and both stored and hashed (it is the hot path of every decision)."""
    unsealed = dataclasses.replace(draft, sequence=sequence, previous_hash=previous_hash, hash="")
    body = canonical_json(unsealed.document())
    digest = hashlib.sha256(previous_hash.encode("ascii") + body).hexdigest()
    return dataclasses.replace(unsealed, hash=digest), body.decode("utf-8")


def _columns(record: AuditRecord) -> dict[str, Any]:
    return {
        "sequence": record.sequence,
        "decision_id": record.decision_id,
        "create_time": record.timestamp,
        "kind": _KINDS[record.kind],
        "principal_id": record.principal.id,
        "action": record.action,
        "resource_name": record.resource.name,
        "outcome": _RESULTS[record.result],
        "trace_id": record.trace_id,
        "prev_hash": record.previous_hash,
        "entry_hash": record.hash,
    }


def _column_mismatch(row: Row[Any], record: AuditRecord) -> str:
    """The first stored column that disagrees with the record's hashed content."""
    expected = _columns(record)
    for name, value in expected.items():
        stored = getattr(row, name)
        if name == "create_time":
            stored = _utc(stored)
        if stored != value:
            return name
    return ""


def _utc(moment: datetime) -> datetime:
    # SQLite gives back naive datetimes; every stored time is UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _head(connection: Connection) -> tuple[int, str]:
    row = connection.execute(
        sa.select(audit_head.c.sequence, audit_head.c.entry_hash).where(
            audit_head.c.id == HEAD_ROW_ID
        )
    ).one()
    return int(row.sequence), str(row.entry_hash)


def _entry_batch(connection: Connection, after: int, end: int | None) -> list[Row[Any]]:
    query = sa.select(audit_entries).where(audit_entries.c.sequence > after)
    if end is not None:
        query = query.where(audit_entries.c.sequence <= end)
    return list(connection.execute(query.order_by(audit_entries.c.sequence).limit(_BATCH)))


def _signatures(connection: Connection, low: int, high: int) -> dict[int, HeadSignature]:
    rows = connection.execute(
        sa.select(audit_signatures).where(audit_signatures.c.sequence.between(low, high))
    )
    return {int(row.sequence): _signature(row) for row in rows}


def _signature(row: Row[Any]) -> HeadSignature:
    return HeadSignature(
        sequence=int(row.sequence),
        entry_hash=str(row.entry_hash),
        algorithm=SignatureAlgorithm(row.algorithm),
        key_id=str(row.key_id),
        signature=bytes(row.signature),
        sign_time=_utc(row.sign_time),
    )


def _record(row: Row[Any], signatures: Mapping[int, HeadSignature]) -> AuditRecord:
    try:
        document = json.loads(row.body)
    except ValueError:
        raise InvalidArgumentError("a stored audit entry is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("a stored audit entry is not a JSON object")
    return AuditRecord.from_document(
        document, hash=str(row.entry_hash), signature=signatures.get(int(row.sequence))
    )
