"""Distributed data-parallel training: real ranks, a real launcher, Gloo on the CPU.

The end-to-end tests start ``python -m torch.distributed.run --standalone
--nproc_per_node=2`` (the command :func:`torchrun_command` builds, here with
the test driver ``tests/trainer/ddp_driver.py`` as the module) on
breast-cancer with a small MLP:

1. SIGTERM to rank 1 alone, after the first epoch's checkpoint: both ranks
   stop before the same step, rank 1 within one step of the signal.
2. The same job directory launched again resumes from rank 0's checkpoint and
   finishes; its weights match single-process training of the same spec.

Why the weights are close and not bit-identical: each rank computes its
shard's gradient and DDP sums the two over Gloo, where one process sums the
whole batch in one reduction; float32 addition is not associative, so the
gradients differ in their last bits (about 1e-7 relative), and Adam carries
such differences forward over the run. The ranks also run one thread each
and this process two, which can change how matrix products block their sums.
Measured here, the largest difference after 5 epochs (55 steps) is 3e-8.
The tolerance, 1e-4, leaves room for other CPUs' kernels and is still far
below what a mistake does: averaging the shards' mean losses instead of
weighting by the global batch, which only changes the trailing batch of 21
(sharded 11 + 10), already moves a weight by 2e-3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.run import config_from_args, get_args_parser

from conveyor.services.trainer import datasets, distributed
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.services.trainer.evaluation import evaluate
from conveyor.services.trainer.training import _batch_bounds, train
from conveyor.shared.errors import FailedPreconditionError
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import make_spec

REPO = Path(__file__).resolve().parents[2]
DRIVER = "tests.trainer.ddp_driver"
WEIGHT_TOLERANCE = 1e-4
"""Largest absolute difference allowed between DDP and single-process weights
(module docstring)."""
LAUNCH_TIMEOUT = 120.0


def _spec(world_size: int) -> pb.TrainingJobSpec:
    spec = make_spec(
        datasets.BREAST_CANCER,
        "mlp",
        {"hidden_sizes": [32, 16]},
        epochs=5,
        batch_size=32,
        learning_rate=1e-3,
        seed=1,
        split_seed=7,
        early_stopping=pb.EarlyStoppingSpec(metric="loss", patience=3),
    )
    # 341 training rows: 10 full batches of 32 and a trailing 21, sharded 11 + 10.
    spec.data.train_fraction = 0.6
    spec.data.validation_fraction = 0.2
    spec.data.test_fraction = 0.2
    spec.compute.device = pb.DEVICE_CPU
    if world_size > 1:
        spec.compute.distributed.world_size = world_size
    return spec


@pytest.fixture(scope="module")
def breast_cancer() -> LoadedDataset:
    return datasets.load_builtin(datasets.BREAST_CANCER)


class Launch:
    """One run of the launcher over a job directory."""

    def __init__(self, job_dir: Path, *, pace: float = 0.0) -> None:
        (job_dir / "options.json").write_text(json.dumps({"pace": pace}))
        for stale in job_dir.glob("rank*"):
            stale.unlink()
        command = distributed.torchrun_command(job_dir, 2, module=DRIVER)
        self.job_dir = job_dir
        with (job_dir / "launcher.log").open("w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )

    def events(self) -> Iterator[dict[str, Any]]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            yield json.loads(line)

    def finish(self) -> tuple[int, list[dict[str, Any]]]:
        """The launcher's exit code and each rank's report."""
        try:
            self.process.communicate(timeout=LAUNCH_TIMEOUT)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        reports = []
        for rank in range(2):
            path = self.job_dir / f"rank{rank}.pt"
            log = (self.job_dir / "launcher.log").read_text()
            assert path.exists(), f"rank {rank} wrote no report; the launcher's stderr:\n{log}"
            reports.append(torch.load(path, weights_only=True))
        return self.process.returncode, reports


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory, breast_cancer: LoadedDataset) -> Path:
    directory = tmp_path_factory.mktemp("ddp-job")
    (directory / "spec.binpb").write_bytes(_spec(2).SerializeToString())
    np.savez(
        directory / "data.npz",
        features=breast_cancer.features,
        labels=breast_cancer.labels,
        feature_names=np.array(breast_cancer.feature_names),
        class_names=np.array(breast_cancer.class_names),
    )
    return directory


@pytest.fixture(scope="module")
def cancelled(job_dir: Path) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """Launch, SIGTERM rank 1 alone once epoch 1's checkpoint is written."""
    launch = Launch(job_dir, pace=0.05)
    events = []
    for event in launch.events():
        events.append(event)
        if event["type"] == "checkpoint":
            os.kill(int((job_dir / "rank1.pid").read_text()), signal.SIGTERM)
            break
    events += launch.events()
    code, reports = launch.finish()
    return code, reports, events


