"""One rank of a distributed training job, for ``test_distributed.py``.

Run by the real launcher, as the trainer's worker is::

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m tests.trainer.ddp_driver JOB_DIR

It reads ``JOB_DIR/spec.binpb`` (a ``TrainingJobSpec``), ``JOB_DIR/data.npz``
(the dataset's arrays and names: the test hands over what it loaded, which
spares every rank scikit-learn's import) and ``JOB_DIR/options.json``
(``pace``: seconds rank 0 waits after each step, which paces every rank),
joins the process group with :func:`init_from_environment`, writes its pid to
``JOB_DIR/rank{R}.pid`` once SIGTERM is handled (the handler asks
``should_cancel`` to say yes), trains with the checkpoint at
``JOB_DIR/checkpoint.pt``, and writes ``JOB_DIR/rank{R}.pt``: the weights,
the global step, whether it was cancelled, how many times ``should_cancel``
was asked in all, and how many times before the SIGTERM arrived. Rank 0
prints one JSON line per step, epoch and checkpoint on stdout (as the worker
reports progress); the other ranks print nothing there. Exits 3 when
cancelled.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import numpy as np
import torch

from conveyor.services.trainer import distributed
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.services.trainer.training import TrainingCancelled, TrainingObserver, train
from conveyor.trainer.v1 import resources_pb2 as pb

CANCELLED_EXIT_CODE = 3


class Cancel:
    """``should_cancel``: counts its calls; yes once a SIGTERM arrived."""

    def __init__(self) -> None:
        self.checks = 0
        self.signal_check = -1

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_check < 0:
            self.signal_check = self.checks

    def __call__(self) -> bool:
        self.checks += 1
        return self.signal_check >= 0


class Printer(TrainingObserver):
    """Rank 0's progress, one JSON object per line on stdout."""

    def __init__(self, pace: float) -> None:
        self.pace = pace

    def _emit(self, kind: str, **fields: object) -> None:
        print(json.dumps({"type": kind, "rank": 0, **fields}), flush=True)

    def on_step(self, progress: pb.TrainingProgress) -> None:
        self._emit("step", global_step=progress.global_step, loss=progress.loss)
        time.sleep(self.pace)

    def on_epoch(self, summary: pb.EpochSummary, progress: pb.TrainingProgress) -> None:
        self._emit("epoch", epoch=summary.epoch, train_loss=summary.train_loss)

    def on_checkpoint(self, checkpoint: pb.CheckpointInfo) -> None:
        self._emit("checkpoint", epoch=checkpoint.epoch, sha256=checkpoint.sha256)


def load_dataset(path: Path, name: str) -> LoadedDataset:
    with np.load(path) as arrays:
        return LoadedDataset.create(
            name=name,
            features=arrays["features"],
            labels=arrays["labels"],
            feature_names=[str(n) for n in arrays["feature_names"]],
            class_names=[str(n) for n in arrays["class_names"]],
            modality=pb.DATA_MODALITY_TABULAR,
            source=pb.DATASET_SOURCE_BUILTIN,
        )


def main(job_dir: Path) -> int:
    spec = pb.TrainingJobSpec.FromString((job_dir / "spec.binpb").read_bytes())
    options = json.loads((job_dir / "options.json").read_text())
    data = load_dataset(job_dir / "data.npz", spec.data.dataset)
    compute = spec.compute
    place = distributed.init_from_environment(compute.distributed.backend, compute.device)
    cancel = Cancel()
    signal.signal(signal.SIGTERM, cancel.on_sigterm)
    (job_dir / f"rank{place.rank}.pid").write_text(str(os.getpid()))
    cancelled = False
    try:
        outcome = train(
            spec,
            data,
            checkpoint_path=job_dir / "checkpoint.pt",
            observer=Printer(options["pace"]) if place.rank == 0 else None,
            should_cancel=cancel,
        )
        model, global_step = outcome.model, outcome.global_step
        history = [summary.train_loss for summary in outcome.history]
    except TrainingCancelled as stopped:
        cancelled, model, global_step, history = True, None, stopped.global_step, []
    finally:
        distributed.shutdown()
    torch.save(
        {
            "world_size": place.world_size,
            "cancelled": cancelled,
            "global_step": global_step,
            "checks": cancel.checks,
            "signal_check": cancel.signal_check,
            "history": history,
            "weights": model.state_dict() if model is not None else {},
        },
        job_dir / f"rank{place.rank}.pt",
    )
    return CANCELLED_EXIT_CODE if cancelled else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
