"""Worker processes as the job manager starts them: the standby worker warms up
ahead of time, takes the next job through its stdin, reports on stdout and
logs to the job's log like a worker started for the job, and a new standby
takes its place; the threads each job gets; a standby told nothing exits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conveyor.services.trainer import protocol
from conveyor.services.trainer.launcher import (
    WorkerLauncher,
    cpu_threads,
    standby_command,
    worker_command,
    worker_environment,
)
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import make_spec

WORKER_TIMEOUT_S = 120


def test_each_job_gets_an_even_share_of_the_cores() -> None:
    assert cpu_threads(0, max_running_jobs=1, cores=8) == 8
    assert cpu_threads(0, max_running_jobs=3, cores=8) == 2
    assert cpu_threads(0, max_running_jobs=4, cores=2) == 1
    assert cpu_threads(0, max_running_jobs=0, cores=2) == 2
    assert cpu_threads(3, max_running_jobs=4, cores=2) == 3


def test_the_trainers_own_thread_setting_wins() -> None:
    assert worker_environment(4, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "4"}
    assert worker_environment(4, {"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"


def test_commands() -> None:
    assert worker_command(Path("/jobs/a"), 1)[1:] == [
        "-m",
        "conveyor.services.trainer.worker",
        "/jobs/a",
    ]
    assert "torch.distributed.run" in worker_command(Path("/jobs/a"), 2)
    assert standby_command()[-1] == protocol.STANDBY_FLAG


def job_directory(tmp_path: Path, name: str) -> Path:
    job_dir = tmp_path / name
    job_dir.mkdir()
    spec = make_spec("datasets/breast-cancer", args={"hidden_sizes": [8]}, epochs=2)
    spec.compute.device = pb.DEVICE_CPU
    job = pb.TrainingJob(name=f"trainingJobs/{name}", spec=spec, state=pb.JOB_STATE_RUNNING)
    protocol.write_atomically(job_dir / protocol.JOB_FILE, job.SerializeToString())
    return job_dir


async def run_to_end(process: asyncio.subprocess.Process) -> list[str]:
    """The types of the progress lines a worker writes, once it has exited."""
    assert process.stdout is not None
    lines = await asyncio.wait_for(process.stdout.read(), WORKER_TIMEOUT_S)
    await asyncio.wait_for(process.wait(), WORKER_TIMEOUT_S)
    return [json.loads(line)["type"] for line in lines.splitlines()]


@pytest.mark.timeout(WORKER_TIMEOUT_S * 2)
async def test_the_standby_worker_takes_the_next_job_and_another_takes_its_place(
    tmp_path: Path,
) -> None:
    launcher = WorkerLauncher(standby=True, threads=1)
    await launcher.start()
    try:
        standby = launcher._standby
        assert standby is not None
        job_dir = job_directory(tmp_path, "first")
        process = await launcher.launch(job_dir, 1)
        assert process is standby  # the warm one took the job
        assert launcher._standby is not None
        assert launcher._standby is not process
        types = await run_to_end(process)
        assert process.returncode == protocol.EXIT_SUCCEEDED
        assert types[0] == "started"
        assert types.count("epoch") == 2
        assert types[-1] == "result"
        assert (job_dir / protocol.RESULT_FILE).exists()
        assert (job_dir / protocol.WEIGHTS_FILE).exists()
        # The worker's log went to the job's log file, as for a worker started for it.
        log = (job_dir / protocol.LOG_FILE).read_text()
        assert "a standby worker took the job" in log
        assert f'"pid": {process.pid}' in log
    finally:
        await launcher.close()
    assert launcher._standby is None


@pytest.mark.timeout(WORKER_TIMEOUT_S)
async def test_a_standby_worker_that_is_told_nothing_exits_cleanly() -> None:
    process = await asyncio.create_subprocess_exec(
        *standby_command(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.close()
    assert await run_to_end(process) == []
    assert process.returncode == 0


@pytest.mark.timeout(WORKER_TIMEOUT_S * 2)
async def test_without_a_standby_each_job_starts_its_own_worker(tmp_path: Path) -> None:
    launcher = WorkerLauncher(standby=False, threads=1)
    await launcher.start()
    job_dir = job_directory(tmp_path, "cold")
    process = await launcher.launch(job_dir, 1)
    assert launcher._standby is None
    types = await run_to_end(process)
    await launcher.close()
    assert process.returncode == protocol.EXIT_SUCCEEDED
    assert types[-1] == "result"
