"""The optimizer: ONNX export, graph optimisation, int8 and fp16 quantisation
and pruning of registered models, each measured against its baseline and
gated on accuracy, latency and parity.

The library, usable in-process: :mod:`.source` (the model and data a job
starts from), :mod:`.transforms` (the model transformations),
:mod:`.pruning`, :mod:`.measurement` (metrics, latency, parity),
:mod:`.gate` (the acceptance gate) and :mod:`.techniques` (one technique
applied and judged, with its report). :mod:`.runtime` picks the execution
provider from whether a GPU is really present.

The service (``conveyor serve optimizer``): :mod:`.server`, :mod:`.servicer`,
:mod:`.jobs` (the queue and the work), :mod:`.store`, :mod:`.registry_gateway`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.services.catalog import ServiceEntry
from conveyor.services.optimizer.settings import OptimizerSettings

if TYPE_CHECKING:
    from conveyor.shared.server import ConveyorServer


async def build_server(settings: OptimizerSettings) -> ConveyorServer:
    """The optimizer's server (:func:`conveyor.services.optimizer.server.build_server`),
    imported when first built: PyTorch and ONNX Runtime load with it."""
    from conveyor.services.optimizer import server

    return await server.build_server(settings)


SERVICE = ServiceEntry(settings_class=OptimizerSettings, build_server=build_server)

__all__ = ["SERVICE", "OptimizerSettings", "build_server"]
