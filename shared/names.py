"""Resource names (AIP-122): build them, parse them, refuse malformed ones.

``models/{model}``, ``models/{model}/versions/{version}``,
``models/{model}@{alias}`` and the collection-style names of the other
resources (``trainingJobs/{job}`` …). IDs are lowercase letters, digits and
hyphens, start with a letter and end with a letter or digit (AIP-122's
recommendation, which keeps names safe in URLs, paths and metric labels).
Needs nothing beyond the standard library, so the light client has it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conveyor.shared.errors import FieldViolation, InvalidArgumentError

ID_PATTERN = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ID = re.compile(rf"^{ID_PATTERN}\Z")
_MODEL = re.compile(rf"^models/(?P<model>{ID_PATTERN})\Z")
_VERSION = re.compile(rf"^models/(?P<model>{ID_PATTERN})/versions/(?P<version>[1-9][0-9]{{0,9}})\Z")
_ALIAS = re.compile(rf"^models/(?P<model>{ID_PATTERN})@(?P<alias>{ID_PATTERN})\Z")

COLLECTIONS = (
    "models",
    "datasets",
    "trainingJobs",
    "sweepJobs",
    "optimizationJobs",
    "deployments",
    "alertRules",
    "serviceLevelObjectives",
    "alerts",
    "decisions",
    "approvals",
)
"""Top-level collections whose names are ``<collection>/{id}``."""


@dataclass(frozen=True)
class ModelVersionRef:
    """A model version, named exactly (``version``) or through an alias."""

    model: str
    version: int | None = None
    alias: str | None = None

    @property
    def model_name(self) -> str:
        return model_name(self.model)

    def __str__(self) -> str:
        if self.version is not None:
            return model_version_name(self.model, self.version)
        return f"models/{self.model}@{self.alias}"


def model_name(model_id: str) -> str:
    """``models/{model}`` for a valid id."""
    return f"models/{check_id(model_id, field='model_id')}"


def model_version_name(model_id: str, version: int) -> str:
    """``models/{model}/versions/{version}``; versions count from 1."""
    if version < 1:
        raise _invalid("version", f"versions count from 1, got {version}")
    return f"{model_name(model_id)}/versions/{version}"


def parse_model_name(name: str, *, field: str = "name") -> str:
    """The model id in ``models/{model}``."""
    match = _MODEL.match(name)
    if not match:
        raise _invalid(field, f"expected models/{{model}}, got {name!r}")
    return match["model"]


def parse_model_version_ref(name: str, *, field: str = "name") -> ModelVersionRef:
    """``models/{model}/versions/{version}`` or ``models/{model}@{alias}``."""
    if match := _VERSION.match(name):
        return ModelVersionRef(model=match["model"], version=int(match["version"]))
    if match := _ALIAS.match(name):
        return ModelVersionRef(model=match["model"], alias=match["alias"])
    raise _invalid(
        field,
        f"expected models/{{model}}/versions/{{version}} or models/{{model}}@{{alias}}, "
        f"got {name!r}",
    )


def resource_name(collection: str, resource_id: str) -> str:
    """``<collection>/{id}`` for one of :data:`COLLECTIONS`."""
    if collection not in COLLECTIONS:
        raise ValueError(f"unknown collection {collection!r}")
    return f"{collection}/{check_id(resource_id, field='id')}"


def parse_resource_name(name: str, collection: str, *, field: str = "name") -> str:
    """The id in ``<collection>/{id}``."""
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not _ID.match(name[len(prefix) :]):
        raise _invalid(field, f"expected {collection}/{{id}}, got {name!r}")
    return name[len(prefix) :]


def check_id(resource_id: str, *, field: str) -> str:
    """``resource_id`` if it is a valid id, else INVALID_ARGUMENT naming ``field``."""
    if not _ID.match(resource_id):
        raise _invalid(
            field,
            f"{resource_id!r} is not a valid id: use 1-63 lowercase letters, digits and "
            "hyphens, starting with a letter and not ending with a hyphen",
        )
    return resource_id


def _invalid(field: str, description: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        description, violations=[FieldViolation(field, description)], reason="INVALID_NAME"
    )
