"""A pytest plugin that watches the whole test run for leaked secrets.

Canaries are a fixed canary secret injected into every test's configuration
(as the client bearer token ``CONVEYOR_TOKEN``, which the ``clean_environment``
fixture sets again after clearing, so every command-line call sends it), plus
every real secret the run makes or configures: each bearer token issued, each
secret read from a secret store (token signing keys included), and each Vault
token and AppRole secret id a Vault secret store is given.

Everything a secret could leak into is watched while the tests run: every log
record (message, arguments, exception text and extra fields) of every logger,
every span that ends (name, attributes, events, status), and every error a
server sends (``ConveyorError.to_status``: message and metadata). A canary seen
anywhere fails the run at the end, naming where (never printing the secret).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from conveyor.shared.auth import tokens
from conveyor.shared.errors import ConveyorError
from conveyor.shared.secrets.local import LocalSecretStore
from conveyor.shared.secrets.vault import VaultSecretStore

CANARY = f"canary-{secrets.token_hex(16)}"
"""The injected canary secret of this run."""

CANARY_ENVIRONMENT = {"CONVEYOR_TOKEN": CANARY}
"""Configuration that carries the canary in every test."""

MIN_SECRET_LENGTH = 16
"""Shorter values read from a store (test fixtures' ``"x"``) would match by chance."""


@dataclass
class CanaryWatch:
    """The secrets to look for and where any of them was seen."""

    canaries: set[str] = field(default_factory=lambda: {CANARY})
    leaks: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, values: Iterable[object]) -> None:
        with self._lock:
            self.canaries.update(
                text
                for text in (
                    v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values
                )
                if len(text) >= MIN_SECRET_LENGTH
            )

    def check(self, where: str, texts: Iterable[object]) -> None:
        with self._lock:
            current = tuple(self.canaries)
        for text in texts:
            value = str(text)
            if any(canary in value for canary in current):
                with self._lock:
                    self.leaks.append(where)
                return


WATCH = CanaryWatch()


class _LeakingLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        texts: list[object] = [record.getMessage(), record.exc_text or ""]
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(repr(record.exc_info[1]))
        texts.extend(value for key, value in vars(record).items() if key not in _LOG_FIELDS)
        WATCH.check(f"log record of {record.name} ({record.pathname}:{record.lineno})", texts)


_LOG_FIELDS = frozenset(vars(logging.makeLogRecord({})))


class _LeakingSpanProcessor(SpanProcessor):
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        texts: list[object] = [span.name, span.status.description or ""]
        texts.extend(_values(span.attributes or {}))
        for event in span.events:
            texts.append(event.name)
            texts.extend(_values(event.attributes or {}))
        WATCH.check(f"span {span.name}", texts)


def _values(attributes: Mapping[str, Any]) -> list[object]:
    return [f"{key}={value}" for key, value in attributes.items()]


def install(tracer_provider: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Watch logs, spans and server errors, and learn every secret the run makes."""
    root = logging.getLogger()
    root.addHandler(_LeakingLogHandler(level=logging.DEBUG))
    # Watch the service logs a deployment keeps (INFO and up), not only warnings.
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
    tracer_provider.add_span_processor(_LeakingSpanProcessor())

    original_to_status = ConveyorError.to_status

    def to_status(self: ConveyorError) -> Any:
        WATCH.check(
            f"{type(self).__name__} sent to a client", [self.message, *self.metadata.values()]
        )
        return original_to_status(self)

    original_issue = tokens.TokenIssuer.issue

    def issue(self: tokens.TokenIssuer, *args: Any, **kwargs: Any) -> str:
        token = original_issue(self, *args, **kwargs)
        WATCH.add([token])
        return token

    original_vault_init = VaultSecretStore.__init__

    def vault_init(self: VaultSecretStore, *args: Any, **kwargs: Any) -> None:
        WATCH.add(kwargs[name] for name in ("token", "secret_id") if kwargs.get(name))
        original_vault_init(self, *args, **kwargs)

    monkeypatch.setattr(VaultSecretStore, "__init__", vault_init)
    monkeypatch.setattr(ConveyorError, "to_status", to_status)
    monkeypatch.setattr(tokens.TokenIssuer, "issue", issue)
    for store in (LocalSecretStore, VaultSecretStore):
        original_read = store.read_secret

        def read_secret(self: Any, path: str, _read: Any = original_read) -> dict[str, str]:
            data: dict[str, str] = _read(self, path)
            WATCH.add(data.values())
            return data

        monkeypatch.setattr(store, "read_secret", read_secret)


def report(session: pytest.Session) -> None:
    """Fail the run if any canary was seen (called at session finish)."""
    if not WATCH.leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = sorted(set(WATCH.leaks))
    message = "secret leak check: a secret appeared in " + "; ".join(lines[:20])
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
