"""The policy engine: Cedar policies from a directory, and decisions under them.

:meth:`PolicyEngine.load` reads every ``*.cedar`` file of a directory (sorted by
path) and its Cedar schema (``schema.cedarschema``, or ``schema.cedarschema.json``
in Cedar's JSON schema format), parses and validates each file against the
schema, and refuses the set with a :class:`PolicyLoadError` naming the file and
the problem. Every policy must carry a unique ``@id("...")`` annotation: decisions
name the policies that determined them by it.

:meth:`PolicyEngine.authorize` maps a principal, an action, a resource and a
context onto a Cedar request (validated against the schema) and answers with an
:class:`AuthorizationDecision`. Anything but an explicit Allow without errors
(a Deny, no applicable policy, an evaluation or request error) is a deny.

The mapping onto Cedar:

- principal ``user:{id}`` is ``User::"{id}"``, ``service:{id}`` is
  ``Service::"{id}"``, both with attributes ``roles`` and ``team``;
- action ``{service}.{Method}`` is ``Action::"{service}.{Method}"``;
- resource type ``{service}.conveyor.dev/{Kind}`` is the entity type
  ``{service}::{Kind}``, its id the resource name, with attributes
  ``owner_team``, ``risk_tier`` and ``compliance_tags`` (the last two from the
  resource's attributes);
- the context keeps the keys the schema's ``RequestContext`` declares
  (:data:`CONTEXT_ATTRIBUTES`) with string values; a context ``alias`` missing,
  the resource's ``alias`` attribute is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cedarpy

# Principal and Resource are shared with every service's interceptor; re-exported here.
from conveyor.shared.auth.principal import Principal as Principal
from conveyor.shared.auth.principal import Resource as Resource

SCHEMA_FILES: Final = ("schema.cedarschema", "schema.cedarschema.json")
"""The schema file names :meth:`PolicyEngine.load` looks for, in this order."""

PRINCIPAL_KINDS: Final = {"user": "User", "service": "Service"}
"""Principal kinds and the Cedar entity types they map to."""

CONTEXT_ATTRIBUTES: Final = ("alias", "authn_method", "source_ip")
"""Context keys passed to Cedar; they match ``RequestContext`` in the schema."""

_RESOURCE_TYPE = re.compile(r"^([a-z][a-z0-9_]*)\.conveyor\.dev/([A-Z][A-Za-z0-9_]*)\Z")
_ACTION = re.compile(r"^[a-z][a-z0-9_]*\.[A-Z][A-Za-z0-9_]*\Z")


class PolicyLoadError(Exception):
    """A policy set that cannot be used: names the file and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class AuthorizationDecision:
    """The answer: ``allowed`` only on an explicit Allow without errors."""

    allowed: bool
    policy_ids: list[str]
    """The ``@id`` of each policy that determined the outcome (empty for the
    default deny, when no policy applied)."""
    reasons: list[str]
    """Human-readable reasons, suitable for the caller's error message."""
    errors: list[str]
    """Request and evaluation errors; any error makes the outcome deny."""
    policy_set_digest: str


@dataclass(frozen=True)
class PolicyFile:
    """One file of the policy set."""

    path: str
    """Relative to the policy directory, with ``/`` separators."""
    sha256: str
    content: bytes


