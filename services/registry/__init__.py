"""The model registry: models, versions, content-addressed artifacts, aliases
with a watch stream, attachments and lineage."""

from conveyor.services.catalog import ServiceEntry
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings

SERVICE = ServiceEntry(settings_class=RegistrySettings, build_server=build_server)

__all__ = ["SERVICE", "RegistrySettings", "build_server"]
