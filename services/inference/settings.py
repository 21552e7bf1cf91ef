"""Settings of the inference service (``CONVEYOR_INFERENCE_<FIELD>``)."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from conveyor.shared.ports import default_address
from conveyor.shared.settings import ServiceSettings

DEFAULT_METRICS_LISTEN = "127.0.0.1:9104"


class InferenceSettings(ServiceSettings):
    """Settings of the inference service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_INFERENCE_")
    service_name: ClassVar[str] = "inference"

    processes: int = Field(default=1, ge=1, le=64)
    """Serving processes sharing the port (``SO_REUSEPORT``): the kernel spreads
    connections over them, so serving is not bound to one Python interpreter.
    Each process loads its own copy of every deployed model."""

    worker_of: int = Field(default=0, ge=0)
    """Set by the first serving process on the ones it starts (its process
    id): they bind the same port, serve no metrics, and end with it."""

    database_url: str | None = None
    """SQLAlchemy URL of the deployments database. Unset: SQLite (WAL) at
    ``<data_dir>/inference/inference.db``, shared by the serving processes."""

    config_poll_interval: timedelta = timedelta(milliseconds=500)
    """How often each serving process looks for deployment changes made
    through another process (the control plane may land on any of them)."""

    registry_addr: str = Field(
        default=default_address("registry"),
        validation_alias=AliasChoices("registry_addr", "CONVEYOR_REGISTRY_ADDR"),
    )
    """The registry (``CONVEYOR_REGISTRY_ADDR``): versions, artifacts, alias watch."""

    monitor_addr: str = Field(
        default=default_address("monitor"),
        validation_alias=AliasChoices("monitor_addr", "CONVEYOR_MONITOR_ADDR"),
    )
    """The monitor (``CONVEYOR_MONITOR_ADDR``), which receives the prediction log."""

    artifact_signing_key: str = Field(
        default="artifact-signing", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
    )
    """The secret store's key that signs registry artifacts: a version whose
    signature does not verify is not loaded."""

    default_alias: str = Field(default="production", pattern=r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
    """The alias a model name resolves through when a request or a deployment
    names no version."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Default dynamic batching: the largest merged batch, in rows."""

    max_queue_delay: timedelta = timedelta(0)
    """Default dynamic batching: how long the oldest request may wait for more.
    0 (Triton's default) never holds a request back: batches form from the
    requests that queue while the model computes. A delay trades latency for
    fuller batches."""

    max_queue_size: int = Field(default=1024, ge=1, le=65_536)
    """Default: requests that may wait per version before RESOURCE_EXHAUSTED."""

    intra_op_threads: int = Field(default=0, ge=0, le=256)
    """ONNX Runtime threads inside one operator; 0: the cores divided among
    the serving processes."""

    warmup_iterations: int = Field(default=3, ge=0, le=100)
    """Default warm-up runs per batch size before a version gets traffic."""

    drain_timeout: timedelta = timedelta(seconds=30)
    """How long a version taken out of traffic may finish its requests before
    it is unloaded anyway."""

    prediction_log_sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """The share of served predictions sent to the monitor (per deployment
    overridable); 0 turns the log off."""

    prediction_log_capacity: int = Field(default=10_000, ge=1, le=10_000_000)
    """Prediction records buffered for the monitor; beyond it they are dropped
    and counted, so a slow or absent monitor never slows serving."""

    prediction_log_batch_size: int = Field(default=256, ge=1, le=10_000)
    """Records per call to the monitor."""

    prediction_log_flush_interval: timedelta = timedelta(seconds=1)
    """The longest a record waits in the buffer before it is sent."""

    shadow_queue_size: int = Field(default=256, ge=1, le=65_536)
    """Shadow copies that may wait; more are dropped and counted."""

    metrics_listen: str = DEFAULT_METRICS_LISTEN
    """``host:port`` of the Prometheus ``/metrics`` endpoint; empty: none."""

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        if value and (":" not in value or not value.rsplit(":", 1)[1].isdigit()):
            raise ValueError("metrics_listen must be HOST:PORT or empty")
        return value