class PolicyEngine:
    """A loaded, validated policy set; immutable and safe to share across threads."""

    def __init__(
        self,
        *,
        policies: cedarpy.PolicySet,
        schema: cedarpy.Schema,
        files: Sequence[PolicyFile],
        ids_by_cedar_id: Mapping[str, str],
        digest: str,
    ) -> None:
        self._policies = policies
        self._schema = schema
        self._ids_by_cedar_id = dict(ids_by_cedar_id)
        self.files: tuple[PolicyFile, ...] = tuple(files)
        """Every file of the set, schema included, sorted by path."""
        self.policy_set_digest = digest
        """SHA-256 (lowercase hex) over the sorted files' paths and contents."""
        self.policy_ids: tuple[str, ...] = tuple(self._ids_by_cedar_id.values())
        """The ``@id`` of every policy, in file order."""

    @classmethod
    def load(cls, directory: str | Path) -> PolicyEngine:
        """Read, parse and validate the policy set in ``directory``."""
        root = Path(directory)
        if not root.is_dir():
            raise PolicyLoadError(str(root), "not a directory")
        schema_path = next((root / n for n in SCHEMA_FILES if (root / n).is_file()), None)
        if schema_path is None:
            raise PolicyLoadError(str(root), f"no schema file ({' or '.join(SCHEMA_FILES)})")
        policy_paths = sorted(root.rglob("*.cedar"), key=lambda p: p.relative_to(root).as_posix())
        if not policy_paths:
            raise PolicyLoadError(str(root), "no *.cedar policy files")

        schema_file = _read(root, schema_path)
        schema = _parse_schema(schema_file)
        policy_files = [_read(root, path) for path in policy_paths]

        ids_by_cedar_id: dict[str, str] = {}
        defined_in: dict[str, str] = {}
        texts: list[str] = []
        for policy_file in policy_files:
            text = _text(policy_file)
            for policy_id in _check_policy_file(policy_file.path, text, schema):
                if policy_id in defined_in:
                    raise PolicyLoadError(
                        policy_file.path,
                        f'@id("{policy_id}") is already used in {defined_in[policy_id]}',
                    )
                defined_in[policy_id] = policy_file.path
                # Cedar numbers the policies of one text policy0, policy1, ...
                ids_by_cedar_id[f"policy{len(ids_by_cedar_id)}"] = policy_id
            texts.append(text)

        combined = "\n".join(texts)
        try:
            policies = cedarpy.PolicySet.from_str(combined)
        except ValueError as error:  # each file parsed alone, so this is unexpected
            raise PolicyLoadError(str(root), f"policy set does not parse: {error}") from error
        cedar_ids = list(json.loads(cedarpy.policies_to_json_str(combined))["staticPolicies"])
        if sorted(cedar_ids) != sorted(ids_by_cedar_id):
            raise PolicyLoadError(str(root), "policy ids do not line up across files")

        all_files = sorted([*policy_files, schema_file], key=lambda f: f.path)
        return cls(
            policies=policies,
            schema=schema,
            files=all_files,
            ids_by_cedar_id=ids_by_cedar_id,
            digest=policy_set_digest(all_files),
        )

    def authorize(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        context: Mapping[str, Any] | None = None,
    ) -> AuthorizationDecision:
        """Decide whether ``principal`` may perform ``action`` on ``resource``."""
        problems = _request_problems(principal, action, resource)
        if problems:
            return self._deny_with_errors(problems)
        match = _RESOURCE_TYPE.match(resource.type)
        assert match is not None
        resource_type = f"{match.group(1)}::{match.group(2)}"
        principal_uid = {"type": PRINCIPAL_KINDS[principal.kind], "id": principal.id}
        resource_uid = {"type": resource_type, "id": resource.name}
        entities: list[dict[str, Any]] = [
            {
                "uid": principal_uid,
                "attrs": {"roles": sorted(set(principal.roles)), "team": principal.team},
                "parents": [],
            },
            {"uid": resource_uid, "attrs": _resource_attributes(resource), "parents": []},
        ]
        request = {
            "principal": principal_uid,
            "action": {"type": "Action", "id": action},
            "resource": resource_uid,
            "context": _cedar_context(context or {}, resource),
        }
        try:
            result = cedarpy.is_authorized(request, self._policies, entities, schema=self._schema)
        except Exception as error:  # noqa: BLE001 - any failure is a deny (fail closed)
            return self._deny_with_errors([f"policy evaluation failed: {error}"])

        errors = [str(e) for e in result.diagnostics.errors]
        annotations = result.diagnostics.id_annotations_by_reason
        policy_ids = [
            str(annotations.get(cedar_id) or self._ids_by_cedar_id.get(cedar_id, cedar_id))
            for cedar_id in result.diagnostics.reasons
        ]
        decision = result.decision
        allowed = decision == cedarpy.Decision.Allow and not errors
        subject = f"{principal.text} {action} on {resource.name or resource.type}"
        if allowed:
            reasons = [f"{subject}: allowed by {_quoted(policy_ids)}"]
        elif decision == cedarpy.Decision.Deny and policy_ids:
            reasons = [f"{subject}: forbidden by {_quoted(policy_ids)}"]
        elif errors:
            reasons = [f"{subject}: denied, the policies could not decide: {'; '.join(errors)}"]
        else:
            reasons = [f"{subject}: denied, no policy permits it"]
        return AuthorizationDecision(
            allowed=allowed,
            policy_ids=policy_ids,
            reasons=reasons,
            errors=errors,
            policy_set_digest=self.policy_set_digest,
        )

    def _deny_with_errors(self, errors: list[str]) -> AuthorizationDecision:
        return AuthorizationDecision(
            allowed=False,
            policy_ids=[],
            reasons=[f"denied: {e}" for e in errors],
            errors=errors,
            policy_set_digest=self.policy_set_digest,
        )


