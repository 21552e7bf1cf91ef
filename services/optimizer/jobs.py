"""Running optimisation jobs: the queue, the work, and what it reports.

:class:`JobManager` owns every RUNNING job of this optimizer:

- **Queue.** Jobs wait QUEUED in the store; the scheduler starts the oldest
  while fewer than ``max_running_jobs`` run.
- **Work.** A job fetches its source (signature verified) and its data, then
  applies its techniques one after the other in a worker thread
  (:class:`~.techniques.Optimization`): each result is built, measured beside
  its baseline, judged by the gate, and registered when it passes. Every
  phase is published to the job's watchers; the job is saved at every
  technique's outcome and state change.
- **Cancel** marks the job CANCELLING; the work stops at the next phase
  boundary (or between timed runs), unfinished results end CANCELLED, and
  versions registered before stay registered.
- **Outcome.** SUCCEEDED when every technique reached SUCCEEDED or
  GATE_REFUSED; FAILED when the job could not run or a technique FAILED.
- **Restart.** Jobs a previous optimizer left RUNNING are queued again: the
  results that reached an outcome keep it, the others start over (their
  registrations are idempotent). CANCELLING ones end CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Final

import grpc

from conveyor.optimizer.v1 import optimizer_messages_pb2 as rpc
from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import gate, measurement
from conveyor.services.optimizer.registry_gateway import RegistryGateway
from conveyor.services.optimizer.settings import OptimizerSettings
from conveyor.services.optimizer.source import load_splits
from conveyor.services.optimizer.store import (
    CANCELLING,
    QUEUED,
    RUNNING,
    TERMINAL_STATES,
    OptimizerStore,
    now,
    state_name,
)
from conveyor.services.optimizer.techniques import Optimization, refusal_of, result_version
from conveyor.services.optimizer.transforms import DEFAULT_OPSET
from conveyor.shared.errors import ConveyorError, FailedPreconditionError
from conveyor.shared.registry_writer import RegistryWriteError
from conveyor.shared.watch import WatchHub
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

SCHEDULER_RETRY_S: Final = 1.0
FINAL_RESULT_STATES: Final = frozenset(
    {
        pb.TECHNIQUE_STATE_SUCCEEDED,
        pb.TECHNIQUE_STATE_GATE_REFUSED,
        pb.TECHNIQUE_STATE_FAILED,
        pb.TECHNIQUE_STATE_CANCELLED,
    }
)
OptimizationWatchHub = WatchHub[pb.OptimizationJob, rpc.WatchOptimizationJobResponse]


def watch_hub() -> OptimizationWatchHub:
    """Streams of whole jobs: every update but the last is coalesced per watcher."""
    return WatchHub(
        snapshot_event=lambda job: rpc.WatchOptimizationJobResponse(optimization_job=job),
        is_finished=lambda job: job.state in TERMINAL_STATES,
        ends_stream=lambda update: update.optimization_job.state in TERMINAL_STATES,
        coalesced=lambda update: update.optimization_job.state not in TERMINAL_STATES,
    )


class JobCancelledError(Exception):
    """Raised in the worker thread at a phase boundary once cancel was asked."""


class _Running:
    def __init__(self, job: pb.OptimizationJob) -> None:
        self.job = job
        self.stop = threading.Event()
        self.task: asyncio.Task[None] | None = None
        self.detached = False
        """The optimizer is stopping: leave the job RUNNING, to run again later."""


class JobManager:
    """Schedules, runs, cancels and resumes this optimizer's jobs."""

    def __init__(
        self,
        settings: OptimizerSettings,
        store: OptimizerStore,
        workers: WorkerThreads,
        hub: OptimizationWatchHub,
        gateway: RegistryGateway,
    ) -> None:
        self._settings = settings
        self._store = store
        self._workers = workers
        self._hub = hub
        self._gateway = gateway
        self._live: dict[str, _Running] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False

    # -- reading ------------------------------------------------------------------

    async def get(self, job_id: str) -> pb.OptimizationJob:
        """The job as it is now (NOT_FOUND when it does not exist)."""
        running = self._live.get(f"optimizationJobs/{job_id}")
        if running is not None:
            return _copy(running.job)
        return await self._workers.run(self._store.get_job, job_id)

    def overlay(self, job: pb.OptimizationJob) -> pb.OptimizationJob:
        running = self._live.get(job.name)
        return _copy(running.job) if running is not None else job

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Queue again what a previous optimizer left running, then schedule."""
        for job in await self._workers.run(self._store.jobs_in_states, RUNNING, CANCELLING):
            if job.state == CANCELLING:
                _end(job, pb.OPTIMIZATION_JOB_STATE_CANCELLED)
            else:
                job.state = QUEUED
                for result in job.results:
                    if result.state not in FINAL_RESULT_STATES:
                        result.state = pb.TECHNIQUE_STATE_PENDING
                logger.info(
                    "queued again a job the previous optimizer left running",
                    extra={"optimization_job": job.name},
                )
            await self._workers.run(self._store.save_job, job)
        self._scheduler = asyncio.create_task(self._schedule(), name="optimizer-scheduler")
        self.notify()

    def notify(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Stop scheduling; running jobs stop at their next phase boundary and
        stay RUNNING, to run again when an optimizer starts."""
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        running = list(self._live.values())
        for job in running:
            job.detached = True
            job.stop.set()
        await asyncio.gather(*(job.task for job in running if job.task), return_exceptions=True)

    async def cancel(self, job_id: str) -> pb.OptimizationJob:
        """A QUEUED job ends CANCELLED now; a RUNNING one becomes CANCELLING and
        stops at its next phase boundary. CANCELLING is returned unchanged;
        ended jobs (CANCELLED included) are FAILED_PRECONDITION."""
        name = f"optimizationJobs/{job_id}"
        async with self._lock:
            running = self._live.get(name)
            if running is not None:
                if running.job.state == RUNNING:
                    running.job.state = CANCELLING
                    running.stop.set()
                    await self._save(running.job)
                    self._publish(running.job)
                return _copy(running.job)
            job, changed = await self._workers.run(self._store.update_job, job_id, _cancel_stored)
        if changed:
            self._publish(job)
        return job

    # -- scheduling -----------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while not self._closing and len(self._live) < self._settings.max_running_jobs:
                    async with self._lock:
                        job = await self._workers.run(self._store.claim_next)
                        if job is None:
                            break
                        running = _Running(job)
                        self._live[job.name] = running
                        running.task = asyncio.create_task(self._run(running))
                    self._publish(job)
            except Exception:  # the store may be down: look again soon
                logger.exception("could not start queued jobs")
                await asyncio.sleep(SCHEDULER_RETRY_S)
                self.notify()

    async def _run(self, running: _Running) -> None:
        job = running.job
        try:
            await self._work(running)
        except JobCancelledError:
            pass
        except ConveyorError as error:
            job.error.CopyFrom(_error(error.code, error.reason, error.message))
        except Exception:
            logger.exception("an optimisation job failed", extra={"optimization_job": job.name})
            job.error.CopyFrom(
                _error(
                    grpc.StatusCode.INTERNAL,
                    "OPTIMIZER_ERROR",
                    "the optimizer failed while running the job; its log has details",
                )
            )
        finally:
            async with self._lock:
                self._live.pop(job.name, None)
            if not running.detached:
                await self._finish(running)
            self.notify()

    async def _work(self, running: _Running) -> None:
        job = running.job
        loop = asyncio.get_running_loop()
        self._progress(running, "", pb.OPTIMIZATION_PHASE_PREPARING, "fetching the source")
        version = await self._gateway.version(job.resolved_source_model_version)
        source = await self._gateway.source(version)
        splits = await asyncio.to_thread(load_splits, version, dataset=job.dataset)
        config = measurement.resolved_measurement(job.measurement)
        optimization = Optimization(
            job_name=job.name,
            source=source,
            splits=splits,
            dataset=job.dataset or version.lineage.dataset,
            config=config,
            gate=gate.resolved_gate(job.gate),
            export_opset=_export_opset(job),
            should_stop=running.stop.is_set,
        )
        for index, result in enumerate(job.results):
            if result.state in FINAL_RESULT_STATES:
                continue
            spec = job.techniques[index]

            def on_phase(
                phase: pb.OptimizationPhase.ValueType,
                message: str,
                result_id: str = result.result_id,
            ) -> None:
                # Called on the worker thread: a cancel stops the work here.
                if running.stop.is_set():
                    raise JobCancelledError
                loop.call_soon_threadsafe(self._progress, running, result_id, phase, message)

            result.state = pb.TECHNIQUE_STATE_RUNNING
            result.start_time.CopyFrom(now())
            await self._save(job)
            try:
                outcome = await asyncio.to_thread(
                    optimization.apply, spec, result.result_id, on_phase
                )
                if running.stop.is_set():
                    raise JobCancelledError
            except ConveyorError as error:
                _settle(
                    result,
                    pb.TECHNIQUE_STATE_FAILED,
                    _error(error.code, error.reason, error.message),
                )
                await self._save(job)
                continue
            result.report.CopyFrom(outcome.report)
            refusal = refusal_of(outcome, result.result_id)
            if refusal is not None:
                _settle(result, pb.TECHNIQUE_STATE_GATE_REFUSED, refusal)
            else:
                self._progress(
                    running, result.result_id, pb.OPTIMIZATION_PHASE_REGISTERING, "registering"
                )
                registered = result_version(source, outcome, job_name=job.name)
                try:
                    result.model_version = await self._gateway.register(
                        job, result.result_id, registered, outcome.model, outcome.report
                    )
                    result.report.model_version = result.model_version
                    _settle(result, pb.TECHNIQUE_STATE_SUCCEEDED, None)
                except RegistryWriteError as failed:
                    _settle(
                        result,
                        pb.TECHNIQUE_STATE_FAILED,
                        _error(failed.code, "REGISTRATION_FAILED", failed.message),
                    )
            await self._save(job)
            self._publish(job)

    # -- state ----------------------------------------------------------------------

    def _progress(
        self,
        running: _Running,
        result_id: str,
        phase: pb.OptimizationPhase.ValueType,
        message: str,
    ) -> None:
        job = running.job
        done = sum(result.state in FINAL_RESULT_STATES for result in job.results)
        total = len(job.results)
        job.progress.CopyFrom(
            pb.OptimizationProgress(
                result_id=result_id,
                phase=phase,
                completed_techniques=done,
                total_techniques=total,
                fraction_complete=done / total if total else 0.0,
                message=message,
                update_time=now(),
            )
        )
        self._publish(job)

    async def _finish(self, running: _Running) -> None:
        job = running.job
        cancelled = running.stop.is_set() and not running.detached
        for result in job.results:
            if result.state not in FINAL_RESULT_STATES:
                _settle(
                    result,
                    pb.TECHNIQUE_STATE_CANCELLED if cancelled else pb.TECHNIQUE_STATE_FAILED,
                    None,
                )
        failed = [r for r in job.results if r.state == pb.TECHNIQUE_STATE_FAILED]
        if cancelled:
            state = pb.OPTIMIZATION_JOB_STATE_CANCELLED
        elif job.HasField("error") or failed:
            state = pb.OPTIMIZATION_JOB_STATE_FAILED
            if not job.HasField("error"):
                first = failed[0]
                job.error.CopyFrom(
                    _error(
                        grpc.StatusCode.ABORTED,
                        "TECHNIQUE_FAILED",
                        f"{len(failed)} of {len(job.results)} techniques failed; "
                        f"{first.result_id}: {first.error.message}",
                    )
                )
        else:
            state = pb.OPTIMIZATION_JOB_STATE_SUCCEEDED
        _end(job, state)
        job.progress.result_id = ""
        job.progress.completed_techniques = len(job.results)
        job.progress.fraction_complete = 1.0
        job.progress.message = state_name(state).lower()
        job.progress.update_time.CopyFrom(now())
        try:
            await self._save(job)
        except Exception:  # still RUNNING in the store: the next start runs it again
            logger.exception("could not save a job's end", extra={"optimization_job": job.name})
        logger.info(
            "optimisation job ended",
            extra={"optimization_job": job.name, "state": state_name(state)},
        )
        self._publish(job)

    async def _save(self, job: pb.OptimizationJob) -> None:
        await self._workers.run(self._store.save_job, _copy(job))

    def _publish(self, job: pb.OptimizationJob) -> None:
        self._hub.publish(job.name, rpc.WatchOptimizationJobResponse(optimization_job=_copy(job)))


