"""The policy service: who may do what (Cedar), promotion gates, approvals, and
the tamper-evident audit log of every decision."""

from conveyor.services.catalog import ServiceEntry
from conveyor.services.policy.server import build_server
from conveyor.services.policy.settings import PolicySettings

SERVICE = ServiceEntry(settings_class=PolicySettings, build_server=build_server)

__all__ = ["SERVICE", "PolicySettings", "build_server"]
