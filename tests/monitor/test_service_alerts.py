"""SLOs and alert rules over gRPC, against a real registry: creating (ids,
idempotency, every bad field), reading with compliance counted from the
logged predictions, listing with filters and pages, updating by mask and
deleting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.shared import names
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError
from tests.monitor.conftest import Suite, records
from tests.support.registry import expect_error, refused

AVAILABILITY = pb.SERVICE_LEVEL_INDICATOR_AVAILABILITY
LATENCY = pb.SERVICE_LEVEL_INDICATOR_LATENCY


def an_slo(model: str = "models/fraud", **fields: Any) -> pb.ServiceLevelObjective:
    values: dict[str, Any] = {"model": model, "indicator": AVAILABILITY, "goal": 0.9}
    values.update(fields)
    return pb.ServiceLevelObjective(**values)


def a_rule(model: str = "models/fraud", **fields: Any) -> pb.AlertRule:
    values: dict[str, Any] = {
        "model": model,
        "drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_DATASET),
    }
    values.update(fields)
    return pb.AlertRule(**values)


async def create_slo(
    suite: Suite, slo_id: str, slo: pb.ServiceLevelObjective, request_id: str = ""
) -> pb.ServiceLevelObjective:
    reply = await suite.monitor.CreateServiceLevelObjective(
        rpc.CreateServiceLevelObjectiveRequest(
            service_level_objective=slo, service_level_objective_id=slo_id, request_id=request_id
        ),
        timeout=10,
    )
    return reply.service_level_objective


async def create_rule(
    suite: Suite, rule_id: str, rule: pb.AlertRule, request_id: str = ""
) -> pb.AlertRule:
    reply = await suite.monitor.CreateAlertRule(
        rpc.CreateAlertRuleRequest(alert_rule=rule, alert_rule_id=rule_id, request_id=request_id),
        timeout=10,
    )
    return reply.alert_rule


async def get_slo(suite: Suite, name: str) -> pb.ServiceLevelObjective:
    reply = await suite.monitor.GetServiceLevelObjective(
        rpc.GetServiceLevelObjectiveRequest(name=name), timeout=10
    )
    return reply.service_level_objective


async def fields_refused(call: object) -> set[str]:
    error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert isinstance(error, InvalidArgumentError)
    return {v.field for v in error.violations}


def expected_status(good: int, total: int, goal: float) -> tuple[float, float, bool]:
    sli = good / total if total else 1.0
    return sli, 1 - (1 - sli) / (1 - goal), sli >= goal


# -- SLOs -------------------------------------------------------------------------------


async def test_an_slo_is_created_once_and_read_back(suite: Suite) -> None:
    version = await suite.register("fraud")

    created = await create_slo(
        suite, "availability", an_slo(display_name="Predictions succeed", goal=0.99)
    )
    scoped = await create_slo(
        suite,
        "",
        an_slo(model_version=version, indicator=LATENCY, latency_threshold={"nanos": 20_000_000}),
    )
    fetched = await get_slo(suite, "serviceLevelObjectives/availability")

    assert created.name == "serviceLevelObjectives/availability"
    assert created.display_name == "Predictions succeed"
    assert created.HasField("create_time")
    assert created.update_time == created.create_time
    assert (created.status.sli, created.status.total_count, created.status.met) == (1.0, 0, True)
    assert created.status.error_budget_remaining == 1.0
    assert created.status.HasField("evaluate_time")
    assert not created.HasField("rolling_period")  # unset means 28 days
    assert names.parse_resource_name(scoped.name, "serviceLevelObjectives")  # a generated id
    assert scoped.model_version == version
    assert fetched.name == created.name
    assert fetched.goal == 0.99
    assert fetched.create_time == created.create_time


async def test_creating_an_slo_is_idempotent_by_request_id(suite: Suite) -> None:
    await suite.register("fraud")
    key = "5a1c58a4-06a0-4e46-9d3b-7f3a8e3f3b10"

    first = await create_slo(suite, "", an_slo(), request_id=key)
    again = await create_slo(suite, "", an_slo(), request_id=key)

    assert again.name == first.name
    assert again.create_time == first.create_time
    listed = await suite.monitor.ListServiceLevelObjectives(
        rpc.ListServiceLevelObjectivesRequest(), timeout=10
    )
    assert [s.name for s in listed.service_level_objectives] == [first.name]
    reused = await refused(
        create_slo(suite, "", an_slo(goal=0.5), request_id=key), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert reused.reason == "REQUEST_ID_REUSED"
    await create_slo(suite, "taken", an_slo())
    taken = await refused(create_slo(suite, "taken", an_slo()), grpc.StatusCode.ALREADY_EXISTS)
    assert taken.metadata["name"] == "serviceLevelObjectives/taken"


async def test_slos_on_unknown_models_or_versions_are_not_found(suite: Suite) -> None:
    await suite.register("fraud")

    for slo in (
        an_slo("models/ghost"),
        an_slo(model_version="models/fraud/versions/9"),
    ):
        await expect_error(create_slo(suite, "nope", slo), grpc.StatusCode.NOT_FOUND)
    await expect_error(get_slo(suite, "serviceLevelObjectives/nope"), grpc.StatusCode.NOT_FOUND)
    await expect_error(get_slo(suite, "alerts/nope"), grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize(
    ("slo", "slo_id", "request_id", "field"),
    [
        (an_slo(model=""), "s", "", "service_level_objective.model"),
        (an_slo(model="fraud"), "s", "", "service_level_objective.model"),
        (
            an_slo(model_version="models/fraud@production"),
            "s",
            "",
            "service_level_objective.model_version",
        ),
        (
            an_slo(model_version="models/credit/versions/1"),
            "s",
            "",
            "service_level_objective.model_version",
        ),
        (an_slo(indicator=0), "s", "", "service_level_objective.indicator"),
        (an_slo(indicator=LATENCY), "s", "", "service_level_objective.latency_threshold"),
        (an_slo(goal=0.0), "s", "", "service_level_objective.goal"),
        (an_slo(goal=1.0), "s", "", "service_level_objective.goal"),
        (an_slo(goal=float("nan")), "s", "", "service_level_objective.goal"),
        (
            an_slo(rolling_period={"seconds": 1800}),
            "s",
            "",
            "service_level_objective.rolling_period",
        ),
        (
            an_slo(rolling_period={"seconds": 31 * 86_400}),
            "s",
            "",
            "service_level_objective.rolling_period",
        ),
        (an_slo(display_name="x" * 257), "s", "", "service_level_objective.display_name"),
        (an_slo(), "Not_An_Id", "", "service_level_objective_id"),
        (an_slo(), "s", "r" * 65, "request_id"),
    ],
)
async def test_each_bad_slo_field_is_named(
    suite: Suite, slo: pb.ServiceLevelObjective, slo_id: str, request_id: str, field: str
) -> None:
    await suite.register("fraud")

    assert field in await fields_refused(create_slo(suite, slo_id, slo, request_id))


async def test_several_bad_slo_fields_are_named_at_once(suite: Suite) -> None:
    await suite.register("fraud")

    fields = await fields_refused(create_slo(suite, "Bad", an_slo(indicator=0, goal=2.0)))

    assert {
        "service_level_objective_id",
        "service_level_objective.indicator",
        "service_level_objective.goal",
    } <= fields


async def test_slo_status_counts_the_logged_predictions(suite: Suite) -> None:
    first = await suite.register("fraud")
    second = await suite.register("fraud", create=False)
    rng = np.random.default_rng(7)
    shadow = records(first, rng.normal(size=(10, 4)), prefix="shadow", status_code=14)
    for record in shadow:
        record.shadow = True
    old = records(
        first, rng.normal(size=(25, 4)), prefix="old", status_code=14, time_s=time.time() - 7200
    )
    await suite.log(
        records(first, rng.normal(size=(40, 4)), prefix="fast", latency_ms=5.0)
        + records(first, rng.normal(size=(10, 4)), prefix="slow", latency_ms=50.0)
        + records(first, rng.normal(size=(5, 4)), prefix="failed", status_code=14)
        + records(second, rng.normal(size=(20, 4)), prefix="other", status_code=13)
        + shadow
        + old
    )
    threshold = {"nanos": 20_000_000}  # 20 ms

    model_wide = await create_slo(suite, "model-wide", an_slo(goal=0.9))
    last_hour = await create_slo(suite, "last-hour", an_slo(rolling_period={"seconds": 3600}))
    latency = await create_slo(
        suite,
        "latency",
        an_slo(model_version=first, indicator=LATENCY, latency_threshold=threshold, goal=0.5),
    )

    # (good, total): shadow predictions never count; each SLO counts its own
    # version(s), period and indicator.
    for slo, good, total in (
        (model_wide, 50, 40 + 10 + 5 + 20 + 25),
        (last_hour, 50, 40 + 10 + 5 + 20),
        (latency, 40, 40 + 10 + 5 + 25),
    ):
        for status in (slo.status, (await get_slo(suite, slo.name)).status):
            sli, budget, met = expected_status(good, total, slo.goal)
            assert (status.good_count, status.total_count) == (good, total), slo.name
            assert status.sli == pytest.approx(sli)
            assert status.error_budget_remaining == pytest.approx(budget)
            assert status.met == met
    assert not model_wide.status.met
    assert latency.status.met


async def test_slos_are_listed_by_name_filtered_and_paged(suite: Suite) -> None:
    version = await suite.register("fraud")
    await suite.register("credit")
    await suite.log(records(version, np.random.default_rng(8).normal(size=(10, 4)), status_code=14))
    await create_slo(
        suite, "c-latency", an_slo(indicator=LATENCY, latency_threshold={"seconds": 1})
    )
    await create_slo(suite, "b-availability", an_slo())
    await create_slo(suite, "a-credit", an_slo("models/credit"))

    async def listed(**fields: Any) -> rpc.ListServiceLevelObjectivesResponse:
        return await suite.monitor.ListServiceLevelObjectives(
            rpc.ListServiceLevelObjectivesRequest(**fields), timeout=10
        )

    everything = await listed()
    fraud = await listed(filter='model = "models/fraud"')
    latency = await listed(filter="indicator = LATENCY")
    unmet = await listed(filter="status.met = false")
    met = await listed(filter='status.met = true AND model = "models/fraud"')
    first_page = await listed(page_size=2)
    second_page = await listed(page_size=2, page_token=first_page.next_page_token)

    def slo_names(reply: rpc.ListServiceLevelObjectivesResponse) -> list[str]:
        return [
            s.name.removeprefix("serviceLevelObjectives/") for s in reply.service_level_objectives
        ]

    assert slo_names(everything) == ["a-credit", "b-availability", "c-latency"]
    assert all(s.HasField("status") for s in everything.service_level_objectives)
    assert slo_names(fraud) == ["b-availability", "c-latency"]
    assert slo_names(latency) == ["c-latency"]
    assert slo_names(unmet) == ["b-availability", "c-latency"]  # every fraud prediction failed
    assert slo_names(met) == []
    assert slo_names(first_page) == ["a-credit", "b-availability"]
    assert slo_names(second_page) == ["c-latency"]
    assert not second_page.next_page_token
    for fields in (
        {"page_size": -1},
        {"filter": "colour = red"},
        {"filter": "indicator = SPEED"},
        {"page_token": "garbage"},
        {"page_size": 2, "page_token": first_page.next_page_token, "filter": "indicator = LATENCY"},
    ):
        await expect_error(listed(**fields), grpc.StatusCode.INVALID_ARGUMENT)


async def test_an_slo_is_updated_by_mask(suite: Suite) -> None:
    version = await suite.register("fraud")
    await suite.log(
        records(version, np.random.default_rng(9).normal(size=(10, 4)), prefix="ok")
        + records(version, np.random.default_rng(10).normal(size=(10, 4)), status_code=14)
    )
    created = await create_slo(suite, "availability", an_slo(goal=0.4, display_name="old"))

    async def update(slo: pb.ServiceLevelObjective, mask: list[str]) -> pb.ServiceLevelObjective:
        reply = await suite.monitor.UpdateServiceLevelObjective(
            rpc.UpdateServiceLevelObjectiveRequest(
                service_level_objective=slo, update_mask={"paths": mask}
            ),
            timeout=10,
        )
        return reply.service_level_objective

    stricter = await update(
        pb.ServiceLevelObjective(name=created.name, goal=0.8, display_name="ignored"), ["goal"]
    )
    scoped = await update(
        pb.ServiceLevelObjective(name=created.name, model_version=version), ["model_version"]
    )
    replaced = await update(an_slo(name=created.name, goal=0.3, display_name="whole"), [])

    assert created.status.met
    assert created.status.sli == pytest.approx(0.5)
    assert stricter.goal == 0.8
    assert stricter.display_name == "old"
    assert not stricter.status.met  # recomputed: 0.5 < 0.8
    assert stricter.update_time.ToMicroseconds() >= created.update_time.ToMicroseconds()
    assert stricter.create_time == created.create_time
    assert scoped.model_version == version
    assert (replaced.goal, replaced.display_name, replaced.model_version) == (0.3, "whole", "")
    assert (await get_slo(suite, created.name)).goal == 0.3

    for slo, mask, field in [
        (
            pb.ServiceLevelObjective(name=created.name, model="models/credit"),
            ["model"],
            "update_mask.paths[0]",
        ),
        (
            pb.ServiceLevelObjective(name=created.name, indicator=LATENCY),
            ["indicator"],
            "update_mask.paths[0]",
        ),
        (pb.ServiceLevelObjective(name=created.name), ["goal", "colour"], "update_mask.paths[1]"),
        (pb.ServiceLevelObjective(name=created.name), ["status"], "update_mask.paths[0]"),
        (pb.ServiceLevelObjective(name=created.name), ["goal.value"], "update_mask.paths[0]"),
        (
            pb.ServiceLevelObjective(name=created.name, goal=1.5),
            ["goal"],
            "service_level_objective.goal",
        ),
        (
            pb.ServiceLevelObjective(name=created.name, model_version="models/credit/versions/1"),
            ["model_version"],
            "service_level_objective.model_version",
        ),
        (an_slo(name=created.name, model="models/credit"), [], "service_level_objective.model"),
        (
            pb.ServiceLevelObjective(name="slos/x", goal=0.5),
            ["goal"],
            "service_level_objective.name",
        ),
    ]:
        assert field in await fields_refused(update(slo, mask)), (mask, field)
    await expect_error(
        update(
            pb.ServiceLevelObjective(name=created.name, model_version="models/fraud/versions/9"),
            ["model_version"],
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        update(pb.ServiceLevelObjective(name="serviceLevelObjectives/nope", goal=0.5), ["goal"]),
        grpc.StatusCode.NOT_FOUND,
    )
    assert (await get_slo(suite, created.name)).goal == 0.3  # refused updates change nothing


async def test_an_slo_a_rule_uses_cannot_be_deleted(suite: Suite) -> None:
    await suite.register("fraud")
    slo = await create_slo(suite, "availability", an_slo())
    rule = await create_rule(
        suite, "budget", a_rule(slo=pb.SloCondition(service_level_objective=slo.name))
    )

    async def delete_slo(name: str) -> None:
        await suite.monitor.DeleteServiceLevelObjective(
            rpc.DeleteServiceLevelObjectiveRequest(name=name), timeout=10
        )

    in_use = await refused(delete_slo(slo.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert isinstance(in_use, FailedPreconditionError)
    assert in_use.reason == "SLO_IN_USE"
    assert rule.name in in_use.message
    assert (await get_slo(suite, slo.name)).name == slo.name

    await suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=rule.name), timeout=10)
    await delete_slo(slo.name)

    await expect_error(get_slo(suite, slo.name), grpc.StatusCode.NOT_FOUND)
    await expect_error(delete_slo(slo.name), grpc.StatusCode.NOT_FOUND)
    await expect_error(delete_slo("serviceLevelObjectives/Bad"), grpc.StatusCode.INVALID_ARGUMENT)


# -- alert rules ------------------------------------------------------------------------


async def referenced_version(suite: Suite, model_id: str = "fraud") -> str:
    """A version whose reference has features x0-x3."""
    version = await suite.register(model_id)
    await suite.set_reference(version, np.random.default_rng(11).normal(size=(200, 4)))
    return version


async def test_a_rule_is_created_once_and_read_back(suite: Suite) -> None:
    version = await referenced_version(suite)
    slo = await create_slo(suite, "availability", an_slo())
    key = "0f6b8c1e-6d7a-4c1b-a4c4-0d8f5b8e2a11"

    rule = a_rule(
        model_version=version,
        drift=pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE, feature="x2"),
        trigger_windows=3,
        severity=pb.ALERT_SEVERITY_CRITICAL,
        actions=[pb.AlertAction(rollback=pb.RollbackAction())],
    )

    drift = await create_rule(suite, "feature-drift", rule, request_id=key)
    again = await create_rule(suite, "feature-drift", rule, request_id=key)
    generated = await create_rule(
        suite, "", a_rule(slo=pb.SloCondition(service_level_objective=slo.name))
    )
    fetched = await suite.monitor.GetAlertRule(
        rpc.GetAlertRuleRequest(name="alertRules/feature-drift"), timeout=10
    )

    assert drift.name == "alertRules/feature-drift"
    assert drift.drift.feature == "x2"
    assert drift.trigger_windows == 3
    assert drift.HasField("create_time")
    assert drift.update_time == drift.create_time
    assert fetched.alert_rule == drift
    assert names.parse_resource_name(generated.name, "alertRules")
    taken = await refused(
        create_rule(suite, "feature-drift", a_rule()), grpc.StatusCode.ALREADY_EXISTS
    )
    assert taken.reason == "ALREADY_EXISTS"
    assert again == drift  # the retry returned the first rule
    reused = await refused(
        create_rule(suite, "other", rule, request_id=key), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert reused.reason == "REQUEST_ID_REUSED"


async def test_rules_naming_what_does_not_exist_are_not_found(suite: Suite) -> None:
    await referenced_version(suite)

    for rule in (
        a_rule("models/ghost"),
        a_rule(model_version="models/fraud/versions/9"),
        a_rule(slo=pb.SloCondition(service_level_objective="serviceLevelObjectives/nope")),
    ):
        await expect_error(create_rule(suite, "nope", rule), grpc.StatusCode.NOT_FOUND)
    for name, code in [
        ("alertRules/nope", grpc.StatusCode.NOT_FOUND),
        ("alertRules/", grpc.StatusCode.INVALID_ARGUMENT),
        ("rules/nope", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        await expect_error(
            suite.monitor.GetAlertRule(rpc.GetAlertRuleRequest(name=name), timeout=10), code
        )
        await expect_error(
            suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=name), timeout=10),
            code,
        )


def _rollback(alias: str = "") -> pb.AlertAction:
    return pb.AlertAction(rollback=pb.RollbackAction(alias=alias))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.ClearField("drift"), "alert_rule.condition"),
        (lambda r: setattr(r, "model", ""), "alert_rule.model"),
        (
            lambda r: setattr(r, "model_version", "models/credit/versions/1"),
            "alert_rule.model_version",
        ),
        (
            lambda r: setattr(r, "model_version", "models/fraud@production"),
            "alert_rule.model_version",
        ),
        (lambda r: setattr(r.drift, "scope", 0), "alert_rule.drift.scope"),
        (lambda r: setattr(r.drift, "scope", pb.DRIFT_SCOPE_FEATURE), "alert_rule.drift.feature"),
        (lambda r: setattr(r.drift, "feature", "x1"), "alert_rule.drift.feature"),
        (
            lambda r: r.drift.CopyFrom(
                pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE, feature="x9")
            ),
            "alert_rule.drift.feature",
        ),
        (
            lambda r: r.performance.CopyFrom(pb.PerformanceCondition()),
            "alert_rule.performance.metric",
        ),
        (
            lambda r: r.performance.CopyFrom(
                pb.PerformanceCondition(metric=pb.PERFORMANCE_METRIC_F1, max_degradation=-0.1)
            ),
            "alert_rule.performance.max_degradation",
        ),
        (
            lambda r: r.outliers.CopyFrom(pb.OutlierCondition(max_outlier_rate=1.5)),
            "alert_rule.outliers.max_outlier_rate",
        ),
        (
            lambda r: r.slo.CopyFrom(pb.SloCondition(service_level_objective="slos/x")),
            "alert_rule.slo.service_level_objective",
        ),
        (
            lambda r: r.slo.CopyFrom(
                pb.SloCondition(
                    service_level_objective="serviceLevelObjectives/credit", burn_rate_threshold=2
                )
            ),
            "alert_rule.slo.service_level_objective",
        ),
        (
            lambda r: r.slo.CopyFrom(
                pb.SloCondition(
                    service_level_objective="serviceLevelObjectives/fraud", burn_rate_threshold=0
                )
            ),
            "alert_rule.slo.burn_rate_threshold",
        ),
        (lambda r: setattr(r, "trigger_windows", 101), "alert_rule.trigger_windows"),
        (lambda r: setattr(r, "resolve_windows", -1), "alert_rule.resolve_windows"),
        (lambda r: setattr(r, "severity", 9), "alert_rule.severity"),
        (lambda r: r.actions.extend([_rollback()] * 5), "alert_rule.actions"),
        (lambda r: r.actions.append(pb.AlertAction()), "alert_rule.actions[0]"),
        (lambda r: r.actions.append(_rollback("Prod!")), "alert_rule.actions[0].rollback.alias"),
        (
            lambda r: r.actions.append(
                pb.AlertAction(retrain=pb.RetrainAction(training_job="jobs/x"))
            ),
            "alert_rule.actions[0].retrain.training_job",
        ),
        (
            lambda r: r.actions.append(
                pb.AlertAction(retrain=pb.RetrainAction(labelled_data_window={"seconds": 60}))
            ),
            "alert_rule.actions[0].retrain.labelled_data_window",
        ),
        (lambda r: setattr(r, "display_name", "x" * 257), "alert_rule.display_name"),
    ],
)
async def test_each_bad_rule_field_is_named(
    suite: Suite, change: Callable[[pb.AlertRule], None], field: str
) -> None:
    version = await referenced_version(suite)
    await suite.register("credit")
    await create_slo(suite, "credit", an_slo("models/credit"))
    await create_slo(suite, "fraud", an_slo())
    rule = a_rule(model_version=version)
    change(rule)

    assert field in await fields_refused(create_rule(suite, "bad", rule))

    listed = await suite.monitor.ListAlertRules(rpc.ListAlertRulesRequest(), timeout=10)
    assert not listed.alert_rules


async def test_a_bad_rule_id_is_named(suite: Suite) -> None:
    await referenced_version(suite)

    assert "alert_rule_id" in await fields_refused(create_rule(suite, "-bad", a_rule()))


async def test_rules_are_listed_by_name_filtered_and_paged(suite: Suite) -> None:
    version = await referenced_version(suite)
    await suite.register("credit")
    await create_rule(suite, "c", a_rule(model_version=version, disabled=True))
    await create_rule(suite, "b", a_rule(severity=pb.ALERT_SEVERITY_CRITICAL))
    await create_rule(suite, "a", a_rule("models/credit"))

    async def listed(**fields: Any) -> list[str]:
        reply = await suite.monitor.ListAlertRules(rpc.ListAlertRulesRequest(**fields), timeout=10)
        return [r.name.removeprefix("alertRules/") for r in reply.alert_rules]

    assert await listed() == ["a", "b", "c"]
    assert await listed(filter='model = "models/fraud"') == ["b", "c"]
    assert await listed(filter=f'model_version = "{version}"') == ["c"]
    assert await listed(filter="disabled = false") == ["a", "b"]
    assert await listed(filter="disabled = true") == ["c"]
    assert await listed(filter="severity = CRITICAL") == ["b"]
    assert await listed(filter="severity = WARNING") == ["a", "c"]  # unset means WARNING
    first = await suite.monitor.ListAlertRules(rpc.ListAlertRulesRequest(page_size=2), timeout=10)
    rest = await suite.monitor.ListAlertRules(
        rpc.ListAlertRulesRequest(page_size=2, page_token=first.next_page_token), timeout=10
    )
    assert [r.name for r in [*first.alert_rules, *rest.alert_rules]] == [
        "alertRules/a",
        "alertRules/b",
        "alertRules/c",
    ]
    assert not rest.next_page_token
    for fields in (
        {"page_size": -1},
        {"filter": "disabled = maybe"},
        {"filter": "state = FIRING"},
        {"page_token": "nope"},
    ):
        await expect_error(listed(**fields), grpc.StatusCode.INVALID_ARGUMENT)


async def test_a_rule_is_updated_by_mask(suite: Suite) -> None:
    version = await referenced_version(suite)
    await suite.register("credit")
    credit_slo = await create_slo(suite, "credit", an_slo("models/credit"))
    created = await create_rule(
        suite,
        "quality",
        a_rule(
            performance=pb.PerformanceCondition(
                metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=0.05
            ),
            display_name="accuracy",
        ),
    )

    async def update(rule: pb.AlertRule, mask: list[str]) -> pb.AlertRule:
        reply = await suite.monitor.UpdateAlertRule(
            rpc.UpdateAlertRuleRequest(alert_rule=rule, update_mask={"paths": mask}), timeout=10
        )
        return reply.alert_rule

    looser = await update(
        pb.AlertRule(name=created.name, performance=pb.PerformanceCondition(max_degradation=0.1)),
        ["performance.max_degradation"],
    )
    windows = await update(
        pb.AlertRule(name=created.name, trigger_windows=3, display_name="ignored"),
        ["trigger_windows"],
    )
    outliers = await update(
        pb.AlertRule(
            name=created.name,
            outliers=pb.OutlierCondition(max_outlier_rate=0.2),
            model_version=version,
        ),
        ["outliers", "model_version"],
    )
    whole = await update(a_rule(name=created.name, severity=pb.ALERT_SEVERITY_INFO), [])

    assert looser.performance.metric == pb.PERFORMANCE_METRIC_ACCURACY
    assert looser.performance.max_degradation == 0.1
    assert (windows.trigger_windows, windows.display_name) == (3, "accuracy")
    assert outliers.WhichOneof("condition") == "outliers"
    assert outliers.model_version == version
    assert whole.WhichOneof("condition") == "drift"
    assert whole.severity == pb.ALERT_SEVERITY_INFO
    assert (whole.trigger_windows, whole.display_name, whole.model_version) == (0, "", "")
    assert whole.create_time == created.create_time
    fetched = await suite.monitor.GetAlertRule(
        rpc.GetAlertRuleRequest(name=created.name), timeout=10
    )
    assert fetched.alert_rule == whole

    for rule, mask, field in [
        (pb.AlertRule(name=created.name, model="models/credit"), ["model"], "update_mask.paths[0]"),
        (pb.AlertRule(name=created.name), ["colour"], "update_mask.paths[0]"),
        (pb.AlertRule(name=created.name), ["create_time"], "update_mask.paths[0]"),
        (
            pb.AlertRule(name=created.name, trigger_windows=500),
            ["trigger_windows"],
            "alert_rule.trigger_windows",
        ),
        (pb.AlertRule(name=created.name), ["drift"], "alert_rule.condition"),
        (
            pb.AlertRule(
                name=created.name, slo=pb.SloCondition(service_level_objective=credit_slo.name)
            ),
            ["slo"],
            "alert_rule.slo.service_level_objective",
        ),
        (
            pb.AlertRule(
                name=created.name,
                model_version=version,
                drift=pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE, feature="x9"),
            ),
            ["drift", "model_version"],
            "alert_rule.drift.feature",
        ),
        (a_rule(name=created.name, model="models/credit"), [], "alert_rule.model"),
        (
            pb.AlertRule(name="alertRules/", trigger_windows=2),
            ["trigger_windows"],
            "alert_rule.name",
        ),
    ]:
        assert field in await fields_refused(update(rule, mask)), (mask, field)
    for rule, mask in [
        (pb.AlertRule(name="alertRules/nope", trigger_windows=2), ["trigger_windows"]),
        (
            pb.AlertRule(
                name=created.name,
                slo=pb.SloCondition(service_level_objective="serviceLevelObjectives/nope"),
            ),
            ["slo"],
        ),
        (
            pb.AlertRule(name=created.name, model_version="models/fraud/versions/9"),
            ["model_version"],
        ),
    ]:
        await expect_error(update(rule, mask), grpc.StatusCode.NOT_FOUND)
    unchanged = await suite.monitor.GetAlertRule(
        rpc.GetAlertRuleRequest(name=created.name), timeout=10
    )
    assert unchanged.alert_rule == whole


async def test_a_deleted_rule_is_gone(suite: Suite) -> None:
    await referenced_version(suite)
    rule = await create_rule(suite, "drift", a_rule())

    await suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=rule.name), timeout=10)

    await expect_error(
        suite.monitor.GetAlertRule(rpc.GetAlertRuleRequest(name=rule.name), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        suite.monitor.DeleteAlertRule(rpc.DeleteAlertRuleRequest(name=rule.name), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    again = await create_rule(suite, "drift", a_rule())  # the id is free again
    assert again.name == rule.name
