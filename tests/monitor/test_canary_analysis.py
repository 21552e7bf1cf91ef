"""Canary analysis over gRPC against a real registry: ``GetCanaryAnalysis``, and
``auto_apply`` moving aliases after windows close."""

from __future__ import annotations

import grpc
import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from tests.monitor.conftest import Suite, records
from tests.support.registry import expect_error, refused, set_alias

WINDOW = 100


async def a_canary(
    suite: Suite, model_id: str, *, min_predictions: int = 0, auto_apply: bool = False
) -> tuple[str, str]:
    """A model whose ``production`` alias points at version 1 and ``canary`` at
    version 2, with windows of ``WINDOW`` predictions; (baseline, canary)."""
    baseline = await suite.register(model_id)
    canary = await suite.register(model_id, create=False, alias="canary")
    await configure(suite, model_id, min_predictions=min_predictions, auto_apply=auto_apply)
    return baseline, canary


async def configure(
    suite: Suite, model_id: str, *, min_predictions: int = 0, auto_apply: bool = False
) -> None:
    await suite.configure(
        f"models/{model_id}",
        ["window", "canary"],
        window=pb.WindowSpec(row_count=WINDOW, min_rows=10),
        canary=pb.CanaryConfig(min_predictions=min_predictions, auto_apply=auto_apply),
    )


async def analysis(suite: Suite, model_id: str) -> pb.CanaryAnalysis:
    reply = await suite.monitor.GetCanaryAnalysis(
        rpc.GetCanaryAnalysisRequest(name=f"models/{model_id}/canaryAnalysis"), timeout=30
    )
    return reply.canary_analysis


async def aliases(suite: Suite, model_id: str) -> dict[str, str]:
    reply = await suite.registry.GetModel(
        registry_rpc.GetModelRequest(name=f"models/{model_id}"), timeout=10
    )
    return dict(reply.model.aliases)


async def alias(suite: Suite, model_id: str, alias_id: str) -> registry_pb.Alias:
    reply = await suite.registry.ListAliases(
        registry_rpc.ListAliasesRequest(parent=f"models/{model_id}"), timeout=10
    )
    (found,) = [a for a in reply.aliases if a.name == f"models/{model_id}/aliases/{alias_id}"]
    return found


def stored_analysis(suite: Suite, model_id: str) -> pb.CanaryAnalysis | None:
    engine = create_engine(sqlite_url(suite.settings.service_data_dir / "monitor.db"))
    try:
        return MonitorStore(engine).canary_analysis(f"models/{model_id}")
    finally:
        engine.dispose()


def features(rows: int, seed: int = 0) -> npt.NDArray[np.float64]:
    return np.random.default_rng(seed).normal(size=(rows, 4))


def checks(found: pb.CanaryAnalysis) -> dict[int, pb.CanaryCheck]:
    return {check.type: check for check in found.checks}


async def test_the_canary_alias_must_be_set_and_differ_from_the_baseline(suite: Suite) -> None:
    baseline = await suite.register("churn")
    request = rpc.GetCanaryAnalysisRequest(name="models/churn/canaryAnalysis")

    unset = await refused(
        suite.monitor.GetCanaryAnalysis(request, timeout=10), grpc.StatusCode.FAILED_PRECONDITION
    )
    await set_alias(suite.registry, "models/churn/aliases/canary", baseline)
    same = await refused(
        suite.monitor.GetCanaryAnalysis(request, timeout=10), grpc.StatusCode.FAILED_PRECONDITION
    )

    assert unset.reason == "CANARY_NOT_SET"
    assert "models/churn@canary" in unset.message
    assert same.reason == "CANARY_IS_BASELINE"
    assert baseline in same.message


