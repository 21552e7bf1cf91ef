"""Deployments through the control plane: hot swaps under load, failed swaps
that leave the old version serving, canary splits, the shadow, and every bad
configuration refused before anything changes."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from conveyor.inference.v1 import inference_messages_pb2 as rpc
from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.shared import onnx_runtime
from conveyor.shared.errors import InvalidArgumentError
from tests.inference.conftest import (
    FEATURES,
    Suite,
    expected,
    infer_request,
    probabilities,
    slow_classifier,
    weights,
)
from tests.support.registry import refused, set_alias

pytestmark = pytest.mark.timeout(120)
X = np.random.default_rng(9).normal(size=(2, FEATURES)).astype(np.float32)


def target(reference: str, percent: int) -> pb.TrafficTarget:
    return pb.TrafficTarget(model_version=reference, percent=percent)


async def test_an_alias_move_hot_swaps_under_load_without_a_failed_request(suite: Suite) -> None:
    w1, w2 = weights(21), weights(22)
    await suite.register("swap", w1)
    v2 = await suite.register("swap", w2, alias="", create=False)
    await suite.deploy(pb.Deployment(model="models/swap"))
    answers: Counter[str] = Counter()
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                response = await suite.oip.ModelInfer(infer_request("swap", X), timeout=10)
            except grpc.aio.AioRpcError as error:
                failures.append(error)
                continue
            w = w1 if response.model_version == "1" else w2
            np.testing.assert_allclose(probabilities(response), expected(X, w), rtol=1e-5)
            answers[response.model_version] += 1

    clients = [asyncio.ensure_future(load()) for _ in range(8)]
    try:
        while answers["1"] < 50:  # noqa: ASYNC110 - counting answers, not waiting on one
            await asyncio.sleep(0.01)
        await set_alias(suite.registry, "models/swap/aliases/production", v2)
        status = await suite.settled(
            "swap",
            until=lambda s: [v.model_version for v in s.versions] == [v2],
        )
        while answers["2"] < 50:  # noqa: ASYNC110 - counting answers, not waiting on one
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert status.state == pb.DEPLOYMENT_STATE_READY
    assert status.last_swap.target == "models/swap@production"
    assert status.last_swap.from_version == "models/swap/versions/1"
    assert status.last_swap.to_version == v2
    assert status.last_swap.outcome == pb.SWAP_OUTCOME_SUCCEEDED
    assert status.last_swap.alias_revision > 0
    assert status.alias_revision >= status.last_swap.alias_revision


async def test_a_version_that_fails_to_load_leaves_the_old_one_serving(suite: Suite) -> None:
    w1 = weights(23)
    await suite.register("steady", w1)
    await suite.deploy(pb.Deployment(model="models/steady"))
    broken = await suite.register("steady", data=b"\x08garbage", alias="", create=False)
    await set_alias(suite.registry, "models/steady/aliases/production", broken)
    status = await suite.settled(
        "steady", until=lambda s: s.last_swap.outcome == pb.SWAP_OUTCOME_FAILED
    )
    assert status.state == pb.DEPLOYMENT_STATE_DEGRADED
    assert status.last_swap.to_version == broken
    assert status.last_swap.error_message
    states = {v.model_version: v.state for v in status.versions}
    assert states == {
        "models/steady/versions/1": pb.VERSION_STATE_READY,
        broken: pb.VERSION_STATE_FAILED,
    }
    response = await suite.oip.ModelInfer(infer_request("steady", X))
    assert response.model_version == "1"
    np.testing.assert_allclose(probabilities(response), expected(X, w1), rtol=1e-5)


async def test_a_canary_split_follows_its_weights_and_sticks_to_request_ids(suite: Suite) -> None:
    await suite.register("canary", weights(24))
    await suite.register("canary", weights(25), alias="canary", create=False)
    status = await suite.deploy(
        pb.Deployment(
            model="models/canary",
            traffic=pb.TrafficSplit(
                targets=[
                    target("models/canary@production", 80),
                    target("models/canary@canary", 20),
                ],
                sticky=True,
            ),
        )
    )
    assert {v.model_version: v.traffic_percent for v in status.versions} == {
        "models/canary/versions/1": 80,
        "models/canary/versions/2": 20,
    }
    served = await asyncio.gather(
        *(suite.oip.ModelInfer(infer_request("canary", X[:1], id=f"u{i}")) for i in range(600))
    )
    share = sum(r.model_version == "2" for r in served) / len(served)
    # 600 draws at 20%: the standard deviation is 1.6 points.
    assert 0.13 < share < 0.27
    again = await asyncio.gather(
        *(suite.oip.ModelInfer(infer_request("canary", X[:1], id=f"u{i}")) for i in range(600))
    )
    assert [r.model_version for r in again] == [r.model_version for r in served]
    config = (await suite.oip.ModelConfig(oip.ModelConfigRequest(name="canary"))).config
    assert config.parameters["traffic"].string_value == (
        "models/canary/versions/1=80,models/canary/versions/2=20"
    )
    assert config.parameters["sticky"].string_value == "true"


async def test_the_shadow_gets_copies_that_are_compared_and_never_returned(suite: Suite) -> None:
    w1, w2 = weights(26), weights(27)
    await suite.register("shadowed", w1)
    shadow = await suite.register("shadowed", w2, alias="", create=False)
    await suite.deploy(
        pb.Deployment(
            model="models/shadowed",
            shadow=pb.ShadowConfig(model_version=shadow, tolerance=1e-6),
        )
    )
    for index in range(20):
        response = await suite.oip.ModelInfer(infer_request("shadowed", X, id=f"q{index}"))
        assert response.model_version == "1"
        np.testing.assert_allclose(probabilities(response), expected(X, w1), rtol=1e-5)
    status = await suite.settled("shadowed", until=lambda s: s.shadow_stats.compared_count == 20)
    stats = status.shadow_stats
    assert stats.model_version == shadow
    assert stats.mirrored_count == 20
    assert stats.mismatch_count == 20  # different weights: every answer differs
    difference = np.abs(expected(X, w1) - expected(X, w2)).max()
    assert stats.max_abs_difference == pytest.approx(difference, rel=1e-4)
    roles = {v.model_version: v.role for v in status.versions}
    assert roles[shadow] == pb.VERSION_ROLE_SHADOW
    config = (await suite.oip.ModelConfig(oip.ModelConfigRequest(name="shadowed"))).config
    assert config.parameters["shadow"].string_value == shadow


async def test_update_changes_batching_and_the_split_as_a_hot_swap(suite: Suite) -> None:
    await suite.register("tuned", weights(28))
    v2 = await suite.register("tuned", weights(29), alias="", create=False)
    await suite.deploy(pb.Deployment(model="models/tuned"))
    current = (
        await suite.management.GetDeployment(rpc.GetDeploymentRequest(name="deployments/tuned"))
    ).deployment
    changed = pb.Deployment(
        name="deployments/tuned",
        etag=current.etag,
        batching=pb.BatchingConfig(max_batch_size=8, max_queue_delay=Duration(nanos=2_000_000)),
        traffic=pb.TrafficSplit(targets=[target(v2, 100)]),
    )
    reply = await suite.management.UpdateDeployment(
        rpc.UpdateDeploymentRequest(
            deployment=changed, update_mask=FieldMask(paths=["batching", "traffic"])
        )
    )
    assert reply.deployment.etag != current.etag
    status = await suite.settled(
        "tuned", until=lambda s: [v.model_version for v in s.versions] == [v2]
    )
    assert status.versions[0].max_batch_size == 8
    config = (await suite.oip.ModelConfig(oip.ModelConfigRequest(name="tuned"))).config
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    stale = await refused(
        suite.management.UpdateDeployment(
            rpc.UpdateDeploymentRequest(
                deployment=changed, update_mask=FieldMask(paths=["batching"])
            )
        ),
        grpc.StatusCode.ABORTED,
    )
    assert stale.reason == "ETAG_MISMATCH"


async def test_deployments_are_listed_got_and_deleted(suite: Suite) -> None:
    for model_id in ("alpha", "beta"):
        await suite.register(model_id, weights(30))
        await suite.deploy(pb.Deployment(model=f"models/{model_id}", labels={"team": model_id}))
    listed = await suite.management.ListDeployments(rpc.ListDeploymentsRequest(page_size=1))
    assert [d.name for d in listed.deployments] == ["deployments/alpha"]
    rest = await suite.management.ListDeployments(
        rpc.ListDeploymentsRequest(page_size=1, page_token=listed.next_page_token)
    )
    assert [d.name for d in rest.deployments] == ["deployments/beta"]
    assert not rest.next_page_token
    filtered = await suite.management.ListDeployments(
        rpc.ListDeploymentsRequest(filter='labels.team = "beta"')
    )
    assert [d.name for d in filtered.deployments] == ["deployments/beta"]
    got = await suite.management.GetDeployment(rpc.GetDeploymentRequest(name="deployments/beta"))
    assert got.deployment.state == pb.DEPLOYMENT_STATE_READY
    assert got.deployment.created_by == "user:anonymous"
    await refused(
        suite.management.DeleteDeployment(
            rpc.DeleteDeploymentRequest(name="deployments/beta", etag="stale")
        ),
        grpc.StatusCode.ABORTED,
    )
    await suite.management.DeleteDeployment(rpc.DeleteDeploymentRequest(name="deployments/beta"))
    await refused(
        suite.management.GetDeployment(rpc.GetDeploymentRequest(name="deployments/beta")),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        suite.oip.ModelReady(oip.ModelReadyRequest(name="beta")), grpc.StatusCode.NOT_FOUND
    )


@pytest.mark.parametrize(
    ("deployment", "field"),
    [
        (pb.Deployment(model="fraud"), "deployment.model"),
        (
            pb.Deployment(
                model="models/fraud",
                traffic=pb.TrafficSplit(targets=[target("models/fraud@production", 90)]),
            ),
            "deployment.traffic.targets",
        ),
        (
            pb.Deployment(
                model="models/fraud",
                traffic=pb.TrafficSplit(
                    targets=[
                        target("models/fraud@production", 50),
                        target("models/fraud@production", 50),
                    ]
                ),
            ),
            "deployment.traffic.targets[1].model_version",
        ),
        (
            pb.Deployment(
                model="models/fraud",
                traffic=pb.TrafficSplit(targets=[target("models/other@production", 100)]),
            ),
            "deployment.traffic.targets[0].model_version",
        ),
        (
            pb.Deployment(
                model="models/fraud",
                traffic=pb.TrafficSplit(targets=[target("models/fraud@production", 100)]),
                shadow=pb.ShadowConfig(model_version="models/fraud@production"),
            ),
            "deployment.shadow.model_version",
        ),
        (
            pb.Deployment(model="models/fraud", batching=pb.BatchingConfig(max_batch_size=5000)),
            "deployment.batching.max_batch_size",
        ),
        (
            pb.Deployment(
                model="models/fraud",
                batching=pb.BatchingConfig(max_queue_delay=Duration(seconds=2)),
            ),
            "deployment.batching.max_queue_delay",
        ),
        (
            pb.Deployment(model="models/fraud", runtime=pb.RuntimeConfig(instance_count=17)),
            "deployment.runtime.instance_count",
        ),
        (
            pb.Deployment(model="models/fraud", prediction_log_sample_rate=1.5),
            "deployment.prediction_log_sample_rate",
        ),
    ],
    ids=[
        "model",
        "percent-sum",
        "duplicate",
        "other-model",
        "shadow-in-split",
        "batch",
        "delay",
        "instances",
        "sample-rate",
    ],
)
async def test_bad_deployments_are_refused_naming_the_field(
    suite: Suite, deployment: pb.Deployment, field: str
) -> None:
    error = await refused(
        suite.management.CreateDeployment(rpc.CreateDeploymentRequest(deployment=deployment)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert isinstance(error, InvalidArgumentError)
    assert field in [v.field for v in error.violations]
    listed = await suite.management.ListDeployments(rpc.ListDeploymentsRequest())
    assert list(listed.deployments) == []


async def test_references_are_checked_against_the_registry(suite: Suite) -> None:
    await suite.register("known", weights(31))
    await refused(
        suite.management.CreateDeployment(
            rpc.CreateDeploymentRequest(deployment=pb.Deployment(model="models/unknown"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        suite.management.CreateDeployment(
            rpc.CreateDeploymentRequest(
                deployment=pb.Deployment(
                    model="models/known",
                    traffic=pb.TrafficSplit(targets=[target("models/known/versions/7", 100)]),
                )
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    no_gpu = pb.Deployment(
        model="models/known",
        runtime=pb.RuntimeConfig(execution_provider=pb.EXECUTION_PROVIDER_CUDA),
    )
    if not onnx_runtime.gpu_present():
        error = await refused(
            suite.management.CreateDeployment(rpc.CreateDeploymentRequest(deployment=no_gpu)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error.reason == "NO_GPU"
    await suite.deploy(pb.Deployment(model="models/known"))
    await refused(
        suite.management.CreateDeployment(
            rpc.CreateDeploymentRequest(deployment=pb.Deployment(model="models/known"))
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    bad_mask = await refused(
        suite.management.UpdateDeployment(
            rpc.UpdateDeploymentRequest(
                deployment=pb.Deployment(name="deployments/known", model="models/other"),
                update_mask=FieldMask(paths=["model", "colour"]),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert isinstance(bad_mask, InvalidArgumentError)
    assert [v.field for v in bad_mask.violations] == [
        "update_mask.paths[0]",
        "update_mask.paths[1]",
    ]


async def test_a_retried_create_with_the_same_request_id_creates_once(suite: Suite) -> None:
    await suite.register("retried", weights(32))
    request = rpc.CreateDeploymentRequest(
        deployment=pb.Deployment(model="models/retried"), request_id="create-1"
    )
    first = await suite.management.CreateDeployment(request)
    second = await suite.management.CreateDeployment(request)
    assert first.deployment.etag == second.deployment.etag
    request.deployment.labels["x"] = "y"
    await refused(suite.management.CreateDeployment(request), grpc.StatusCode.INVALID_ARGUMENT)


async def test_a_full_queue_refuses_at_once_and_expired_requests_are_never_computed(
    suite: Suite,
) -> None:
    # Hundreds of milliseconds a request, so that the request computing is surely
    # computing when the others arrive, even on a busy machine.
    await suite.register("slow", data=slow_classifier(depth=256))
    await suite.deploy(
        pb.Deployment(
            model="models/slow",
            batching=pb.BatchingConfig(max_batch_size=1, max_queue_size=2),
        )
    )

    async def one(expire: bool) -> str:
        request = infer_request("slow", X[:1])
        if expire:
            request.parameters["timeout"].int64_param = 2000  # microseconds
        try:
            await suite.oip.ModelInfer(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    # Two requests that may wait 2 ms queue behind one that computes for longer.
    computing = asyncio.ensure_future(one(False))
    await asyncio.sleep(0.1)
    expired = Counter(await asyncio.gather(one(True), one(True)))
    assert expired == Counter({"DEADLINE_EXCEEDED": 2})
    assert await computing == "OK"
    results = Counter(await asyncio.gather(*(one(False) for _ in range(12))))
    assert results["RESOURCE_EXHAUSTED"] > 0
    assert results["OK"] + results["RESOURCE_EXHAUSTED"] == 12
    stats = (await suite.oip.ModelStatistics(oip.ModelStatisticsRequest(name="slow"))).model_stats[
        0
    ]
    # Only the requests answered OK were computed (warm-up runs are not counted).
    assert stats.inference_count == results["OK"] + 1
    assert stats.inference_stats.fail.count == results["RESOURCE_EXHAUSTED"] + 2