def _copy(job: pb.OptimizationJob) -> pb.OptimizationJob:
    copied = pb.OptimizationJob()
    copied.CopyFrom(job)
    return copied


def _error(code: grpc.StatusCode, reason: str, message: str) -> pb.OptimizationError:
    return pb.OptimizationError(code=code.value[0], reason=reason, message=message)


def _settle(
    result: pb.TechniqueResult,
    state: pb.TechniqueState.ValueType,
    error: pb.OptimizationError | None,
) -> None:
    result.state = state
    result.end_time.CopyFrom(now())
    if error is not None:
        result.error.CopyFrom(error)


def _end(job: pb.OptimizationJob, state: pb.OptimizationJobState.ValueType) -> None:
    job.state = state
    job.end_time.CopyFrom(now())
    if state == pb.OPTIMIZATION_JOB_STATE_CANCELLED:
        for result in job.results:
            if result.state not in FINAL_RESULT_STATES:
                _settle(result, pb.TECHNIQUE_STATE_CANCELLED, None)


def _cancel_stored(job: pb.OptimizationJob) -> bool:
    """The stored side of a cancel (the job is not running here)."""
    if job.state == QUEUED:
        _end(job, pb.OPTIMIZATION_JOB_STATE_CANCELLED)
        return True
    if job.state in (CANCELLING, RUNNING):
        changed = job.state == RUNNING
        job.state = CANCELLING  # between optimizers: the next start ends it CANCELLED
        return changed
    raise FailedPreconditionError(
        f"{job.name} already {state_name(job.state)}; only unfinished jobs can be cancelled",
        reason="OPTIMIZATION_JOB_ENDED",
        metadata={"name": job.name, "state": state_name(job.state)},
    )


def _export_opset(job: pb.OptimizationJob) -> int:
    """The opset of the job's ONNX_EXPORT entry, used by every implicit export."""
    for spec in job.techniques:
        if spec.HasField("onnx_export") and spec.onnx_export.opset:
            return spec.onnx_export.opset
    return DEFAULT_OPSET