@pytest.mark.slow
def test_a_cancel_on_one_rank_stops_every_rank_within_a_step(
    cancelled: tuple[int, list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    code, (rank0, rank1), events = cancelled
    assert code != 0  # the launcher reports the ranks' exit code 3 as a failure
    assert rank0["cancelled"]
    assert rank1["cancelled"]
    # Both stopped before the same step...
    assert rank0["global_step"] == rank1["global_step"] >= 11
    assert rank0["checks"] == rank1["checks"]
    # ...and rank 1, the one signalled, at its first question after the signal.
    assert rank1["signal_check"] >= 0
    assert rank1["checks"] <= rank1["signal_check"] + 1
    assert rank0["signal_check"] == -1
    steps = [e["global_step"] for e in events if e["type"] == "step"]
    assert steps == list(range(1, rank0["global_step"] + 1))
    assert next(e["epoch"] for e in events if e["type"] == "checkpoint") == 1


@pytest.mark.slow
def test_resumed_ddp_matches_single_process_training(
    job_dir: Path,
    breast_cancer: LoadedDataset,
    cancelled: tuple[int, list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    _, _, cancelled_events = cancelled
    resumed_epoch = max(e["epoch"] for e in cancelled_events if e["type"] == "checkpoint")
    launch = Launch(job_dir)
    events = list(launch.events())
    code, (rank0, rank1) = launch.finish()
    assert code == 0
    assert not rank0["cancelled"]
    assert not rank1["cancelled"]
    # It resumed from rank 0's last checkpoint: no step before it ran again.
    steps = [e["global_step"] for e in events if e["type"] == "step"]
    assert steps == list(range(11 * resumed_epoch + 1, 56))
    # Every rank ends with the same weights, bit for bit.
    assert rank0["weights"].keys() == rank1["weights"].keys()
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])

    single = train(_spec(1), breast_cancer)
    reference = single.model.state_dict()
    assert rank0["weights"].keys() == reference.keys()
    difference = max(float((rank0["weights"][k] - reference[k]).abs().max()) for k in reference)
    assert difference <= WEIGHT_TOLERANCE
    assert rank0["global_step"] == single.global_step == 55
    assert rank0["history"] == pytest.approx([e.train_loss for e in single.history], abs=1e-5)

    single.model.load_state_dict(rank0["weights"])
    ddp_test = evaluate(single.model, single.splits.test, breast_cancer.class_names)
    single.model.load_state_dict(reference)
    single_test = evaluate(single.model, single.splits.test, breast_cancer.class_names)
    assert abs(ddp_test.metrics["accuracy"] - single_test.metrics["accuracy"]) <= 0.01
    assert single_test.metrics["accuracy"] >= 0.9


def test_torchrun_command_runs_the_worker_module(monkeypatch: pytest.MonkeyPatch) -> None:
    command = distributed.torchrun_command(Path("/data/trainer/jobs/j1"), 4, python="/py")
    assert command == [
        "/py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "conveyor.services.trainer.worker",
        "/data/trainer/jobs/j1",
    ]
    # PyTorch's launcher reads it as 4 local ranks of the worker module.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the parser would set it otherwise
    config, _, arguments = config_from_args(get_args_parser().parse_args(command[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 4)
    assert arguments == ["-u", "-m", distributed.WORKER_MODULE, "/data/trainer/jobs/j1"]
    assert distributed.torchrun_command("j", 2)[0] == sys.executable
    with pytest.raises(ValueError, match="world_size"):
        distributed.torchrun_command("j", 0)


def test_the_launcher_environment_is_read_and_checked() -> None:
    assert distributed.read_environment({}) == (0, 1, 0)
    assert distributed.read_environment({"WORLD_SIZE": "1"}) == distributed.SINGLE_PROCESS
    launched = {
        "WORLD_SIZE": "4",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "job-0.job",
        "MASTER_PORT": "29500",
    }
    rank, world_size, local_rank = distributed.read_environment(launched)
    assert (rank, world_size, local_rank) == (3, 4, 1)
    for name, value in [
        ("RANK", "4"),
        ("RANK", ""),
        ("LOCAL_RANK", "x"),
        ("MASTER_ADDR", ""),
        ("MASTER_PORT", "0"),
        ("WORLD_SIZE", "65"),
    ]:
        with pytest.raises(FailedPreconditionError) as caught:
            distributed.read_environment({**launched, name: value})
        assert caught.value.reason == "DISTRIBUTED_LAUNCH_REQUIRED"
        assert name in str(caught.value)


def test_backends_resolve_like_the_spec_and_nccl_needs_a_gpu() -> None:
    name = distributed.backend_name
    assert name(pb.DISTRIBUTED_BACKEND_UNSPECIFIED, pb.DEVICE_CPU, cuda_available=True) == "gloo"
    assert name(pb.DISTRIBUTED_BACKEND_UNSPECIFIED, pb.DEVICE_AUTO, cuda_available=True) == "nccl"
    assert name(pb.DISTRIBUTED_BACKEND_UNSPECIFIED, pb.DEVICE_AUTO, cuda_available=False) == "gloo"
    assert name(pb.DISTRIBUTED_BACKEND_GLOO, pb.DEVICE_CUDA, cuda_available=True) == "gloo"
    for backend, device in [
        (pb.DISTRIBUTED_BACKEND_NCCL, pb.DEVICE_AUTO),
        (pb.DISTRIBUTED_BACKEND_UNSPECIFIED, pb.DEVICE_CUDA),
    ]:
        with pytest.raises(FailedPreconditionError) as caught:
            name(backend, device, cuda_available=False)
        assert caught.value.reason == "NO_GPU"


def test_train_checks_the_process_group_against_the_spec(
    small_tabular: LoadedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec(epochs=1, batch_size=32)
    spec.compute.device = pb.DEVICE_CPU
    spec.compute.distributed.world_size = 2
    with pytest.raises(FailedPreconditionError) as caught:
        train(spec, small_tabular)
    assert caught.value.reason == "DISTRIBUTED_LAUNCH_REQUIRED"
    # Alone, a process joins nothing.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_environment() == distributed.SINGLE_PROCESS
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.current_group() == (0, 1, 0)
        with pytest.raises(FailedPreconditionError) as caught:
            train(spec, small_tabular)
        assert caught.value.reason == "WORLD_SIZE_MISMATCH"
        spec.compute.distributed.world_size = 1
        assert train(spec, small_tabular).global_step > 0
    finally:
        distributed.shutdown()
    assert distributed.current_group() is None


def test_trailing_batches_give_every_rank_an_example() -> None:
    assert _batch_bounds(341, 32)[-1] == (320, 341)
    assert _batch_bounds(321, 32)[-1] == (288, 320)  # one example: dropped, as ever
    assert _batch_bounds(322, 32, smallest=2)[-1] == (320, 322)
    assert _batch_bounds(322, 32, smallest=4)[-1] == (288, 320)  # 4 ranks: dropped
    assert _batch_bounds(10, 32, smallest=64) == [(0, 10)]  # never the only batch
