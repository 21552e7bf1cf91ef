"""The explainer service: LIME (tabular and image) and Kernel SHAP
explanations of served model versions, model-agnostic.

The explainer never loads a model: it reads the version's signature and
reference sample from the registry (:mod:`.model_spec`), asks the inference
service's Open Inference Protocol ``ModelInfer`` for every perturbed sample in
as few batched calls as the message size and the deployment's max batch size
allow (:mod:`.inference_client`), with the samples of several instances
sharing calls (:mod:`.sharing`), and runs the libraries themselves
(:mod:`.methods`). :mod:`.requests` checks what a caller asks for,
:mod:`.explaining` puts one call's explanations together, :mod:`.pictures`
draws them, :mod:`.reports` stores explanation reports and global importance
as registry attachments, and :mod:`.servicer` and :mod:`.server` serve them;
:mod:`.cli` is ``conveyor explain``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.services.catalog import ServiceEntry
from conveyor.services.explainer.settings import ExplainerSettings

if TYPE_CHECKING:
    from conveyor.shared.server import ConveyorServer


async def build_server(settings: ExplainerSettings) -> ConveyorServer:
    """The explainer server (:func:`conveyor.services.explainer.server.build_server`),
    imported when first built: LIME, SHAP and scikit-image load with it."""
    from conveyor.services.explainer import server

    return await server.build_server(settings)


SERVICE = ServiceEntry(settings_class=ExplainerSettings, build_server=build_server)

__all__ = ["SERVICE", "ExplainerSettings", "build_server"]
