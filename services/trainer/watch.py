"""WatchTrainingJob and WatchSweepJob streams, on the shared
:class:`~conveyor.shared.watch.WatchHub`.

The job and sweep managers publish every event of a job to its hub as it
happens. A training job's step progress is coalesced per watcher (sent at most
once per the watcher's ``progress_interval``); every other event, and every
sweep event, is delivered in order.
"""

from __future__ import annotations

from datetime import UTC, datetime

from conveyor.services.trainer.store import TERMINAL_STATES, timestamp
from conveyor.shared.watch import WatchHub
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc

PROGRESS = pb.TRAINING_JOB_EVENT_TYPE_PROGRESS
STATE_CHANGED = pb.TRAINING_JOB_EVENT_TYPE_STATE_CHANGED


def event(
    event_type: pb.TrainingJobEventType.ValueType,
    *,
    job: pb.TrainingJob | None = None,
    progress: pb.TrainingProgress | None = None,
    epoch: pb.EpochSummary | None = None,
    checkpoint: pb.CheckpointInfo | None = None,
) -> rpc.WatchTrainingJobResponse:
    """A watch event stamped now."""
    response = rpc.WatchTrainingJobResponse(type=event_type)
    if job is not None:
        response.training_job.CopyFrom(job)
    if progress is not None:
        response.progress.CopyFrom(progress)
    if epoch is not None:
        response.epoch.CopyFrom(epoch)
    if checkpoint is not None:
        response.checkpoint.CopyFrom(checkpoint)
    response.event_time.CopyFrom(timestamp(datetime.now(UTC)))
    return response


def sweep_event(
    event_type: pb.SweepJobEventType.ValueType,
    *,
    sweep: pb.SweepJob | None = None,
    trial: pb.SweepTrial | None = None,
) -> rpc.WatchSweepJobResponse:
    """A sweep watch event stamped now."""
    response = rpc.WatchSweepJobResponse(type=event_type)
    if sweep is not None:
        response.sweep_job.CopyFrom(sweep)
    if trial is not None:
        response.trial.CopyFrom(trial)
    response.event_time.CopyFrom(timestamp(datetime.now(UTC)))
    return response


def is_terminal(response: rpc.WatchTrainingJobResponse) -> bool:
    """Whether ``response`` moves its job to a terminal state (the stream's last)."""
    return response.type == STATE_CHANGED and response.training_job.state in TERMINAL_STATES


def _ends_sweep(response: rpc.WatchSweepJobResponse) -> bool:
    return (
        response.type == pb.SWEEP_JOB_EVENT_TYPE_STATE_CHANGED
        and response.sweep_job.state in TERMINAL_STATES
    )


def _is_progress(response: rpc.WatchTrainingJobResponse) -> bool:
    return response.type == PROGRESS


class TrainingWatchHub(WatchHub[pb.TrainingJob, rpc.WatchTrainingJobResponse]):
    """Training job streams: progress coalesced per watcher."""

    def __init__(self) -> None:
        super().__init__(
            snapshot_event=lambda job: event(pb.TRAINING_JOB_EVENT_TYPE_SNAPSHOT, job=job),
            is_finished=lambda job: job.state in TERMINAL_STATES,
            ends_stream=is_terminal,
            coalesced=_is_progress,
        )


class SweepWatchHub(WatchHub[pb.SweepJob, rpc.WatchSweepJobResponse]):
    """Sweep streams: every event delivered."""

    def __init__(self) -> None:
        super().__init__(
            snapshot_event=lambda sweep: sweep_event(pb.SWEEP_JOB_EVENT_TYPE_SNAPSHOT, sweep=sweep),
            is_finished=lambda sweep: sweep.state in TERMINAL_STATES,
            ends_stream=_ends_sweep,
            coalesced=lambda response: False,
        )
