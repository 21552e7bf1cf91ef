"""Distributed data-parallel training: the launcher's command, the process group.

A job whose spec asks for ``world_size`` W > 1 runs as W worker processes,
one per rank, started by PyTorch's launcher (``torchrun``, run here as
``python -m torch.distributed.run`` so that no ``torchrun`` script has to be on
``PATH``): :func:`torchrun_command` builds its command line for one machine;
``deploy/k8s/base/trainer-ddp-job.yaml`` runs the same workers across machines.

Each worker calls :func:`init_from_environment`, which reads what the launcher
put in its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: Gloo on the CPU,
NCCL on CUDA (each rank on the GPU of its ``LOCAL_RANK``). Then
:func:`conveyor.services.trainer.training.train` sees the initialised group and
trains with ``DistributedDataParallel``; :func:`shutdown` leaves the group.

The small collectives the training loop needs (sums of metrics, "does any rank
want to stop", rank 0's decisions) are here too, so that the loop reads the
same with and without a group.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from conveyor.services.trainer.specs import MAX_WORLD_SIZE
from conveyor.shared.errors import FailedPreconditionError
from conveyor.trainer.v1 import resources_pb2 as pb

WORKER_MODULE = "conveyor.services.trainer.worker"
"""The module every rank runs (``python -m``), given the job directory."""

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for the other ranks before failing. Rank 0
validates and writes the checkpoint while the others wait at the next
collective, so this bounds an epoch's validation plus checkpoint time."""

LAUNCH_REQUIRED = "DISTRIBUTED_LAUNCH_REQUIRED"
"""The reason of errors about a process the launcher did not start properly."""

BACKEND_NAMES: Mapping[pb.DistributedBackend.ValueType, str] = {
    pb.DISTRIBUTED_BACKEND_GLOO: "gloo",
    pb.DISTRIBUTED_BACKEND_NCCL: "nccl",
}

_T = TypeVar("_T")


class ProcessRank(NamedTuple):
    """Where this process stands in the job: ``(rank, world_size, local_rank)``."""

    rank: int
    """0 to ``world_size - 1``; rank 0 writes checkpoints and reports progress."""
    world_size: int
    local_rank: int
    """The rank among the processes on this machine: the GPU this rank uses."""


SINGLE_PROCESS = ProcessRank(rank=0, world_size=1, local_rank=0)


def torchrun_command(
    job_dir: Path | str,
    world_size: int,
    *,
    python: str = sys.executable,
    module: str = WORKER_MODULE,
) -> list[str]:
    """The command that runs ``world_size`` ranks of ``module`` on this machine.

    ``[python, -m, torch.distributed.run, --standalone, --nproc_per_node=W,
    -m, module, job_dir]``: ``--standalone`` rendezvous on a free local port,
    so concurrent jobs never collide. The launcher sets each rank's
    environment (see :func:`init_from_environment`), sets
    ``OMP_NUM_THREADS=1`` in the workers unless it is set already, passes
    its stdout and stderr through to every rank, forwards SIGTERM to every
    rank, and stops all ranks when one fails.
    """
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size must be from 1 to {MAX_WORLD_SIZE}, not {world_size}")
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world_size}",
        "-m",
        module,
        str(job_dir),
    ]


def backend_name(
    backend: pb.DistributedBackend.ValueType = pb.DISTRIBUTED_BACKEND_UNSPECIFIED,
    device: pb.Device.ValueType = pb.DEVICE_AUTO,
    *,
    cuda_available: bool | None = None,
) -> str:
    """``"gloo"`` or ``"nccl"``: the spec's backend with its default applied.

    Unspecified resolves as spec validation does: NCCL when the device
    resolves to CUDA (CUDA, or AUTO with a GPU present), Gloo otherwise.
    FAILED_PRECONDITION (reason ``NO_GPU``) for NCCL, or the CUDA device,
    on a machine without a GPU.
    """
    has_gpu = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device == pb.DEVICE_CUDA and not has_gpu:
        raise FailedPreconditionError("CUDA was asked for and no GPU is present", reason="NO_GPU")
    if backend == pb.DISTRIBUTED_BACKEND_UNSPECIFIED:
        on_cuda = device == pb.DEVICE_CUDA or (device != pb.DEVICE_CPU and has_gpu)
        backend = pb.DISTRIBUTED_BACKEND_NCCL if on_cuda else pb.DISTRIBUTED_BACKEND_GLOO
    if backend not in BACKEND_NAMES:
        raise FailedPreconditionError(
            f"unknown distributed backend {backend}", reason="UNKNOWN_BACKEND"
        )
    if backend == pb.DISTRIBUTED_BACKEND_NCCL and not has_gpu:
        raise FailedPreconditionError(
            "the NCCL backend needs a GPU and none is present", reason="NO_GPU"
        )
    return BACKEND_NAMES[backend]


