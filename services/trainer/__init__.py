"""The trainer: PyTorch training on built-in, generated or uploaded datasets.

This package holds the trainer's core library, pure and deterministic, usable
in-process: the dataset catalog, the generator, uploads and splits
(:mod:`.datasets`, :mod:`.loaded`, :mod:`.synthetic`, :mod:`.uploads`,
:mod:`.splits`), the architectures (:mod:`.architectures`),
spec validation (:mod:`.specs`), the training loop with checkpoints and resume
(:mod:`.training`, :mod:`.checkpoints`, :mod:`.augmentation`), test metrics
and reference statistics (:mod:`.evaluation`) and the weights format
(:mod:`.weights`). Everything here speaks the ``conveyor.trainer.v1`` and
``conveyor.registry.v1`` messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.services.catalog import ServiceEntry
from conveyor.services.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from conveyor.shared.server import ConveyorServer


async def build_server(settings: TrainerSettings) -> ConveyorServer:
    """The trainer's server (:func:`conveyor.services.trainer.server.build_server`),
    imported when first built, so that a worker process importing this package
    does not load the server's modules."""
    from conveyor.services.trainer import server

    return await server.build_server(settings)


SERVICE = ServiceEntry(settings_class=TrainerSettings, build_server=build_server)

__all__ = ["SERVICE", "TrainerSettings", "build_server"]
