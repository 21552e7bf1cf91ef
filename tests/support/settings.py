"""Settings for servers that the tests build from the shared runtime."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from conveyor.shared.settings import ServiceSettings


class TestServerSettings(ServiceSettings):
    """A server of the tests' own (``CONVEYOR_TESTSERVER_*``)."""

    __test__ = False  # not a pytest test class
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_TESTSERVER_")
    service_name: ClassVar[str] = "testserver"
