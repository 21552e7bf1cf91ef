"""Running training jobs: the queue, the worker processes, and what they report.

:class:`JobManager` owns every RUNNING job of this trainer:

- **Queue.** Jobs wait QUEUED in the store; the scheduler starts the oldest
  while fewer than ``max_running_jobs`` run (first in, first out).
- **Workers.** Each job runs in its own process
  (``python -m conveyor.services.trainer.worker <job_dir>``, usually a standby
  worker started and warmed up ahead of the job, or ``torchrun`` starting
  ``world_size`` of them: :mod:`.launcher`, :mod:`.distributed`), so a crash in
  training cannot take the server down. The manager reads the worker's progress lines
  (:mod:`.protocol`), keeps the job's latest state in memory, saves it to the
  store at every checkpoint (one per epoch) and state change, and publishes
  every event to the watch hub.
- **Cancel** sends the worker SIGTERM; it stops after the current step.
- **Outcome.** A worker that succeeded leaves its weights and result in the
  job directory; the manager registers the model in the registry (when the
  spec asks) and ends the job SUCCEEDED. Anything else ends it FAILED or
  CANCELLED, and nothing is registered.
- **Restart.** At start-up, jobs left RUNNING by a trainer that died are
  started again and resume from their last checkpoint (a job whose worker
  had already finished only registers its result). When the trainer stops,
  its workers are stopped and their jobs stay RUNNING, to resume the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shutil
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Final

import grpc
from google.protobuf import json_format

from conveyor.services.trainer import protocol
from conveyor.services.trainer.checkpoints import remove_stale_temporaries
from conveyor.services.trainer.datasets import is_builtin
from conveyor.services.trainer.launcher import WorkerLauncher, cpu_threads
from conveyor.services.trainer.registration import Registrar, RegistrationError
from conveyor.services.trainer.settings import TrainerSettings
from conveyor.services.trainer.store import (
    RUNNING,
    TrainerStore,
    now,
    state_name,
    timestamp,
)
from conveyor.services.trainer.watch import TrainingWatchHub, event
from conveyor.shared.errors import ConveyorError, FailedPreconditionError
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as pb

logger = logging.getLogger(__name__)

SCHEDULER_RETRY_S: Final = 1.0


def uploaded_datasets(spec: pb.TrainingJobSpec) -> list[str]:
    """The ids of the uploaded (not built-in) datasets ``spec`` trains on."""
    found = [spec.data.dataset, *spec.data.additional_datasets]
    ids = [name.removeprefix("datasets/") for name in found if name and not is_builtin(name)]
    return list(dict.fromkeys(ids))


def package_revision() -> str:
    """The installed package's version, the code revision when none is configured."""
    try:
        return f"conveyor=={importlib.metadata.version('conveyor')}"
    except importlib.metadata.PackageNotFoundError:
        return "conveyor (unpackaged)"


