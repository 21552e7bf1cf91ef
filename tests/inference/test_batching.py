"""Dynamic batching with a real (NumPy) model: concurrent requests merged up to
the max batch size and split back exactly, incompatible shapes kept apart, a
full queue refused at once, expired and abandoned requests never computed, a
failing batch failing only itself, and unloading answering the waiting."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from conveyor.services.inference.batching import DynamicBatcher
from conveyor.shared.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)

LONG = timedelta(seconds=30)
"""A queue delay no test waits out: batches run once full."""


class Model:
    """y = 2x + row sum; records every batch it computed; can be held or fail."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray[Any, Any]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def __call__(self, inputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        await self.release.wait()
        x = inputs["x"]
        self.batches.append(x)
        if self.fail:
            raise RuntimeError("the model failed")
        return {"y": 2 * x + x.sum(axis=1, keepdims=True), "n": np.full(len(x), len(x))}


def rows(start: int, count: int, width: int = 3) -> np.ndarray[Any, Any]:
    return np.arange(start * width, (start + count) * width, dtype=np.float32).reshape(count, width)


async def test_concurrent_requests_are_merged_and_split_back_exactly() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay=LONG, max_queue_size=16)
    inputs = [rows(i, 2) for i in range(4)]  # 4 requests x 2 rows = one full batch of 8
    answers = await asyncio.gather(*(batcher.infer({"x": x}) for x in inputs))
    assert [len(b) for b in model.batches] == [8]
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], 2 * x + x.sum(axis=1, keepdims=True))
        assert answer["n"].tolist() == [8, 8]
    stats = batcher.statistics
    assert (stats.requests, stats.executions, stats.rows) == (4, 1, 8)
    assert stats.batch_sizes == {8: 1}
    assert stats.queue_ns >= 0
    await batcher.close()


async def test_batches_never_exceed_the_max_and_a_short_delay_runs_partial_batches() -> None:
    model = Model()
    batcher = DynamicBatcher(
        model, max_batch_size=4, max_queue_delay=timedelta(milliseconds=20), max_queue_size=64
    )
    answers = await asyncio.gather(*(batcher.infer({"x": rows(i, 1)}) for i in range(10)))
    assert all(len(b) <= 4 for b in model.batches)
    assert sum(len(b) for b in model.batches) == 10
    assert [a["y"].shape for a in answers] == [(1, 3)] * 10
    # Every request got its own row back.
    for i, answer in enumerate(answers):
        x = rows(i, 1)
        np.testing.assert_array_equal(answer["y"], 2 * x + x.sum(axis=1, keepdims=True))
    await batcher.close()


async def test_requests_of_other_shapes_or_types_are_not_merged() -> None:
    model = Model()
    batcher = DynamicBatcher(
        model, max_batch_size=8, max_queue_delay=timedelta(milliseconds=20), max_queue_size=16
    )
    await asyncio.gather(
        batcher.infer({"x": rows(0, 1, width=3)}),
        batcher.infer({"x": rows(0, 1, width=5)}),
        batcher.infer({"x": rows(1, 1, width=3)}),
        batcher.infer({"x": rows(0, 1, width=3).astype(np.float64)}),
    )
    assert sorted((len(b), b.shape[1], b.dtype.name) for b in model.batches) == [
        (1, 3, "float64"),
        (1, 5, "float32"),
        (2, 3, "float32"),
    ]
    await batcher.close()


async def test_a_full_queue_refuses_at_once() -> None:
    model = Model()
    model.release.clear()  # hold the first batch in the model
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_delay=LONG, max_queue_size=2)
    first = asyncio.create_task(batcher.infer({"x": rows(0, 1)}))
    await asyncio.sleep(0.05)  # the first is being computed; the queue is empty
    queued = [asyncio.create_task(batcher.infer({"x": rows(i, 1)})) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhaustedError) as refused:
        await batcher.infer({"x": rows(3, 1)})
    assert refused.value.reason == "QUEUE_FULL"
    assert batcher.statistics.refused_full == 1
    model.release.set()
    await asyncio.gather(first, *queued)
    assert len(model.batches) == 3
    await batcher.close()


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_computed() -> None:
    model = Model()
    model.release.clear()
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_delay=LONG, max_queue_size=8)
    busy = asyncio.create_task(batcher.infer({"x": rows(0, 1)}))
    await asyncio.sleep(0.05)
    doomed = asyncio.create_task(batcher.infer({"x": rows(7, 1)}, deadline=time.monotonic() + 0.05))
    await asyncio.sleep(0.2)  # its deadline passes while the model is held
    model.release.set()
    await busy
    with pytest.raises(DeadlineExceededError) as expired:
        await doomed
    assert expired.value.reason == "DEADLINE_PASSED_IN_QUEUE"
    assert all(not np.array_equal(b, rows(7, 1)) for b in model.batches)
    with pytest.raises(DeadlineExceededError):
        await batcher.infer({"x": rows(8, 1)}, deadline=time.monotonic() - 1)
    assert batcher.statistics.expired == 2
    await batcher.close()


async def test_a_caller_that_goes_away_is_not_computed() -> None:
    model = Model()
    model.release.clear()
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_delay=LONG, max_queue_size=8)
    busy = asyncio.create_task(batcher.infer({"x": rows(0, 1)}))
    await asyncio.sleep(0.05)
    abandoned = asyncio.create_task(batcher.infer({"x": rows(5, 1)}))
    await asyncio.sleep(0)
    abandoned.cancel()
    model.release.set()
    await busy
    later = await batcher.infer({"x": rows(6, 1)})
    assert later["y"].shape == (1, 3)
    assert [b[0, 0] for b in model.batches] == [0.0, 18.0]  # rows 0 and 6, not 5
    await batcher.close()


async def test_a_failing_batch_fails_only_its_requests() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay=LONG, max_queue_size=8)
    model.fail = True
    results = await asyncio.gather(
        batcher.infer({"x": rows(0, 1)}), batcher.infer({"x": rows(1, 1)}), return_exceptions=True
    )
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    model.fail = False
    answers = await asyncio.gather(
        batcher.infer({"x": rows(2, 1)}), batcher.infer({"x": rows(3, 1)})
    )
    assert len(answers) == 2
    assert batcher.statistics.failed == 2
    await batcher.close()


async def test_bad_batches_and_unloading() -> None:
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay=LONG, max_queue_size=8)
    with pytest.raises(InvalidArgumentError) as too_big:
        await batcher.infer({"x": rows(0, 3)})
    assert too_big.value.reason == "BATCH_TOO_LARGE"
    with pytest.raises(InvalidArgumentError):
        await batcher.infer({"x": rows(0, 1), "z": rows(0, 2)})
    waiting = asyncio.create_task(batcher.infer({"x": rows(0, 1)}))  # half a batch: waits
    await asyncio.sleep(0.05)
    await batcher.close()
    with pytest.raises(UnavailableError):
        await waiting
    with pytest.raises(UnavailableError):
        await batcher.infer({"x": rows(0, 1)})
    assert model.batches == []
