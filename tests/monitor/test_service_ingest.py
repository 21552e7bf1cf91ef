"""The monitor's prediction log over gRPC: ingest, windows, feedback, listing,
erasure, backpressure and bad input, against a real registry."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.shared.errors import InvalidArgumentError
from tests.monitor.conftest import Suite, records, running_suite
from tests.support.registry import expect_error, refused


async def a_monitored_version(suite: Suite, model_id: str = "churn", window: int = 100) -> str:
    version = await suite.register(model_id)
    rng = np.random.default_rng(0)
    await suite.set_reference(version, rng.normal(size=(500, 4)))
    await suite.configure(
        f"models/{model_id}",
        ["window"],
        window=pb.WindowSpec(row_count=window, min_rows=50),
    )
    return version


async def test_records_fill_count_windows_and_duplicates_are_ignored(suite: Suite) -> None:
    version = await a_monitored_version(suite)
    batch = records(version, np.random.default_rng(1).normal(size=(250, 4)))

    first = await suite.log(batch)
    again = await suite.log(batch)

    assert (first.accepted_count, first.duplicate_count) == (250, 0)
    assert (again.accepted_count, again.duplicate_count) == (0, 250)
    report = await suite.monitor.GetOperationsReport(
        rpc.GetOperationsReportRequest(model_version=version), timeout=10
    )
    window = report.operations_report.window
    assert (window.index, window.row_count, window.closed) == (1, 100, True)
    open_window = await suite.monitor.GetOperationsReport(
        rpc.GetOperationsReportRequest(
            model_version=version, window=pb.WindowSelector(open_window=True)
        ),
        timeout=10,
    )
    assert (
        open_window.operations_report.window.index,
        open_window.operations_report.prediction_count,
    ) == (2, 50)
    assert suite.parts.evaluator.evaluated == 2


async def test_a_stream_counts_every_message(suite: Suite) -> None:
    version = await a_monitored_version(suite)
    values = np.random.default_rng(2).normal(size=(30, 4))

    async def messages():  # type: ignore[no-untyped-def]
        for start in (0, 10, 20):
            yield rpc.LogPredictionsRequest(
                records=records(version, values[start : start + 10], start=start)
            )
        yield rpc.LogPredictionsRequest(records=records(version, values[:10]))

    reply = await suite.monitor.LogPredictions(messages(), timeout=30)

    assert (reply.accepted_count, reply.duplicate_count) == (30, 10)


async def test_operations_report_counts_errors_latency_and_outliers(suite: Suite) -> None:
    version = await a_monitored_version(suite, window=100)
    rng = np.random.default_rng(3)
    ok = records(version, rng.normal(size=(80, 4)), latency_ms=4.0)
    far = records(version, rng.normal(size=(10, 4)) + 25.0, prefix="far", latency_ms=12.0)
    failed = records(version, rng.normal(size=(10, 4)), prefix="err", status_code=13)

    await suite.log(ok + far + failed)

    reply = await suite.monitor.GetOperationsReport(
        rpc.GetOperationsReportRequest(model_version=version, window=pb.WindowSelector(index=0)),
        timeout=10,
    )
    report = reply.operations_report
    assert (report.prediction_count, report.error_count) == (100, 10)
    assert report.error_rate == pytest.approx(0.1)
    expected = np.percentile([4.0] * 80 + [12.0] * 10, [50, 99]) / 1000
    assert report.latency_p50.ToMicroseconds() == round(expected[0] * 1e6)
    assert report.latency_p99.ToMicroseconds() == round(expected[1] * 1e6)
    assert report.outlier_count >= 10  # the far rows, and about 1% of the others
    assert report.outlier_rate == pytest.approx(report.outlier_count / 90)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.features.numerical.append(1.0), "records[3].features"),
        (
            lambda r: r.features.numerical.__setitem__(2, float("nan")),
            "records[3].features.numerical[2]",
        ),
        (
            lambda r: r.features.numerical.__setitem__(1, float("inf")),
            "records[3].features.numerical[1]",
        ),
        (lambda r: r.ClearField("latency"), "records[3].latency"),
        (lambda r: setattr(r, "request_id", ""), "records[3].request_id"),
        (
            lambda r: setattr(r, "model_version", "models/churn@production"),
            "records[3].model_version",
        ),
        (
            lambda r: setattr(r, "model_version", "models/churn/versions/9"),
            "records[3].model_version",
        ),
        (lambda r: r.outputs.append(0.5), "records[3].outputs"),
        (lambda r: setattr(r, "status_code", 99), "records[3].status_code"),
    ],
)
async def test_a_bad_record_refuses_the_whole_batch_naming_it(
    suite: Suite, change: object, field: str
) -> None:
    version = await a_monitored_version(suite)
    batch = records(version, np.random.default_rng(4).normal(size=(6, 4)))
    change(batch[3])  # type: ignore[operator]

    error = await refused(
        suite.monitor.BatchLogPredictions(
            rpc.BatchLogPredictionsRequest(records=batch), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    assert isinstance(error, InvalidArgumentError)
    assert field in [v.field for v in error.violations]
    listed = await suite.monitor.ListPredictions(
        rpc.ListPredictionsRequest(parent=version), timeout=10
    )
    assert list(listed.predictions) == []  # nothing of the batch was stored
    good = records(version, np.random.default_rng(4).normal(size=(6, 4)))
    assert (await suite.log(good)).accepted_count == 6  # and the service still works


async def test_a_full_ingest_queue_answers_resource_exhausted_at_once(tmp_path: Path) -> None:
    async for suite in running_suite(tmp_path, ingest_capacity=1_000):
        version = await a_monitored_version(suite)
        batch = records(version, np.random.default_rng(5).normal(size=(1_001, 4)))

        failure = await expect_error(
            suite.monitor.BatchLogPredictions(
                rpc.BatchLogPredictionsRequest(records=batch), timeout=10
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )

        error = await refused(
            suite.monitor.BatchLogPredictions(
                rpc.BatchLogPredictionsRequest(records=batch), timeout=10
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert error.reason == "INGEST_QUEUE_FULL"
        assert error.metadata["retry_after_ms"] == "250"
        assert "retry" in (failure.details() or "")
        assert (await suite.log(batch[:1_000])).accepted_count == 1_000


async def test_feedback_joins_late_early_corrected_and_repeated_labels(suite: Suite) -> None:
    version = await a_monitored_version(suite)
    await suite.log(records(version, np.random.default_rng(6).normal(size=(4, 4))))
    now = time.time()

    def label(request_id: str, value: int, at: float) -> pb.Feedback:
        feedback = pb.Feedback(model="models/churn", request_id=request_id, label=value)
        feedback.time.FromMicroseconds(round(at * 1e6))
        return feedback

    first = await suite.monitor.LogFeedback(
        rpc.LogFeedbackRequest(
            feedback=[
                label("r0", 1, now),
                label("r1", 0, now),
                label("r9", 1, now),  # before its prediction
            ]
        ),
        timeout=10,
    )
    second = await suite.monitor.LogFeedback(
        rpc.LogFeedbackRequest(
            feedback=[
                label("r0", 0, now + 10),  # a correction: later, wins
                label("r1", 1, now - 10),  # older than the stored one: ignored
                label("r9", 1, now),  # an identical repeat: ignored
            ]
        ),
        timeout=10,
    )
    await suite.log(records(version, np.random.default_rng(7).normal(size=(1, 4)), start=9))

    assert (first.accepted_count, first.matched_count, first.ignored_count) == (3, 2, 0)
    assert (second.accepted_count, second.matched_count, second.ignored_count) == (1, 1, 2)
    listed = await suite.monitor.ListPredictions(
        rpc.ListPredictionsRequest(parent=version, filter="has_label = true"), timeout=10
    )
    labels = {p.request_id: p.label for p in listed.predictions}
    assert labels == {"r0": 0, "r1": 0, "r9": 1}


async def test_bad_feedback_is_refused_and_stores_nothing(suite: Suite) -> None:
    version = await a_monitored_version(suite)
    await suite.log(records(version, np.random.default_rng(8).normal(size=(2, 4))))
    for feedback, field in [
        (pb.Feedback(model="models/churn", request_id="r0", label=-1), "feedback[0].label"),
        (pb.Feedback(model="models/churn", request_id="r0", label=2), "feedback[0].label"),
        (pb.Feedback(model="models/nope", request_id="r0", label=0), "feedback.model"),
        (pb.Feedback(model="churn", request_id="r0", label=0), "feedback[0].model"),
        (pb.Feedback(model="models/churn", request_id="", label=0), "feedback[0].request_id"),
    ]:
        error = await refused(
            suite.monitor.LogFeedback(
                rpc.LogFeedbackRequest(
                    feedback=[pb.Feedback(model="models/churn", request_id="r1", label=1), feedback]
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert isinstance(error, InvalidArgumentError)
        assert field.replace("[0]", "[1]") in [v.field for v in error.violations] or field in [
            v.field for v in error.violations
        ]
    listed = await suite.monitor.ListPredictions(
        rpc.ListPredictionsRequest(parent=version, filter="has_label = true"), timeout=10
    )
    assert list(listed.predictions) == []


async def test_listing_filters_pages_and_resolves_aliases(suite: Suite) -> None:
    version = await a_monitored_version(suite)
    rng = np.random.default_rng(9)
    start = time.time() - 100
    await suite.log(records(version, rng.normal(size=(7, 4)), time_s=start))
    await suite.log(
        records(version, rng.normal(size=(3, 4)), prefix="e", status_code=14, time_s=start + 1)
    )

    pages: list[str] = []
    token = ""
    while True:
        reply = await suite.monitor.ListPredictions(
            rpc.ListPredictionsRequest(
                parent="models/churn@production",
                page_size=4,
                page_token=token,
                filter="status_code = 0",
            ),
            timeout=10,
        )
        pages.extend(p.request_id for p in reply.predictions)
        token = reply.next_page_token
        if not token:
            break
    errors = await suite.monitor.ListPredictions(
        rpc.ListPredictionsRequest(parent=version, filter="status_code != 0"), timeout=10
    )

    assert pages == [f"r{i}" for i in reversed(range(7))]  # newest first
    assert sorted(p.request_id for p in errors.predictions) == ["e0", "e1", "e2"]
    assert all(not p.subject_key for p in errors.predictions)
    for request, code in [
        (
            rpc.ListPredictionsRequest(parent="models/churn/versions/x"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            rpc.ListPredictionsRequest(parent=version, page_size=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            rpc.ListPredictionsRequest(parent=version, filter="colour = 1"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            rpc.ListPredictionsRequest(parent=version, page_token="nope"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (rpc.ListPredictionsRequest(parent="models/churn/versions/7"), grpc.StatusCode.NOT_FOUND),
    ]:
        await expect_error(suite.monitor.ListPredictions(request, timeout=10), code)


async def test_erasure_removes_a_subjects_rows_and_labels(suite: Suite) -> None:
    version = await a_monitored_version(suite)
    rng = np.random.default_rng(10)
    await suite.log(records(version, rng.normal(size=(3, 4)), prefix="a", subject="customer-1"))
    await suite.log(records(version, rng.normal(size=(2, 4)), prefix="b", subject="customer-2"))
    await suite.monitor.LogFeedback(
        rpc.LogFeedbackRequest(
            feedback=[pb.Feedback(model="models/churn", request_id="a0", label=1)]
        ),
        timeout=10,
    )

    reply = await suite.monitor.ErasePredictions(
        rpc.ErasePredictionsRequest(subject_key="customer-1", reason="ticket 42"), timeout=10
    )
    none = await suite.monitor.ErasePredictions(
        rpc.ErasePredictionsRequest(subject_key="nobody", model="models/churn"), timeout=10
    )

    assert (reply.erased_predictions, reply.erased_feedback) == (3, 1)
    assert (none.erased_predictions, none.erased_feedback) == (0, 0)
    listed = await suite.monitor.ListPredictions(
        rpc.ListPredictionsRequest(parent=version), timeout=10
    )
    assert sorted(p.request_id for p in listed.predictions) == ["b0", "b1"]
    for request, code in [
        (rpc.ErasePredictionsRequest(subject_key=""), grpc.StatusCode.INVALID_ARGUMENT),
        (rpc.ErasePredictionsRequest(subject_key="x" * 257), grpc.StatusCode.INVALID_ARGUMENT),
        (
            rpc.ErasePredictionsRequest(subject_key="x", reason="r" * 1025),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            rpc.ErasePredictionsRequest(subject_key="x", model="churn"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            rpc.ErasePredictionsRequest(subject_key="x", model="models/nope"),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]:
        await expect_error(suite.monitor.ErasePredictions(request, timeout=10), code)


async def test_personal_features_are_hashed_or_dropped_before_storage(suite: Suite) -> None:
    version = await suite.register("loans")
    features = [
        pb.FeatureSpec(name="x0", type=pb.FEATURE_TYPE_NUMERICAL),
        pb.FeatureSpec(name="x1", type=pb.FEATURE_TYPE_NUMERICAL),
        pb.FeatureSpec(name="x2", type=pb.FEATURE_TYPE_NUMERICAL),
        pb.FeatureSpec(name="income", type=pb.FEATURE_TYPE_NUMERICAL),
        pb.FeatureSpec(name="postcode", type=pb.FEATURE_TYPE_CATEGORICAL),
    ]
    rng = np.random.default_rng(11)
    codes = [["AB1", "CD2", "EF3"][i % 3] for i in range(300)]
    await suite.set_reference(
        version, rng.normal(size=(300, 4)), features=features, categorical=[[c] for c in codes]
    )
    await suite.configure(
        "models/loans",
        ["privacy", "window"],
        window=pb.WindowSpec(row_count=100, min_rows=50),
        privacy=pb.PrivacyConfig(
            personal_features={
                "postcode": pb.PERSONAL_DATA_ACTION_HASH,
                "income": pb.PERSONAL_DATA_ACTION_DROP,
            }
        ),
    )

    await suite.log(
        records(version, rng.normal(size=(100, 4)), categorical=[[c] for c in codes[:100]])
    )

    listed = await suite.monitor.ListPredictions(
        rpc.ListPredictionsRequest(parent=version, page_size=1), timeout=10
    )
    stored = listed.predictions[0]
    assert np.isnan(stored.features.numerical[3])  # income dropped
    assert stored.features.categorical[0] not in ("AB1", "CD2", "EF3")
    assert len(stored.features.categorical[0]) == 64  # an HMAC-SHA-256 in hex
    drift = await suite.monitor.GetDriftReport(
        rpc.GetDriftReportRequest(model_version=version), timeout=30
    )
    tested = [f.feature for f in drift.drift_report.features]
    assert tested == ["x0", "x1", "x2", "postcode"]  # income is not tested
    postcode = drift.drift_report.features[3]
    assert postcode.test == pb.DRIFT_TEST_CHI_SQUARED
    assert not postcode.drifted  # the hashes compare like the values