class _Running:
    """A RUNNING job this trainer supervises: its latest state and its worker."""

    def __init__(self, job: pb.TrainingJob, job_dir: Path) -> None:
        self.job = job
        self.job_dir = job_dir
        self.process: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.persist_lock = asyncio.Lock()
        self.error: pb.JobError | None = None
        self.deadline_exceeded = False
        self.detached = False
        """The trainer is stopping: leave the job RUNNING, to resume later."""

    def send_signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class JobManager:
    """Schedules, supervises, cancels and resumes this trainer's training jobs."""

    def __init__(
        self,
        settings: TrainerSettings,
        store: TrainerStore,
        workers: WorkerThreads,
        hub: TrainingWatchHub,
        registrar: Registrar,
    ) -> None:
        self._settings = settings
        self._store = store
        self._workers = workers
        self._hub = hub
        self._registrar = registrar
        self.jobs_dir = settings.service_data_dir / "jobs"
        self.code_revision = settings.code_revision or package_revision()
        self._live: dict[str, _Running] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._launcher = WorkerLauncher(
            standby=settings.standby_worker and settings.max_running_jobs > 0,
            threads=cpu_threads(settings.cpu_threads_per_job, settings.max_running_jobs),
        )
        self.state_listeners: list[Callable[[pb.TrainingJob], None]] = []
        """Told of every state change (the sweeps follow their trials)."""

    # -- reading ----------------------------------------------------------------

    def job_dir(self, name: str) -> Path:
        return self.jobs_dir / name.removeprefix("trainingJobs/")

    def live_job(self, name: str) -> pb.TrainingJob | None:
        """A copy of the running job ``name`` as it is now; None unless it runs here."""
        running = self._live.get(name)
        if running is None:
            return None
        job = pb.TrainingJob()
        job.CopyFrom(running.job)
        return job

    def overlay(self, job: pb.TrainingJob) -> pb.TrainingJob:
        """``job``, or its newer in-memory copy when it runs here."""
        return self.live_job(job.name) or job

    async def get(self, job_id: str) -> pb.TrainingJob:
        """The job as it is now (NOT_FOUND when it does not exist)."""
        live = self.live_job(f"trainingJobs/{job_id}")
        if live is not None:
            return live
        return await self._workers.run(self._store.get_job, job_id)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Resume the jobs a previous trainer left RUNNING, then start scheduling."""
        await self._workers.run(self.jobs_dir.mkdir, parents=True, exist_ok=True)
        await self._launcher.start()
        await self._recover()
        self._scheduler = asyncio.create_task(self._schedule(), name="trainer-scheduler")
        self.notify()

    def notify(self) -> None:
        """A job was queued or a slot freed: let the scheduler look."""
        self._wake.set()

    async def close(self) -> None:
        """Stop scheduling and stop the workers; their jobs stay RUNNING and
        resume from their last checkpoint when a trainer starts again."""
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        running = list(self._live.values())
        for job in running:
            job.detached = True
            job.send_signal(signal.SIGTERM)
        tasks = [job.task for job in running if job.task is not None]
        await self._launcher.close()
        if not tasks:
            return
        _, pending = await asyncio.wait(
            tasks, timeout=self._settings.worker_stop_grace.total_seconds()
        )
        for job in running:
            job.send_signal(signal.SIGKILL)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel(self, job_id: str) -> pb.TrainingJob:
        """Cancel a job: a QUEUED one ends CANCELLED now, a RUNNING one stops
        after its current step. A CANCELLED job is returned unchanged;
        SUCCEEDED and FAILED ones are FAILED_PRECONDITION."""
        name = f"trainingJobs/{job_id}"
        async with self._lock:
            running = self._live.get(name)
            if running is not None:
                if not running.job.cancel_requested:
                    running.job.cancel_requested = True
                    _touch(running.job)
                    await self._persist(running)
                    running.send_signal(signal.SIGTERM)
                    logger.info("cancelling", extra={"training_job": name})
                return self.live_job(name) or running.job
            job, changed = await self._workers.run(self._store.update_job, job_id, _cancel)
        if changed and job.state == pb.JOB_STATE_CANCELLED:
            self._announce(job)
        return job

    # -- scheduling -------------------------------------------------------------

    async def _recover(self) -> None:
        for job in await self._workers.run(self._store.jobs_in_state, RUNNING):
            job_dir = self.job_dir(job.name)
            if job.cancel_requested:
                job.state = pb.JOB_STATE_CANCELLED
                job.end_time.CopyFrom(timestamp(now()))
                _touch(job)
                await self._workers.run(self._store.save_job, job)
                continue
            finished = (job_dir / protocol.RESULT_FILE).exists()
            if not finished and (job_dir / protocol.CHECKPOINT_FILE).exists():
                job.resume_count += 1
            logger.info(
                "resuming a job the previous trainer left running",
                extra={"training_job": job.name, "trained": finished},
            )
            self._begin(job)

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._start_queued()
            except Exception:  # the store may be down: look again soon
                logger.exception("could not start queued jobs")
                await asyncio.sleep(SCHEDULER_RETRY_S)
                self.notify()

    async def _start_queued(self) -> None:
        while not self._closing and len(self._live) < self._settings.max_running_jobs:
            async with self._lock:
                job = await self._workers.run(self._store.claim_next)
                if job is None:
                    return
                self._begin(job)
            self._announce(job)

    def _begin(self, job: pb.TrainingJob) -> None:
        job.environment.code_revision = job.environment.code_revision or self.code_revision
        job.environment.world_size = job.spec.compute.distributed.world_size or 1
        running = _Running(job, self.job_dir(job.name))
        self._live[job.name] = running
        running.task = asyncio.create_task(self._supervise(running), name=f"supervise {job.name}")

    # -- supervision ------------------------------------------------------------

    async def _supervise(self, running: _Running) -> None:
        try:
            await self._run(running)
        except ConveyorError as error:
            if not running.detached:
                logger.warning(
                    "job could not run", extra={"training_job": running.job.name}, exc_info=True
                )
                failure = pb.JobError(
                    code=error.code.value[0], reason=error.reason, message=error.message
                )
                await self._finish(running, pb.JOB_STATE_FAILED, error=failure)
        except Exception:
            if not running.detached:
                logger.exception(
                    "supervising a job failed", extra={"training_job": running.job.name}
                )
                failure = pb.JobError(
                    code=grpc.StatusCode.INTERNAL.value[0],
                    reason="TRAINER_ERROR",
                    message="the trainer failed while running the job; its log has details",
                )
                await self._finish(running, pb.JOB_STATE_FAILED, error=failure)

    async def _run(self, running: _Running) -> None:
        job, job_dir = running.job, running.job_dir
        result_file = job_dir / protocol.RESULT_FILE
        if not result_file.exists():
            if job.cancel_requested:
                await self._finish(running, pb.JOB_STATE_CANCELLED)
                return
            await self._persist(running)  # the environment and resume count
            await self._workers.run(self._prepare, running)
            code = await self._run_worker(running)
            if running.detached:
                return
            if job.cancel_requested:
                await self._finish(running, pb.JOB_STATE_CANCELLED)
                return
            if running.deadline_exceeded:
                limit = job.spec.max_run_duration.ToTimedelta()
                failure = pb.JobError(
                    code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
                    reason="MAX_RUN_DURATION_EXCEEDED",
                    message=f"the job ran longer than its max_run_duration ({limit})",
                )
                await self._finish(running, pb.JOB_STATE_FAILED, error=failure)
                return
            if code != protocol.EXIT_SUCCEEDED or not result_file.exists():
                await self._finish(
                    running, pb.JOB_STATE_FAILED, error=running.error or _worker_died(code)
                )
                return
        result = pb.TrainingResult.FromString(await self._workers.run(result_file.read_bytes))
        if job.cancel_requested:
            await self._finish(running, pb.JOB_STATE_CANCELLED)
            return
        if job.spec.registration.model:
            try:
                result.model_version = await self._registrar.register(job, job_dir)
            except RegistrationError as failed:
                if not running.detached:
                    await self._finish(running, pb.JOB_STATE_FAILED, error=failed.error)
                return
        if not running.detached:
            await self._finish(running, pb.JOB_STATE_SUCCEEDED, result=result)

    def _prepare(self, running: _Running) -> None:
        """The job directory as the worker needs it (blocking)."""
        job, job_dir = running.job, running.job_dir
        job_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(job_dir)
        protocol.write_atomically(
            job_dir / protocol.JOB_FILE, job.SerializeToString(deterministic=True)
        )
        uploads = job_dir / protocol.DATASETS_DIR
        for dataset_id in uploaded_datasets(job.spec):
            uploads.mkdir(exist_ok=True)
            stored = self._store.get_upload(dataset_id)
            data = uploads / f"{dataset_id}.data"
            if not data.exists():
                _link_or_copy(self._store.blobs.path(stored.sha256), data)
            metadata = pb.Dataset()
            metadata.CopyFrom(stored.upload)
            metadata.name = stored.dataset.name
            metadata.digest = stored.dataset.digest
            protocol.write_atomically(
                uploads / f"{dataset_id}.binpb", metadata.SerializeToString(deterministic=True)
            )

    async def _run_worker(self, running: _Running) -> int:
        """Start the worker, follow its progress until it exits; its exit code."""
        job = running.job
        process = await self._launcher.launch(running.job_dir, job.environment.world_size)
        running.process = process
        logger.info("worker started", extra={"training_job": job.name, "pid": process.pid})
        if job.cancel_requested or self._closing:
            running.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        reader = asyncio.ensure_future(self._read_events(running, process.stdout))
        try:
            try:
                await asyncio.wait_for(asyncio.shield(reader), _remaining_run_time(job))
            except TimeoutError:
                running.deadline_exceeded = True
                running.send_signal(signal.SIGTERM)
                await reader
            return await process.wait()
        finally:
            reader.cancel()

    async def _read_events(self, running: _Running, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: skip it
                logger.warning("skipped an over-long worker line", extra={"job": running.job.name})
                continue
            if not line:
                return
            try:
                await self._on_event(running, protocol.decode_event(line))
            except (ValueError, json_format.ParseError):
                logger.warning("ignored a malformed worker line", extra={"job": running.job.name})

    async def _on_event(self, running: _Running, received: protocol.WorkerEvent) -> None:
        job, message, name = running.job, received.message, running.job.name
        if received.type == "started":
            environment = pb.ExecutionEnvironment()
            protocol.from_json(message.get("environment", {}), environment)
            job.environment.CopyFrom(environment)
            job.dataset_digest = str(message.get("dataset_digest", ""))
            _touch(job)
            await self._persist(running)
        elif received.type == "resumed":
            # The checkpoint's epochs: the store may lack the last of them if the
            # trainer died between the worker's checkpoint and its own save.
            restored = []
            for entry in message.get("history", []):
                summary = pb.EpochSummary()
                protocol.from_json(entry, summary)
                restored.append(summary)
            del job.history[:]
            job.history.extend(restored)
            _touch(job)
            await self._persist(running)
        elif received.type == "step":
            progress = pb.TrainingProgress()
            protocol.from_json(message, progress)
            job.progress.CopyFrom(progress)
            self._hub.publish(name, event(pb.TRAINING_JOB_EVENT_TYPE_PROGRESS, progress=progress))
        elif received.type == "epoch":
            summary, progress = pb.EpochSummary(), pb.TrainingProgress()
            protocol.from_json(message.get("epoch", {}), summary)
            protocol.from_json(message.get("progress", {}), progress)
            # A resumed job trains again the epochs after its checkpoint.
            del job.history[max(summary.epoch - 1, 0) :]
            job.history.append(summary)
            job.progress.CopyFrom(progress)
            _touch(job)
            # Saved with the checkpoint that follows every epoch: one save per epoch.
            self._hub.publish(
                name,
                event(pb.TRAINING_JOB_EVENT_TYPE_EPOCH_COMPLETED, epoch=summary, progress=progress),
            )
        elif received.type == "checkpoint":
            checkpoint = pb.CheckpointInfo()
            protocol.from_json(message, checkpoint)
            job.checkpoint.CopyFrom(checkpoint)
            _touch(job)
            await self._persist(running)
            self._hub.publish(
                name, event(pb.TRAINING_JOB_EVENT_TYPE_CHECKPOINT_SAVED, checkpoint=checkpoint)
            )
        elif received.type == "error":
            error = pb.JobError()
            protocol.from_json(message, error)
            running.error = error

    async def _persist(self, running: _Running) -> None:
        """Save the job's latest state (a failure is logged: the next save, or the
        job's end, writes it again)."""
        async with running.persist_lock:
            snapshot = pb.TrainingJob()
            snapshot.CopyFrom(running.job)
            try:
                await self._workers.run(self._store.save_job, snapshot)
            except Exception:
                logger.exception("could not save a job's progress", extra={"job": snapshot.name})

    async def _finish(
        self,
        running: _Running,
        state: pb.JobState.ValueType,
        *,
        result: pb.TrainingResult | None = None,
        error: pb.JobError | None = None,
    ) -> None:
        job = running.job
        async with self._lock:
            job.state = state
            job.end_time.CopyFrom(timestamp(now()))
            _touch(job)
            if result is not None:
                job.result.CopyFrom(result)
            if error is not None:
                job.error.CopyFrom(error)
            snapshot = pb.TrainingJob()
            snapshot.CopyFrom(job)
            async with running.persist_lock:
                try:
                    await self._workers.run(self._store.save_job, snapshot)
                except Exception:  # still RUNNING in the store: the next start ends it
                    logger.exception("could not save a job's end", extra={"job": job.name})
            self._live.pop(job.name, None)
        try:
            await self._workers.run(_release_inputs, running.job_dir)
        except OSError:
            logger.warning("could not clean a job's directory", extra={"job": job.name})
        logger.info(
            "job ended",
            extra={
                "training_job": job.name,
                "state": state_name(state),
                "reason": job.error.reason if error is not None else "",
            },
        )
        self._announce(snapshot)
        self.notify()

    def _announce(self, job: pb.TrainingJob) -> None:
        """Tell the job's watchers and the state listeners that its state changed."""
        self._hub.publish(job.name, event(pb.TRAINING_JOB_EVENT_TYPE_STATE_CHANGED, job=job))
        for listener in self.state_listeners:
            listener(job)


