"""Conveyor: contracts (``conveyor.<service>.v1``, ``conveyor.oip.v2``), the shared
runtime (``conveyor.shared``) and the services (``conveyor.services``)."""

__version__ = "0.1.0"
