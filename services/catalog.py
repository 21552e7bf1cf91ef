"""Which services exist, how to build each, and where each listens by default.

A service package ``conveyor.services.<name>`` exports ``SERVICE``, a
:class:`ServiceEntry`; adding its name to :data:`IMPLEMENTED` makes
``conveyor serve`` and ``conveyor up`` run it.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from conveyor.shared.ports import SERVICE_PORTS
from conveyor.shared.server import ConveyorServer
from conveyor.shared.settings import ServiceSettings

ALL_SERVICES: tuple[str, ...] = tuple(SERVICE_PORTS)
"""Every service of the suite, in start-up order for ``conveyor up``."""

IMPLEMENTED: tuple[str, ...] = (
    "policy",
    "registry",
    "trainer",
    "optimizer",
    "inference",
    "monitor",
    "explainer",
)
"""Services that have a server, in start-up order (a service starts after the
services it asks on every call: policy first); later issues add theirs here."""

STARTED_ALONE: tuple[str, ...] = ("policy", "registry")
"""Services ``conveyor up`` starts one at a time, each once the one before is
ready: every other service asks them on every call. The others start together
after them (they call each other only while serving requests)."""


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


@dataclass(frozen=True)
class ServiceEntry(Generic[SettingsT]):
    """How to configure and build one service's server."""

    settings_class: type[SettingsT]
    build_server: Callable[[SettingsT], Awaitable[ConveyorServer]]


def load(name: str) -> ServiceEntry[Any]:
    """The entry of an implemented service; ``KeyError`` names the known ones."""
    if name not in IMPLEMENTED:
        raise KeyError(name)
    module = importlib.import_module(f"conveyor.services.{name}")
    entry: ServiceEntry[Any] = module.SERVICE
    return entry
