"""Deadline propagation: a call made while serving a call inherits its deadline.

The server side records the incoming deadline in a context variable
(:func:`serving_deadline`); the client channel's interceptor
(:class:`conveyor.shared.channel.DeadlineInterceptor`) caps every outgoing
call's timeout at what remains, so work never outlives the caller's patience.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

_deadline: ContextVar[float | None] = ContextVar("conveyor_deadline", default=None)


class serving_deadline:  # noqa: N801 - used as a function: ``with serving_deadline(t):``
    """Within this block, outgoing calls finish within ``time_remaining`` seconds.

    A class rather than a generator-based context manager: every served call
    enters one, and this costs a fraction of that."""

    __slots__ = ("_deadline", "_token")
    _token: Token[float | None]

    def __init__(self, time_remaining: float | None) -> None:
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining

    def __enter__(self) -> None:
        self._token = _deadline.set(self._deadline)

    def __exit__(self, *exc_info: object) -> None:
        _deadline.reset(self._token)


def remaining() -> float | None:
    """Seconds left before the deadline of the call being served, if it has one."""
    deadline = _deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def effective_timeout(requested: float | None, default: float | None) -> float | None:
    """The timeout an outgoing call gets: its own (or the default), capped by the
    deadline being served."""
    timeout = requested if requested is not None else default
    left = remaining()
    if left is None:
        return timeout
    return left if timeout is None else min(timeout, left)