def _cancel(job: pb.TrainingJob) -> bool:
    """The stored side of a cancel (the job is not running in this trainer)."""
    if job.state == pb.JOB_STATE_QUEUED:
        job.state = pb.JOB_STATE_CANCELLED
        job.cancel_requested = True
        job.end_time.CopyFrom(timestamp(now()))
        return True
    if job.state == pb.JOB_STATE_CANCELLED:
        return False
    if job.state == pb.JOB_STATE_RUNNING:
        # Between trainers: the next start-up ends it CANCELLED instead of resuming.
        changed = not job.cancel_requested
        job.cancel_requested = True
        return changed
    raise FailedPreconditionError(
        f"{job.name} already {state_name(job.state)}; only unfinished jobs can be cancelled",
        reason="TRAINING_JOB_ENDED",
        metadata={"name": job.name, "state": state_name(job.state)},
    )


def _touch(job: pb.TrainingJob) -> None:
    job.update_time.CopyFrom(timestamp(now()))


def _remaining_run_time(job: pb.TrainingJob) -> float | None:
    if not job.spec.HasField("max_run_duration"):
        return None
    limit = job.spec.max_run_duration.ToTimedelta()
    spent = job.progress.elapsed.ToTimedelta() if job.HasField("progress") else timedelta(0)
    return max((limit - spent).total_seconds(), 0.0)


def _worker_died(code: int) -> pb.JobError:
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return pb.JobError(
        code=grpc.StatusCode.INTERNAL.value[0],
        reason="WORKER_DIED",
        message=f"the training process {how} without reporting an error",
    )


def _release_inputs(job_dir: Path) -> None:
    """What only a running job needs: its checkpoint (for resuming) and its
    links to uploaded data. The weights, results and log stay."""
    (job_dir / protocol.CHECKPOINT_FILE).unlink(missing_ok=True)
    shutil.rmtree(job_dir / protocol.DATASETS_DIR, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # another file system: copy
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)
