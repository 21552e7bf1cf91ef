"""The monitor service: the prediction log and feedback, drift, performance
decay, outliers, SLOs, alerts with rollback and retraining, canary analysis and
Prometheus metrics for the models in production.

The statistics, free of gRPC and storage so that every number can be checked
against SciPy and scikit-learn: :mod:`.statistics` (drift tests and
distances), :mod:`.drift` (test choice, corrections, verdicts),
:mod:`.performance` (quality against registered metrics), :mod:`.outliers`,
:mod:`.slo`, :mod:`.conditions` (what a rule watches, per window),
:mod:`.alerting` (hysteresis: one alert per incident) and :mod:`.canary`.

The service (``conveyor serve monitor``): :mod:`.server`, :mod:`.servicer`
(ingest, feedback, references, configs, reports) with :mod:`.ingestor`,
:mod:`.ingest`, :mod:`.listing`,
:mod:`.profiles`, :mod:`.references`, :mod:`.config` and :mod:`.reports`;
:mod:`.store` (the log and its windows); :mod:`.evaluation` (what happens when
a window closes); :mod:`.alert_servicer` with :mod:`.alert_filter`, :mod:`.alert_store`,
:mod:`.alerts` and :mod:`.actions` (rules, alerts, rollback and retraining);
:mod:`.authorization` (which model a call is about, for policy);
:mod:`.canary_analysis`; :mod:`.metrics`; and the ``conveyor drift`` command,
:mod:`.cli` with :mod:`.html_report`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.services.catalog import ServiceEntry
from conveyor.services.monitor.settings import MonitorSettings

if TYPE_CHECKING:
    from conveyor.shared.server import ConveyorServer


async def build_server(settings: MonitorSettings) -> ConveyorServer:
    """The monitor server (:func:`conveyor.services.monitor.server.build_server`),
    imported when first built: SciPy and scikit-learn load with it."""
    from conveyor.services.monitor import server

    return await server.build_server(settings)


SERVICE = ServiceEntry(settings_class=MonitorSettings, build_server=build_server)

__all__ = ["SERVICE", "MonitorSettings", "build_server"]