async def test_the_baseline_alias_must_be_set(suite: Suite) -> None:
    await suite.register("churn", alias="canary")

    error = await refused(
        suite.monitor.GetCanaryAnalysis(
            rpc.GetCanaryAnalysisRequest(name="models/churn/canaryAnalysis"), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    assert error.reason == "BASELINE_NOT_SET"


async def test_unknown_models_and_malformed_names_are_refused(suite: Suite) -> None:
    await expect_error(
        suite.monitor.GetCanaryAnalysis(
            rpc.GetCanaryAnalysisRequest(name="models/absent/canaryAnalysis"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    for name in ("models/Not_An_Id/canaryAnalysis", "models/churn", "", "canaryAnalysis"):
        await expect_error(
            suite.monitor.GetCanaryAnalysis(rpc.GetCanaryAnalysisRequest(name=name), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
        )


async def test_too_few_predictions_continue_and_shadow_predictions_do_not_count(
    suite: Suite,
) -> None:
    baseline, canary = await a_canary(suite, "churn")
    moved = (await alias(suite, "churn", "canary")).update_time
    await suite.log(records(baseline, features(60), prefix="b"))
    await suite.log(records(canary, features(40, seed=1), prefix="c"))
    shadow = records(canary, features(30, seed=2), prefix="s")
    for record in shadow:
        record.shadow = True
    await suite.log(shadow)

    found = await analysis(suite, "churn")

    assert found.name == "models/churn/canaryAnalysis"
    assert (found.canary_model_version, found.baseline_model_version) == (canary, baseline)
    assert (found.canary_predictions, found.baseline_predictions) == (40, 60)
    assert found.recommendation == pb.CANARY_RECOMMENDATION_CONTINUE
    assert "500" in found.summary
    assert found.interval.start_time == moved
    assert found.interval.end_time.ToMicroseconds() > moved.ToMicroseconds()
    assert found.HasField("compute_time")
    assert set(checks(found)) == {
        pb.CANARY_CHECK_TYPE_ERROR_RATE,
        pb.CANARY_CHECK_TYPE_LATENCY_P99,
        pb.CANARY_CHECK_TYPE_PREDICTION_DRIFT,
    }
    assert not found.HasField("action")
    assert await aliases(suite, "churn") == {"production": baseline, "canary": canary}


async def test_a_failing_canary_is_rolled_back_with_auto_apply(suite: Suite) -> None:
    baseline, canary = await a_canary(suite, "churn", min_predictions=100)
    await suite.log(records(baseline, features(200), prefix="b"))
    await suite.log(
        records(canary, features(150), prefix="c")
        + records(canary, features(50, seed=1), prefix="e", status_code=13)
    )

    reported = await analysis(suite, "churn")

    assert reported.recommendation == pb.CANARY_RECOMMENDATION_ROLL_BACK
    error_rate = checks(reported)[pb.CANARY_CHECK_TYPE_ERROR_RATE]
    assert not error_rate.passed
    assert (error_rate.canary_value, error_rate.baseline_value) == (0.25, 0.0)
    assert not reported.HasField("action")
    assert await aliases(suite, "churn") == {"production": baseline, "canary": canary}

    await configure(suite, "churn", min_predictions=100, auto_apply=True)
    await suite.log(records(canary, features(WINDOW, seed=3), prefix="late"))

    assert await aliases(suite, "churn") == {"production": baseline, "canary": baseline}
    moved = await alias(suite, "churn", "canary")
    assert moved.previous_version == canary
    assert moved.reason.startswith("canary analysis: roll back")
    stored = stored_analysis(suite, "churn")
    assert stored is not None
    assert stored.recommendation == pb.CANARY_RECOMMENDATION_ROLL_BACK
    assert stored.action.kind == pb.ACTION_KIND_ROLLBACK
    assert stored.action.state == pb.ACTION_STATE_SUCCEEDED, stored.action.message
    assert list(stored.action.resources) == ["models/churn@canary"]
    assert stored.action.HasField("end_time")
    same = await refused(
        suite.monitor.GetCanaryAnalysis(
            rpc.GetCanaryAnalysisRequest(name="models/churn/canaryAnalysis"), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert same.reason == "CANARY_IS_BASELINE"


async def test_a_canary_like_its_baseline_is_promoted_with_auto_apply(suite: Suite) -> None:
    baseline, canary = await a_canary(suite, "churn", min_predictions=100)
    await suite.log(records(baseline, features(200), prefix="b"))
    await suite.log(records(canary, features(200), prefix="c"))

    reported = await analysis(suite, "churn")

    assert reported.recommendation == pb.CANARY_RECOMMENDATION_PROMOTE, reported.summary
    assert all(check.passed for check in reported.checks)
    assert len(reported.checks) == 3
    assert (reported.canary_predictions, reported.baseline_predictions) == (200, 200)
    assert await aliases(suite, "churn") == {"production": baseline, "canary": canary}
    stored = stored_analysis(suite, "churn")
    assert stored is not None
    assert stored.recommendation == pb.CANARY_RECOMMENDATION_PROMOTE
    assert not stored.HasField("action")

    await configure(suite, "churn", min_predictions=100, auto_apply=True)
    await suite.log(records(baseline, features(WINDOW, seed=4), prefix="late"))

    assert await aliases(suite, "churn") == {"production": canary, "canary": canary}
    moved = await alias(suite, "churn", "production")
    assert moved.previous_version == baseline
    assert moved.reason.startswith("canary analysis: promote")
    stored = stored_analysis(suite, "churn")
    assert stored is not None
    assert stored.action.kind == pb.ACTION_KIND_PROMOTE
    assert stored.action.state == pb.ACTION_STATE_SUCCEEDED, stored.action.message
    assert list(stored.action.resources) == ["models/churn@production"]
