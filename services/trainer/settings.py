"""Settings of the trainer (``CONVEYOR_TRAINER_<FIELD>``), and what a training
worker process learns from its launcher (:class:`WorkerEnvironment`)."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.shared.ports import default_address
from conveyor.shared.settings import ServiceSettings

GIB = 1024**3


class TrainerSettings(ServiceSettings):
    """Settings of the trainer service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_TRAINER_")
    service_name: ClassVar[str] = "trainer"

    database_url: str | None = None
    """SQLAlchemy URL of the jobs and datasets database, e.g.
    ``postgresql+psycopg://trainer@db:5432/trainer``. Unset: SQLite (WAL) at
    ``<data_dir>/trainer/trainer.db``. Migrations run at start-up."""

    max_running_jobs: int = Field(default=1, ge=0, le=256)
    """How many training jobs run at once (each in its own worker process, or
    ``world_size`` processes for distributed jobs); the others wait, first in
    first out. 0 accepts and queues jobs without starting any (maintenance)."""

    max_queued_jobs: int = Field(default=100, ge=1, le=100_000)
    """How many jobs may wait in the queue; CreateTrainingJob beyond it is
    RESOURCE_EXHAUSTED."""

    max_dataset_bytes: int = Field(default=1 * GIB, ge=1)
    """Largest file a dataset upload may declare; larger is RESOURCE_EXHAUSTED.
    The upload is parsed in memory, so keep it well below the process's memory."""

    worker_threads: int = Field(default=8, ge=1, le=64)
    """Threads that run database and file work; also the database pool's size."""

    registry_addr: str = Field(
        default=default_address("registry"),
        validation_alias=AliasChoices("registry_addr", "CONVEYOR_REGISTRY_ADDR"),
    )
    """The registry (``CONVEYOR_REGISTRY_ADDR``): where trained models are
    registered, and where registration targets are checked at job creation."""

    code_revision: str = Field(default="", max_length=200)
    """The code revision recorded in every job's environment and every registered
    version's lineage (a git commit, set by the deployment). Empty: the installed
    package's version (``conveyor==0.1.0``)."""

    worker_stop_grace: timedelta = timedelta(seconds=10)
    """When the trainer stops, how long its running workers get after SIGTERM
    before they are killed; their jobs stay RUNNING and resume from their last
    checkpoint when the trainer starts again."""

    standby_worker: bool = True
    """Keep one worker process started and warmed up (PyTorch, scikit-learn and
    the trainer's modules imported) while jobs may run, and hand it the next
    single-process job: a job starts training in well under a second instead
    of after the 4 to 6 s a fresh process spends importing. Costs one idle
    process (about 400 MiB) beside the trainer."""

    cpu_threads_per_job: int = Field(default=0, ge=0, le=1024)
    """PyTorch's CPU threads in each single-process job (``OMP_NUM_THREADS``).
    0: the machine's cores divided by ``max_running_jobs`` (at least 1), so that
    concurrent jobs do not fight over cores; a value set in the trainer's own
    environment wins. Distributed ranks get one each (``torchrun``)."""

    registration_attempts: int = Field(default=5, ge=1, le=100)
    """How often registering a trained model is tried (with backoff) while the
    registry is unavailable before the job fails with REGISTRATION_FAILED."""


class WorkerEnvironment(BaseSettings):
    """What a worker process reads from its environment: its place in a
    distributed job, as ``torchrun`` sets it (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); a worker started alone is rank 0 of 1."""

    model_config = SettingsConfigDict(extra="ignore", use_attribute_docstrings=True)

    rank: int = Field(default=0, ge=0, validation_alias="RANK")
    """This process's rank."""
    world_size: int = Field(default=1, ge=1, validation_alias="WORLD_SIZE")
    """The number of processes of the job."""
    local_rank: int = Field(default=0, ge=0, validation_alias="LOCAL_RANK")
    """This process's rank on its machine (its GPU index)."""