def policy_set_digest(files: Sequence[PolicyFile]) -> str:
    """SHA-256 (lowercase hex) over the files sorted by path.

    For each file: its path (UTF-8), a NUL byte, the content's length in decimal
    (ASCII), a NUL byte, then the content; so no two different sets collide by
    moving bytes between a path and a content.
    """
    digest = hashlib.sha256()
    for policy_file in sorted(files, key=lambda f: f.path):
        digest.update(policy_file.path.encode() + b"\0")
        digest.update(str(len(policy_file.content)).encode() + b"\0")
        digest.update(policy_file.content)
    return digest.hexdigest()


def _read(root: Path, path: Path) -> PolicyFile:
    relative = path.relative_to(root).as_posix()
    try:
        content = path.read_bytes()
    except OSError as error:
        raise PolicyLoadError(relative, f"cannot be read: {error}") from error
    return PolicyFile(path=relative, sha256=hashlib.sha256(content).hexdigest(), content=content)


def _text(policy_file: PolicyFile) -> str:
    try:
        return policy_file.content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyLoadError(policy_file.path, f"is not UTF-8: {error}") from error


def _parse_schema(schema_file: PolicyFile) -> cedarpy.Schema:
    text = _text(schema_file)
    try:
        if schema_file.path.endswith(".json"):
            return cedarpy.Schema.from_json_str(text)
        return cedarpy.Schema.from_str(text)
    except ValueError as error:
        raise PolicyLoadError(schema_file.path, f"invalid schema: {error}") from error


def _check_policy_file(path: str, text: str, schema: cedarpy.Schema) -> list[str]:
    """Parse and validate one file; return its policies' ``@id`` values in order."""
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as error:
        raise PolicyLoadError(path, f"syntax error: {error}") from error
    if parsed.get("templates"):
        raise PolicyLoadError(path, "templates are not supported; write static policies")
    ids: list[str] = []
    for cedar_id, policy in parsed.get("staticPolicies", {}).items():
        policy_id = (policy.get("annotations") or {}).get("id")
        if not policy_id:
            raise PolicyLoadError(path, f'policy {cedar_id} has no @id("...") annotation')
        ids.append(str(policy_id))
    if not ids:
        raise PolicyLoadError(path, "defines no policy")
    if len(set(ids)) != len(ids):
        raise PolicyLoadError(path, "two policies share an @id")
    result = cedarpy.validate_policies(text, schema)
    if not result.validation_passed:
        by_cedar_id = dict(zip(parsed["staticPolicies"], ids, strict=True))
        problems = "; ".join(
            f"policy {by_cedar_id.get(e.policy_id, e.policy_id)!r}: {e.error}"
            for e in result.errors
        )
        raise PolicyLoadError(path, f"does not validate against the schema: {problems}")
    return ids


def _request_problems(principal: Principal, action: str, resource: Resource) -> list[str]:
    problems = []
    if principal.kind not in PRINCIPAL_KINDS:
        problems.append(
            f"principal kind {principal.kind!r} is not one of {sorted(PRINCIPAL_KINDS)}"
        )
    if not principal.id:
        problems.append("principal id is empty")
    if not _ACTION.match(action):
        problems.append(f"action {action!r} is not of the form {{service}}.{{Method}}")
    if not _RESOURCE_TYPE.match(resource.type):
        problems.append(
            f"resource type {resource.type!r} is not of the form {{service}}.conveyor.dev/{{Kind}}"
        )
    return problems


def _resource_attributes(resource: Resource) -> dict[str, Any]:
    risk_tier = resource.attributes.get("risk_tier", "")
    tags = resource.attributes.get("compliance_tags", ())
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        tags = ()
    return {
        "owner_team": resource.owner_team,
        "risk_tier": risk_tier if isinstance(risk_tier, str) else "",
        "compliance_tags": sorted({t for t in tags if isinstance(t, str)}),
    }


def _cedar_context(context: Mapping[str, Any], resource: Resource) -> dict[str, str]:
    merged: dict[str, Any] = {}
    alias = resource.attributes.get("alias")
    if alias is not None:
        merged["alias"] = alias
    merged.update(context)
    return {
        key: value
        for key, value in merged.items()
        if key in CONTEXT_ATTRIBUTES and isinstance(value, str)
    }


def _quoted(policy_ids: Sequence[str]) -> str:
    return ", ".join(f"policy {policy_id!r}" for policy_id in policy_ids)
