"""The inference service: the Open Inference Protocol on ONNX Runtime, with
dynamic batching, hot swap, canary and shadow traffic.

The building blocks: :mod:`.tensors` (protocol tensors to NumPy arrays and
back), :mod:`.batching` (the per-version dynamic batcher), :mod:`.models` (a
model's ONNX Runtime session, checked and warmed), :mod:`.versions` (a
registry version loaded to serve), :mod:`.deployments` (one deployment's
hot swaps, on-demand versions and shadow), :mod:`.routing` (the split and the
shadow's comparison), :mod:`.repository` (every
deployment of a process, kept in step with the store and the registry's
aliases), :mod:`.prediction_log` and :mod:`.metrics`.

The service (``conveyor serve inference``): :mod:`.server`, :mod:`.oip` (the
data plane) with :mod:`.metadata` (its descriptive answers), :mod:`.management`
(the control plane) with :mod:`.deployment_config`, :mod:`.store`,
:mod:`.registry_source`.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

from conveyor.services.catalog import ServiceEntry
from conveyor.services.inference.settings import InferenceSettings

if TYPE_CHECKING:
    from conveyor.shared.server import ConveyorServer

_MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


async def build_server(settings: InferenceSettings) -> ConveyorServer:
    """The inference server (:func:`conveyor.services.inference.server.build_server`),
    imported when first built: ONNX Runtime loads with it.

    Several serving processes aggregate their metrics through files
    (prometheus-client's multiprocess mode), which the library only enters
    when the directory is in the environment as it is first imported: so it
    is set here, before the server module imports it.
    """
    if settings.processes > 1 and not os.environ.get(_MULTIPROCESS_ENV):
        settings.service_data_dir.mkdir(parents=True, exist_ok=True)
        os.environ[_MULTIPROCESS_ENV] = tempfile.mkdtemp(
            prefix="metrics-", dir=settings.service_data_dir
        )
    from conveyor.services.inference import server

    return await server.build_server(settings)


SERVICE = ServiceEntry(settings_class=InferenceSettings, build_server=build_server)

__all__ = ["SERVICE", "InferenceSettings", "build_server"]