def read_environment(environ: Mapping[str, str] | None = None) -> ProcessRank:
    """This process's rank from the launcher's variables; no group is joined.

    Without ``WORLD_SIZE`` (or with 1) the process is the only one:
    ``(0, 1, 0)``. Otherwise ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` must be set and consistent (FAILED_PRECONDITION, reason
    ``DISTRIBUTED_LAUNCH_REQUIRED``, naming the variable).
    """
    env = os.environ if environ is None else environ
    world_size = _integer(env, "WORLD_SIZE", default=1, minimum=1, maximum=MAX_WORLD_SIZE)
    if world_size == 1:
        return SINGLE_PROCESS
    rank = _integer(env, "RANK", minimum=0, maximum=world_size - 1)
    local_rank = _integer(env, "LOCAL_RANK", minimum=0, maximum=world_size - 1)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name, "").strip():
            raise FailedPreconditionError(
                f"{name} is not set: start the workers with torchrun", reason=LAUNCH_REQUIRED
            )
    _integer(env, "MASTER_PORT", minimum=1, maximum=65_535)
    return ProcessRank(rank=rank, world_size=world_size, local_rank=local_rank)


def init_from_environment(
    backend: pb.DistributedBackend.ValueType = pb.DISTRIBUTED_BACKEND_UNSPECIFIED,
    device: pb.Device.ValueType = pb.DEVICE_AUTO,
    *,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> ProcessRank:
    """Join the job's process group as the launcher's variables say.

    Pass the spec's ``compute.distributed.backend`` and ``compute.device``;
    the backend resolves as :func:`backend_name` says. For NCCL the rank's
    GPU (``cuda:LOCAL_RANK``) becomes the current device first. A process
    alone (no ``WORLD_SIZE``, or 1) joins nothing and gets ``(0, 1, 0)``.
    Returns ``(rank, world_size, local_rank)``; blocks until every rank has
    joined or ``timeout`` passes. Leave with :func:`shutdown`.
    """
    place = read_environment()
    if place.world_size == 1:
        return place
    name = backend_name(backend, device)
    if device != pb.DEVICE_CPU and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if name == "nccl" and place.local_rank >= gpus:
            # NCCL refuses two ranks on one GPU.
            raise FailedPreconditionError(
                f"local rank {place.local_rank} has no GPU of its own ({gpus} present): "
                "run at most one rank per GPU on a machine",
                reason="NOT_ENOUGH_GPUS",
            )
        torch.cuda.set_device(place.local_rank % gpus)
    dist.init_process_group(
        backend=name,
        init_method="env://",
        rank=place.rank,
        world_size=place.world_size,
        timeout=timeout,
    )
    return place


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(
    backend: pb.DistributedBackend.ValueType = pb.DISTRIBUTED_BACKEND_UNSPECIFIED,
    device: pb.Device.ValueType = pb.DEVICE_AUTO,
    *,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Iterator[ProcessRank]:
    """:func:`init_from_environment` on entry, :func:`shutdown` on exit."""
    place = init_from_environment(backend, device, timeout=timeout)
    try:
        yield place
    finally:
        shutdown()


def current_group() -> ProcessRank | None:
    """The initialised group this process is in, or None when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return ProcessRank(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank)


def group_backend() -> str:
    """The initialised group's backend name (``"gloo"``, ``"nccl"``)."""
    return str(dist.get_backend())


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The element-wise sums of ``values`` over every rank (float64, one collective)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(value) for value in tensor.tolist()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (one collective)."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast_from_rank_zero(value: _T) -> _T:
    """Rank 0's ``value`` on every rank (pickled among the job's own ranks)."""
    holder: list[object] = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]  # type: ignore[return-value]


def _integer(
    env: Mapping[str, str], name: str, *, minimum: int, maximum: int, default: int | None = None
) -> int:
    raw = env.get(name, "").strip()
    if not raw and default is not None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if not minimum <= value <= maximum:
        shown = repr(raw) if raw else "not set"
        raise FailedPreconditionError(
            f"{name} must be an integer from {minimum} to {maximum} ({shown}): "
            "start the workers with torchrun",
            reason=LAUNCH_REQUIRED,
        )
    return value
