"""Canary analysis as a service: ``GetCanaryAnalysis``, and the comparison (with
its automatic action) at every window close of a canary or baseline version.

:mod:`.canary` makes the comparison; this module gathers what it compares. The
two versions are the ones the model's ``CanaryConfig.canary_alias`` and
``baseline_alias`` point at in the registry; the predictions compared are each
version's logged ones (shadow predictions left out) since the canary alias
last moved (its ``update_time``) until now.

With ``CanaryConfig.auto_apply``, a PROMOTE or ROLL_BACK recommendation reached
after a window closes is performed through the registry's ``SetAlias``, so
policy decides and the audit log records it. The move is a compare-and-set
against the version the alias pointed at when the analysis read it, so a newer
promotion made meanwhile is never undone (the call fails with ABORTED, and the
action is FAILED). Each action is tried once per situation: per canary
version, baseline version, canary alias move and action kind. A DENIED or
FAILED action is not retried until one of those changes (the canary alias is
set again, for example); later analyses in the same situation report the
action already performed. The latest analysis of each model is stored.

``GetCanaryAnalysis`` only reports: it computes the analysis now and, with
``auto_apply``, shows the action already performed for the same situation and
recommendation, if any.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor import config as configs
from conveyor.services.monitor.alerting import WindowFindings
from conveyor.services.monitor.canary import (
    CanaryAction,
    CanarySide,
    ResolvedCanaryConfig,
    analyse_canary,
    recommended_action,
)
from conveyor.services.monitor.drift import DriftTestSpec
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.profiles import VersionProfiles, model_of
from conveyor.services.monitor.references import predicted_classes
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared.errors import (
    ConveyorError,
    FailedPreconditionError,
    PermissionDeniedError,
    PreconditionViolation,
)
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

MAX_REASON_BYTES: Final = 1_024
"""``SetAliasRequest.reason``'s limit."""
PROMOTION_REFUSED: Final = "PROMOTION_REFUSED"
"""The registry's reason when a promotion gate refuses an alias move
(FAILED_PRECONDITION, the decision in the ``decision`` metadata)."""
_ALIAS_VIOLATION: Final = "CANARY_ALIAS"


def analysis_name(model: str) -> str:
    return f"{model}/canaryAnalysis"


@dataclass(frozen=True)
class _Situation:
    """What an analysis compares: the two versions and since when. An action is
    performed at most once per situation and kind."""

    canary_version: str
    baseline_version: str
    start_us: int


@dataclass(frozen=True)
class _Computed:
    analysis: pb.CanaryAnalysis
    config: ResolvedCanaryConfig
    situation: _Situation


