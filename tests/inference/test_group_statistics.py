"""Statistics over several serving processes: what each publishes, and their sum."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.services.inference import group_statistics
from conveyor.services.inference.group_statistics import StatisticsBoard, merged


def counts(
    name: str, version: str, requests: int, batches: dict[int, int], *, last: int = 0
) -> oip.ModelStatistics:
    """Statistics of ``requests`` answered requests (10 ns each part) computed in
    ``batches`` (batch size → executions)."""
    stats = oip.ModelStatistics(
        name=name,
        version=version,
        last_inference=last,
        inference_count=requests,
        execution_count=sum(batches.values()),
    )
    for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        duration = getattr(stats.inference_stats, part)
        duration.count, duration.ns = requests, 10 * requests
    for size, executions in batches.items():
        entry = stats.batch_stats.add(batch_size=size)
        entry.compute_infer.count, entry.compute_infer.ns = executions, 100 * executions
    return stats


def test_counts_add_up_version_by_version_and_batch_size_by_size() -> None:
    own = oip.ModelStatisticsResponse(
        model_stats=[counts("m", "2", 5, {1: 3, 2: 1}, last=100), counts("a", "1", 1, {1: 1})]
    )
    other = oip.ModelStatisticsResponse(
        model_stats=[counts("m", "2", 7, {4: 1, 1: 3}, last=250), counts("m", "3", 2, {2: 1})]
    )
    total = merged(own, [other])
    assert [(s.name, s.version) for s in total.model_stats] == [("a", "1"), ("m", "2"), ("m", "3")]
    m2 = total.model_stats[1]
    assert (m2.inference_count, m2.execution_count, m2.last_inference) == (12, 8, 250)
    for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        duration = getattr(m2.inference_stats, part)
        assert (duration.count, duration.ns) == (12, 120)
    assert m2.inference_stats.fail.count == 0
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in m2.batch_stats] == [
        (1, 6, 600),
        (2, 1, 100),
        (4, 1, 100),
    ]
    assert merged(own, []) == oip.ModelStatisticsResponse(
        model_stats=sorted(own.model_stats, key=lambda s: (s.name, s.version))
    )


def test_the_board_holds_each_others_latest_counts(tmp_path: Path) -> None:
    first = StatisticsBoard(tmp_path, pid=100)
    second = StatisticsBoard(tmp_path, pid=200)
    first.publish(oip.ModelStatisticsResponse(model_stats=[counts("m", "1", 3, {1: 3})]))
    first.publish(oip.ModelStatisticsResponse(model_stats=[counts("m", "1", 4, {1: 4})]))
    assert first.others() == []
    [seen] = second.others()
    assert seen.model_stats[0].inference_count == 4
    (tmp_path / "300.pb").write_bytes(b"\xff not a message")
    assert [r.model_stats[0].inference_count for r in second.others()] == [4]
    second.forget(100)
    assert second.others() == []
    second.publish(oip.ModelStatisticsResponse())
    first.clear()
    assert list(tmp_path.iterdir()) == []


async def test_a_process_publishes_until_stopped_and_once_more(tmp_path: Path) -> None:
    board = StatisticsBoard(tmp_path, pid=1)
    reader = StatisticsBoard(tmp_path, pid=2)
    served = [0]

    def current() -> oip.ModelStatisticsResponse:
        return oip.ModelStatisticsResponse(model_stats=[counts("m", "1", served[0], {})])

    publishing = asyncio.ensure_future(board.keep_publishing(current))
    for target in (1, 2):
        served[0] = target
        for _ in range(100):
            await asyncio.sleep(group_statistics.PUBLISH_INTERVAL_S / 5)
            if reader.others()[0].model_stats[0].inference_count == target:
                break
        assert reader.others()[0].model_stats[0].inference_count == target
    served[0] = 3
    publishing.cancel()
    await asyncio.gather(publishing, return_exceptions=True)
    assert reader.others()[0].model_stats[0].inference_count == 3
