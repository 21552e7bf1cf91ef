"""Blocking work (database queries, file I/O) run off the event loop.

Unlike ``asyncio.to_thread``, the pool is the service's own: its size bounds
how many database connections are busy at once, and :meth:`WorkerThreads.shutdown`
waits for calls still running in threads (a cancelled RPC does not stop its
thread) before the service closes its database.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class WorkerThreads:
    """A bounded thread pool for one service's blocking calls."""

    def __init__(self, max_workers: int, *, name: str) -> None:
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix=name)

    async def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``function(*args, **kwargs)`` in a worker, with the caller's context
        (trace, deadline) carried over."""
        call = functools.partial(function, *args, **kwargs)
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, context.run, call)

    async def shutdown(self) -> None:
        """Wait for running calls to finish; refuse new ones."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)