class CanaryAnalyst:
    """Computes canary analyses and, with ``auto_apply``, performs them."""

    def __init__(
        self,
        store: MonitorStore,
        profiles: VersionProfiles,
        registry: RegistryClient,
        workers: WorkerThreads,
        metrics: MonitorMetrics,
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._registry = registry
        self._workers = workers
        self._metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self._performed: dict[str, tuple[_Situation, dict[int, pb.ActionExecution]]] = {}
        """Per model: its latest situation and the actions performed in it, by kind."""

    # -- GetCanaryAnalysis ---------------------------------------------------------

    async def analyse(self, model: str) -> pb.CanaryAnalysis:
        """The analysis of ``model`` (``models/m``) computed now; NOT_FOUND from
        the registry for an unknown model, FAILED_PRECONDITION when an alias is
        not set or both point at the same version."""
        registry_model = await self._registry.model(model)
        resolved = configs.resolve(await self._profiles.config(model))
        computed = await self._compute(model, registry_model, resolved)
        analysis = computed.analysis
        action = recommended_action(analysis, computed.config)
        if computed.config.auto_apply and action is not None:
            done = await self._already_performed(model, computed.situation, action.kind)
            if done is not None:
                analysis.action.CopyFrom(done)
        return analysis

    # -- window listener -----------------------------------------------------------

    async def on_window(self, findings: WindowFindings) -> None:
        """After a window of ``findings.model_version`` closes: when it is its
        model's canary or baseline version, analyse, perform the recommendation
        once with ``auto_apply``, and store the analysis. Problems with the
        registry or the aliases are logged, never raised."""
        model = model_of(findings.model_version)
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            try:
                await self._on_window(model, findings.model_version)
            except ConveyorError as error:
                logger.warning(
                    "canary analysis of %s after a window of %s failed: %s",
                    model,
                    findings.model_version,
                    error.message,
                )

    async def _on_window(self, model: str, model_version: str) -> None:
        registry_model = await self._registry.model(model)
        resolved = configs.resolve(await self._profiles.config(model))
        config = ResolvedCanaryConfig.from_proto(resolved.canary)
        canary = registry_model.aliases.get(config.canary_alias, "")
        baseline = registry_model.aliases.get(config.baseline_alias, "")
        if model_version not in (canary, baseline) or not canary or canary == baseline:
            return
        computed = await self._compute(model, registry_model, resolved)
        analysis = computed.analysis
        action = recommended_action(analysis, computed.config)
        if computed.config.auto_apply and action is not None:
            execution = await self._already_performed(model, computed.situation, action.kind)
            if execution is None:
                execution = await self._perform(model, analysis, action)
                self._remember(model, computed.situation, execution)
            analysis.action.CopyFrom(execution)
        await self._workers.run(self._store.put_canary_analysis, model, analysis)

    # -- the analysis --------------------------------------------------------------

    async def _compute(
        self, model: str, registry_model: registry_pb.Model, resolved: configs.ResolvedConfig
    ) -> _Computed:
        """The analysis of the versions the aliases of ``registry_model`` point at,
        under the model's config ``resolved``."""
        config = ResolvedCanaryConfig.from_proto(resolved.canary)
        _aliased(model, registry_model, config.canary_alias, "CANARY_NOT_SET")
        baseline_version = _aliased(
            model, registry_model, config.baseline_alias, "BASELINE_NOT_SET"
        )
        # The alias record, for when it last moved (and where it points since).
        alias = await self._registry.alias(model, config.canary_alias)
        if alias is None or not alias.version:
            raise _not_set(model, config.canary_alias, "CANARY_NOT_SET")
        canary_version = alias.version
        if canary_version == baseline_version:
            raise FailedPreconditionError(
                f"{model}@{config.canary_alias} and {model}@{config.baseline_alias} both point "
                f"at {canary_version}: there is no canary to analyse",
                reason="CANARY_IS_BASELINE",
                metadata={"model_version": canary_version},
                violations=[
                    PreconditionViolation(
                        _ALIAS_VIOLATION,
                        f"{model}@{config.canary_alias}",
                        f"points at the baseline version {canary_version}",
                    )
                ],
            )
        start_us = alias.update_time.ToMicroseconds()
        end_us = max(time.time_ns() // 1_000, start_us + 1)
        canary, baseline = await asyncio.gather(
            self._side(canary_version, start_us, end_us),
            self._side(baseline_version, start_us, end_us),
        )
        analysis = await self._workers.run(
            _analyse,
            canary,
            baseline,
            config,
            resolved.prediction_test,
            resolved.drift.large_reference_rows,
        )
        analysis.name = analysis_name(model)
        analysis.interval.start_time.FromMicroseconds(start_us)
        analysis.interval.end_time.FromMicroseconds(end_us)
        analysis.compute_time.GetCurrentTime()
        return _Computed(analysis, config, _Situation(canary_version, baseline_version, start_us))

    async def _side(self, model_version: str, start_us: int, end_us: int) -> CanarySide:
        """The version's served predictions in ``[start_us, end_us)``."""
        schema = (await self._profiles.get(model_version)).schema
        return await self._workers.run(
            _read_side,
            self._store,
            model_version,
            start_us,
            end_us,
            len(schema.numerical),
            len(schema.categorical),
        )

    # -- the action ----------------------------------------------------------------

    async def _already_performed(
        self, model: str, situation: _Situation, kind: int
    ) -> pb.ActionExecution | None:
        """The action of ``kind`` performed in ``situation``: remembered, or (after
        a restart) in the stored analysis."""
        remembered = self._performed.get(model)
        if remembered is not None and remembered[0] == situation:
            return remembered[1].get(kind)
        stored = await self._workers.run(self._store.canary_analysis, model)
        if (
            stored is not None
            and stored.HasField("action")
            and stored.action.kind == kind
            and _situation_of(stored) == situation
        ):
            self._remember(model, situation, stored.action)
            return stored.action
        return None

    def _remember(self, model: str, situation: _Situation, execution: pb.ActionExecution) -> None:
        remembered = self._performed.get(model)
        if remembered is None or remembered[0] != situation:
            remembered = (situation, {})
            self._performed[model] = remembered
        remembered[1][execution.kind] = execution

    async def _perform(
        self, model: str, analysis: pb.CanaryAnalysis, action: CanaryAction
    ) -> pb.ActionExecution:
        """Move the alias through the registry, compare-and-set against where it
        points in the analysis; the execution, SUCCEEDED, DENIED or FAILED."""
        promote = action.kind == pb.ACTION_KIND_PROMOTE
        expected = analysis.baseline_model_version if promote else analysis.canary_model_version
        execution = pb.ActionExecution(kind=action.kind, state=pb.ACTION_STATE_RUNNING)
        execution.start_time.GetCurrentTime()
        target = f"{model}@{action.alias}"
        try:
            alias = await self._registry.set_alias(
                model,
                action.alias,
                action.target_version,
                reason=_reason(analysis, promote=promote),
                expected_version=expected,
            )
        except ConveyorError as error:
            decision = _decision(error)
            if decision is not None:
                execution.state = pb.ACTION_STATE_DENIED
                execution.decision = decision
            else:
                execution.state = pb.ACTION_STATE_FAILED
            execution.message = f"moving {target} to {action.target_version}: {error.message}"
            logger.warning(
                "canary auto-apply %s of %s %s: %s",
                pb.ActionKind.Name(action.kind),
                model,
                pb.ActionState.Name(execution.state),
                execution.message,
            )
        else:
            execution.state = pb.ACTION_STATE_SUCCEEDED
            execution.resources.append(target)
            execution.decision = alias.decision
            execution.message = f"moved {target} from {expected} to {alias.version}" + (
                " (promoted the canary)" if promote else " (rolled the canary back)"
            )
            logger.info(
                "canary auto-apply %s of %s: %s",
                pb.ActionKind.Name(action.kind),
                model,
                execution.message,
            )
        execution.end_time.GetCurrentTime()
        return execution


# -- helpers ----------------------------------------------------------------------


def _aliased(model: str, registry_model: registry_pb.Model, alias: str, reason: str) -> str:
    """The version ``alias`` points at; FAILED_PRECONDITION with ``reason`` when
    it is not set."""
    version = registry_model.aliases.get(alias, "")
    if not version:
        raise _not_set(model, alias, reason)
    return version


def _not_set(model: str, alias: str, reason: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"{model}@{alias} is not set: canary analysis compares the versions the canary and "
        "baseline aliases point at",
        reason=reason,
        metadata={"alias": alias},
        violations=[PreconditionViolation(_ALIAS_VIOLATION, f"{model}@{alias}", "is not set")],
    )


def _read_side(
    store: MonitorStore,
    model_version: str,
    start_us: int,
    end_us: int,
    numerical_columns: int,
    categorical_columns: int,
) -> CanarySide:
    rows = store.window_rows(
        model_version,
        time_range=(start_us, end_us),
        numerical_columns=numerical_columns,
        categorical_columns=categorical_columns,
        include_shadow=False,
    )
    classes: npt.NDArray[np.int64] = (
        predicted_classes(rows.outputs)
        if rows.outputs.shape[0] and rows.outputs.shape[1]
        else np.zeros(rows.outputs.shape[0], dtype=np.int64)
    )
    return CanarySide(
        model_version=model_version,
        status_codes=rows.status_codes,
        latencies_s=rows.latencies_s,
        predicted_classes=classes,
    )


def _analyse(
    canary: CanarySide,
    baseline: CanarySide,
    config: ResolvedCanaryConfig,
    prediction_test: DriftTestSpec,
    large_reference_rows: int,
) -> pb.CanaryAnalysis:
    return analyse_canary(
        canary, baseline, config, prediction_test, large_reference_rows=large_reference_rows
    )


def _situation_of(analysis: pb.CanaryAnalysis) -> _Situation:
    return _Situation(
        analysis.canary_model_version,
        analysis.baseline_model_version,
        analysis.interval.start_time.ToMicroseconds(),
    )


def _decision(error: ConveyorError) -> str | None:
    """The policy decision of a refusal (``decisions/{id}``, empty when the
    registry did not name it); None when ``error`` is not a refusal."""
    if isinstance(error, PermissionDeniedError):
        decision = error.metadata.get("decision") or error.metadata.get("decision_id", "")
    elif isinstance(error, FailedPreconditionError) and error.reason == PROMOTION_REFUSED:
        decision = error.metadata.get("decision", "")
    else:
        return None
    if decision and not decision.startswith("decisions/"):
        decision = f"decisions/{decision}"
    return decision


def _reason(analysis: pb.CanaryAnalysis, *, promote: bool) -> str:
    """Why the alias moves, for the alias and the audit log, within 1 KiB."""
    if promote:
        text = (
            f"canary analysis: promote {analysis.canary_model_version}, every check passed "
            f"against {analysis.baseline_model_version}"
        )
    else:
        failed = ", ".join(
            pb.CanaryCheckType.Name(check.type).removeprefix("CANARY_CHECK_TYPE_").lower()
            for check in analysis.checks
            if not check.passed
        )
        text = (
            f"canary analysis: roll back {analysis.canary_model_version} to "
            f"{analysis.baseline_model_version}, failed {failed or 'a check'}"
        )
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
