"""The run-wide secret leak watch (tests/support/canary.py) really sees leaks:
each channel is fed the canary once here, and the leak is then taken back so
that the run itself stays clean."""

from __future__ import annotations

import logging

from opentelemetry import trace

from conveyor.shared.errors import NotFoundError
from tests.support import canary


def taken_back(before: int) -> list[str]:
    seen = canary.WATCH.leaks[before:]
    del canary.WATCH.leaks[before:]
    return seen


def test_a_log_record_with_the_canary_is_seen() -> None:
    before = len(canary.WATCH.leaks)
    logging.getLogger("conveyor.test").info("connecting with %s", canary.CANARY)
    assert len(taken_back(before)) == 1


def test_a_span_attribute_with_the_canary_is_seen() -> None:
    before = len(canary.WATCH.leaks)
    with trace.get_tracer("test").start_as_current_span("call") as span:
        span.set_attribute("rpc.token", canary.CANARY)
    assert taken_back(before) == ["span call"]


def test_an_error_sent_to_a_client_with_the_canary_is_seen() -> None:
    before = len(canary.WATCH.leaks)
    NotFoundError("no model", metadata={"token": canary.CANARY}).to_status()
    assert taken_back(before) == ["NotFoundError sent to a client"]


def test_secrets_made_during_the_run_become_canaries() -> None:
    canary.WATCH.add(["a-freshly-issued-token-value"])
    before = len(canary.WATCH.leaks)
    logging.getLogger("conveyor.test").warning("x a-freshly-issued-token-value y")
    assert len(taken_back(before)) == 1
    canary.WATCH.canaries.discard("a-freshly-issued-token-value")
