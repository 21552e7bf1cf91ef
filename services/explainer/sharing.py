"""Model evaluations shared by the explanations of one call.

The libraries ask for their perturbed samples through a plain function, one
instance per thread. :class:`SharedEvaluations` holds each request until
every explanation still running has asked (or finished), then evaluates all
the rows in one go (which :class:`~.inference_client.InferenceClient` cuts into
as few ``ModelInfer`` calls as the limits allow) and hands each thread its
part. The grouping depends only on which explanations are running, so it is
the same on every run with the same instances.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class EvaluationCancelled(Exception):  # noqa: N818 - an outcome, not a failure
    """The call was cancelled or failed elsewhere; no more evaluations."""


@dataclass
class _Request:
    rows: FloatArray
    result: FloatArray | None = None
    error: BaseException | None = None
    done: bool = False


class SharedEvaluations:
    """Merges the evaluations that ``participants`` threads ask for."""

    def __init__(self, evaluate: Callable[[FloatArray], FloatArray], participants: int) -> None:
        self._evaluate = evaluate
        self._condition = threading.Condition()
        self._active = participants
        self._pending: list[_Request] = []
        self._stopped: BaseException | None = None

    def evaluate(self, rows: FloatArray) -> FloatArray:
        """The model's output rows for ``rows``, evaluated with the rows the
        other running explanations ask for at the same point."""
        request = _Request(rows)
        with self._condition:
            if self._stopped is not None:
                raise EvaluationCancelled(str(self._stopped)) from self._stopped
            self._pending.append(request)
            batch = self._take_if_complete()
        if batch:
            self._run(batch)
        with self._condition:
            while not request.done:
                self._condition.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None  # set with done when there is no error
        return request.result

    def leave(self) -> None:
        """One explanation finished (or failed): it asks for nothing more."""
        with self._condition:
            self._active -= 1
            batch = self._take_if_complete()
        if batch:
            self._run(batch)

    def stop(self, reason: BaseException) -> None:
        """Refuse every later request (the call was cancelled or failed)."""
        with self._condition:
            self._stopped = reason

    def _take_if_complete(self) -> list[_Request]:
        if not self._pending or len(self._pending) < self._active:
            return []
        batch, self._pending = self._pending, []
        return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            outputs = self._evaluate(np.concatenate([r.rows for r in batch]))
        except BaseException as error:  # noqa: BLE001 - every waiting thread gets it
            with self._condition:
                for request in batch:
                    request.error, request.done = error, True
                self._condition.notify_all()
            return
        start = 0
        with self._condition:
            for request in batch:
                request.result = outputs[start : start + len(request.rows)]
                request.done = True
                start += len(request.rows)
            self._condition.notify_all()
