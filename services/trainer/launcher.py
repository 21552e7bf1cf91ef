"""Starting the worker processes of training jobs, one ahead of time.

A fresh worker spends 4 to 6 s importing PyTorch, scikit-learn and the trainer's
modules before its first step (``bench/README.md``). :class:`WorkerLauncher`
keeps one **standby** worker (``python -m conveyor.services.trainer.worker
--standby``) started and warming up; a single-process job takes it, by
writing its job directory to the worker's stdin, and a new standby starts at
once for the next job. Distributed jobs start through ``torchrun`` as before.

Whichever way a worker starts, the job manager gets the same thing: a child
process of the trainer whose stdout carries the job's progress lines, whose
log is the job's ``worker.log``, and which SIGTERM cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from conveyor.services.trainer import protocol
from conveyor.services.trainer.distributed import WORKER_MODULE, torchrun_command

logger = logging.getLogger(__name__)


def worker_command(job_dir: Path, world_size: int) -> list[str]:
    """The command that runs the job in ``job_dir``: one worker process, or
    ``torchrun`` starting ``world_size`` of them on this machine."""
    if world_size <= 1:
        return [sys.executable, "-m", WORKER_MODULE, str(job_dir)]
    return torchrun_command(job_dir, world_size)


def standby_command() -> list[str]:
    """A worker that warms up, then reads its job directory from stdin."""
    return [sys.executable, "-m", WORKER_MODULE, protocol.STANDBY_FLAG]


def cpu_threads(configured: int, max_running_jobs: int, cores: int | None = None) -> int:
    """PyTorch's CPU threads for one single-process job: ``configured``, or
    the cores shared evenly among the jobs that may run at once."""
    if configured:
        return configured
    available = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, available // max(max_running_jobs, 1))


def worker_environment(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a single-process worker: ``OMP_NUM_THREADS`` set to
    ``threads`` unless the trainer's own environment sets it."""
    environment = dict(os.environ if base is None else base)
    environment.setdefault("OMP_NUM_THREADS", str(threads))
    return environment


class WorkerLauncher:
    """Starts the worker processes of jobs, keeping a warm standby for the
    next single-process job when asked to."""

    def __init__(self, *, standby: bool, threads: int) -> None:
        self._standby_enabled = standby
        self._environment = worker_environment(threads)
        # torchrun gives each rank one thread unless told otherwise.
        self._distributed_environment = dict(os.environ)
        self._standby: asyncio.subprocess.Process | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the standby worker (when enabled), so the first job finds it warm."""
        if self._standby_enabled and self._standby is None and not self._closed:
            self._standby = await self._spawn_standby()

    async def launch(self, job_dir: Path, world_size: int) -> asyncio.subprocess.Process:
        """A running worker for the job in ``job_dir``."""
        if world_size > 1:
            command = worker_command(job_dir, world_size)
            return await self._spawn(command, job_dir, self._distributed_environment)
        if not self._standby_enabled or self._closed:
            return await self._spawn(worker_command(job_dir, 1), job_dir, self._environment)
        process = self._standby
        self._standby = None
        if process is None or process.returncode is not None:
            process = await self._spawn_standby()
        assert process.stdin is not None  # started with a pipe
        try:
            process.stdin.write(f"{job_dir}\n".encode())
            await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            # It died before it could take the job: its exit fails the job.
            logger.warning("the standby worker died before taking a job", exc_info=True)
        self._standby = await self._spawn_standby()
        return process

    async def close(self) -> None:
        """Stop the standby worker."""
        self._closed = True
        process, self._standby = self._standby, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def _spawn_standby(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *standby_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Until it takes a job it has nothing to say but failures to start.
            stderr=None,
            env=self._environment,
            start_new_session=True,
            limit=protocol.MAX_EVENT_LINE_BYTES,
        )

    async def _spawn(
        self, command: list[str], job_dir: Path, environment: dict[str, str]
    ) -> asyncio.subprocess.Process:
        with (job_dir / protocol.LOG_FILE).open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=environment,
                start_new_session=True,
                limit=protocol.MAX_EVENT_LINE_BYTES,
            )
