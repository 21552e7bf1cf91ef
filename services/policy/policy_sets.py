"""Every policy set the service has loaded, kept so that the digest recorded in
any decision can be turned back into the exact policy text that decided."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.services.policy.engine import PolicyEngine
from conveyor.services.policy.schema import policy_sets
from conveyor.shared.errors import InvalidArgumentError, NotFoundError
from conveyor.shared.storage import read_transaction, write_transaction

CURRENT = "current"
VERSION_FILE = "VERSION"
"""An optional file in the policy directory naming the set's version (a release tag)."""


class PolicySetStore:
    """Loaded policy sets by digest (blocking: call from workers)."""

    def __init__(self, engine: Engine, active: PolicyEngine, version: str = "") -> None:
        self.engine = engine
        self.active = active
        self.version = version

    def record_active(self) -> None:
        """Remember the active set (once per digest: the first load time stays)."""
        files = [
            {"path": f.path, "sha256": f.sha256, "content": f.content.decode("utf-8")}
            for f in self.active.files
        ]
        with write_transaction(self.engine) as connection:
            known = connection.execute(
                sa.select(policy_sets.c.digest).where(
                    policy_sets.c.digest == self.active.policy_set_digest
                )
            ).first()
            if known is None:
                connection.execute(
                    sa.insert(policy_sets).values(
                        digest=self.active.policy_set_digest,
                        load_time=datetime.now(UTC),
                        version=self.version,
                        files=json.dumps(files),
                    )
                )

    def get(self, digest: str) -> pb.PolicySet:
        """The set with ``digest``, or the active one for ``current``."""
        wanted = self.active.policy_set_digest if digest == CURRENT else digest.lower()
        if len(wanted) != 64 or any(c not in "0123456789abcdef" for c in wanted):
            raise InvalidArgumentError(
                "a policy set is named policySets/{sha256 digest} or policySets/current",
                reason="BAD_POLICY_SET_NAME",
            )
        with read_transaction(self.engine) as connection:
            row = connection.execute(
                sa.select(policy_sets).where(policy_sets.c.digest == wanted)
            ).first()
        if row is None:
            raise NotFoundError(
                f"no policy set with digest {wanted} was ever loaded",
                reason="POLICY_SET_NOT_FOUND",
            )
        files = [pb.PolicyFile(**entry) for entry in json.loads(row.files)]
        active = wanted == self.active.policy_set_digest
        policy_set = pb.PolicySet(
            name=f"policySets/{wanted}",
            digest=wanted,
            engine="cedar",
            version=row.version,
            files=files,
            policy_ids=list(self.active.policy_ids) if active else _policy_ids(files),
            active=active,
        )
        load_time = row.load_time
        policy_set.load_time.FromDatetime(
            load_time.replace(tzinfo=UTC) if load_time.tzinfo is None else load_time
        )
        return policy_set


def _policy_ids(files: list[pb.PolicyFile]) -> list[str]:
    """The ``@id`` annotations of a past set's policy files, in file order."""
    ids: list[str] = []
    for policy_file in files:
        if policy_file.path.endswith(".cedar"):
            for line in policy_file.content.splitlines():
                stripped = line.strip()
                if stripped.startswith('@id("') and stripped.endswith('")'):
                    ids.append(stripped[5:-2])
    return ids
