"""Typed settings: the only place Conveyor reads its environment.

Every server's settings class derives from :class:`ServiceSettings`, names its
service and reads ``CONVEYOR_<SERVICE>_<FIELD>`` (for example
``CONVEYOR_REGISTRY_LISTEN``)::

    class RegistrySettings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="CONVEYOR_REGISTRY_")
        service_name: ClassVar[str] = "registry"
 Telemetry follows OpenTelemetry's own variable
names so that standard tooling configures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.channel import ClientTLS, create_channel
from conveyor.shared.ports import default_address
from conveyor.shared.secrets.base import SecretStore
from conveyor.shared.secrets.settings import SecretStoreSettings, open_secret_store

MIB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Settings every Conveyor server shares."""

    model_config = SettingsConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_default=True
    )

    service_name: ClassVar[str] = ""
    """Short service name (``registry``); set by each subclass."""

    listen: str = "127.0.0.1:0"
    """``HOST:PORT`` to bind. Port 0 picks a free port (tests); ``conveyor serve``
    passes the service's default port."""

    data_dir: Path = Path(".data")
    """Root data directory; the service writes only below ``<data_dir>/<service>``."""

    max_receive_message_bytes: int = Field(default=16 * MIB, ge=1024)
    """Largest request message accepted. Artifacts stream in chunks well below it;
    raise it only for services that take large tensors in one message."""

    max_send_message_bytes: int = Field(default=16 * MIB, ge=1024)
    """Largest response message sent."""

    shutdown_grace: timedelta = timedelta(seconds=10)
    """How long in-flight calls may run after SIGTERM before they are cancelled."""

    shutdown_delay: timedelta = timedelta(0)
    """After SIGTERM, how long to keep serving while health says NOT_SERVING, so
    load balancers and Kubernetes stop routing here first (set in deploy/)."""

    tls_cert_file: Path | None = None
    """PEM certificate chain of this server. With ``tls_key_file`` it turns TLS on."""

    tls_key_file: Path | None = None
    """PEM private key matching ``tls_cert_file``."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle; when set, callers must present a certificate it signed (mTLS)."""

    log_level: str = "INFO"
    """Python logging level name for this process."""

    log_json: bool = True
    """Emit one JSON object per log line (with the trace id); off for human reading."""

    auth: AuthSettings = Field(default_factory=AuthSettings)
    """Authentication and authorization of callers (``CONVEYOR_AUTH_*``)."""

    secrets: SecretStoreSettings = Field(default_factory=SecretStoreSettings)
    """The secret store holding this service's keys and the token keys
    (``CONVEYOR_SECRETS_*``)."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @property
    def service_data_dir(self) -> Path:
        """``<data_dir>/<service>``: the one directory this service writes to."""
        return self.data_dir / self.service_name

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    def open_secret_store(self) -> SecretStore:
        """The configured secret store (the local one defaults to ``<data_dir>/secrets``,
        shared by the suite's services)."""
        return open_secret_store(self.secrets, self.data_dir)


class TelemetrySettings(BaseSettings):
    """Tracing settings, read from OpenTelemetry's standard variables."""

    model_config = SettingsConfigDict(extra="ignore", use_attribute_docstrings=True)

    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
    )
    """OTLP/gRPC collector address (``http://collector:4317``). Unset: no export."""

    otlp_insecure: bool = Field(
        default=True,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"
        ),
    )
    """Send OTLP without TLS (a collector on the same host or pod)."""

    traces_file: Path | None = Field(default=None, validation_alias="CONVEYOR_TRACES_FILE")
    """Append finished spans as JSON lines to this file (local debugging without a
    collector). Ignored when ``otlp_endpoint`` is set."""

    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, validation_alias="CONVEYOR_TRACES_SAMPLE_RATIO"
    )
    """Share of new traces recorded; a sampled parent is always followed."""


class ClientSettings(BaseSettings):
    """How Conveyor processes reach their peers (``CONVEYOR_<PEER>_ADDR``)."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", extra="ignore", use_attribute_docstrings=True
    )

    registry_addr: str = default_address("registry")
    """Registry address."""
    trainer_addr: str = default_address("trainer")
    """Trainer address."""
    optimizer_addr: str = default_address("optimizer")
    """Optimizer address."""
    inference_addr: str = default_address("inference")
    """Inference address (Open Inference Protocol and management)."""
    monitor_addr: str = default_address("monitor")
    """Monitor address."""
    explainer_addr: str = default_address("explainer")
    """Explainer address."""
    policy_addr: str = default_address("policy")
    """Policy address."""

    ca_file: Path | None = Field(default=None, validation_alias="CONVEYOR_TLS_CA_FILE")
    """PEM CA bundle that signs the services' certificates; set to use TLS."""
    cert_file: Path | None = Field(default=None, validation_alias="CONVEYOR_TLS_CERT_FILE")
    """This process's client certificate, for mTLS."""
    key_file: Path | None = Field(default=None, validation_alias="CONVEYOR_TLS_KEY_FILE")
    """Private key of ``cert_file``."""
    default_timeout: timedelta = timedelta(seconds=30)
    """Deadline for a call that names none."""
    token_file: Path | None = None
    """A file holding the bearer token to send (``CONVEYOR_TOKEN_FILE``); ``conveyor
    up`` writes one per local user. Preferred to ``token``: a file can be 0600, an
    environment variable is seen by every child process."""
    token: SecretStr | None = None
    """The bearer token itself (``CONVEYOR_TOKEN``), when there is no file."""

    def address_of(self, service_name: str) -> str:
        """The configured address of a peer service."""
        value: str = getattr(self, f"{service_name}_addr")
        return value

    def bearer_token(self) -> str | None:
        """The bearer token to send: ``token_file``'s content, else ``token``, else None."""
        if self.token_file is not None:
            return self.token_file.read_text(encoding="ascii").strip() or None
        return self.token.get_secret_value() if self.token is not None else None

    def channel(
        self,
        target: str,
        services: Sequence[ServiceDescriptor],
        *,
        timeout: timedelta | None = None,
    ) -> grpc.aio.Channel:
        """A client's channel to ``target``: these settings' TLS and bearer
        token, ``timeout`` (else ``default_timeout``) for each call. In a process
        with no tracer provider of its own (the CLI), configured telemetry gives
        it one first, so that its calls start their traces
        (:func:`conveyor.shared.telemetry.trace_client_process`)."""
        # Imported here: the telemetry module reads its settings from this one.
        from conveyor.shared.telemetry import trace_client_process

        trace_client_process()
        return create_channel(
            target,
            services=services,
            default_timeout=timeout or self.default_timeout,
            tls=self.tls(),
            bearer_token=self.bearer_token(),
        )

    def tls(self) -> ClientTLS | None:
        """TLS material for channels to peers, or None for plaintext."""
        if self.ca_file is None:
            return None
        return ClientTLS(
            root_certificates=self.ca_file.read_bytes(),
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
        )
