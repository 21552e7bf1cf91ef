"""Settings of the explainer service (``CONVEYOR_EXPLAINER_<FIELD>``)."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from conveyor.shared.ports import default_address
from conveyor.shared.settings import MIB, ServiceSettings


class ExplainerSettings(ServiceSettings):
    """Settings of the explainer service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_EXPLAINER_")
    service_name: ClassVar[str] = "explainer"

    registry_addr: str = Field(
        default=default_address("registry"),
        validation_alias=AliasChoices("registry_addr", "CONVEYOR_REGISTRY_ADDR"),
    )
    """The registry (``CONVEYOR_REGISTRY_ADDR``): versions, their signatures
    and reference statistics; explanation reports and global importance are
    attached there."""

    inference_addr: str = Field(
        default=default_address("inference"),
        validation_alias=AliasChoices("inference_addr", "CONVEYOR_INFERENCE_ADDR"),
    )
    """The inference service (``CONVEYOR_INFERENCE_ADDR``), whose Open
    Inference Protocol ``ModelInfer`` evaluates the perturbed samples."""

    max_concurrent_explanations: int = Field(default=8, ge=1, le=1_000)
    """Explain, ExplainBatch and ComputeGlobalImportance calls served at once;
    one more gets RESOURCE_EXHAUSTED at once instead of queueing."""

    infer_message_bytes: int = Field(default=4 * MIB, ge=64 * 1024, le=64 * MIB)
    """The largest ``ModelInfer`` request (and response) the explainer sends
    (or accepts): the perturbed samples are cut into as few calls as this
    and the deployment's max batch size allow. Keep it within the inference
    service's ``max_receive_message_bytes``."""

    max_calls_in_flight: int = Field(default=4, ge=1, le=64)
    """``ModelInfer`` calls of one evaluation sent at once (the inference
    service batches and runs them side by side)."""

    seconds_per_evaluation: float = Field(default=10e-6, gt=0, le=1.0)
    """What one model evaluation (one perturbed sample through inference and
    the surrogate's fit) is assumed to cost before any has been measured for
    a version; with ``seconds_per_call`` it says whether a deadline is long
    enough for the requested samples before any work starts. Afterwards each
    version's measured cost is used."""

    seconds_per_call: timedelta = timedelta(milliseconds=20)
    """The fixed cost assumed for an explanation call (registry lookups,
    the first ``ModelInfer``) in the same estimate."""
