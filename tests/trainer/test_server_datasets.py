"""The trainer's dataset RPCs through a real server: the built-in catalog,
uploads (NPZ, CSV, Parquet) hashed as they arrive and validated before they
become visible, idempotent retries, deletion, and every way an upload can be
refused, after which nothing is left behind and the server still serves."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import FailedPreconditionError
from conveyor.shared.health import serving_status
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.trainer import (
    Running,
    create_job,
    csv_bytes,
    invalid,
    npz_bytes,
    refused,
    running_trainer,
    upload_requests,
)
from tests.trainer.conftest import make_spec

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer by itself: no authentication."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    """A trainer that queues jobs without starting them, with a 4 MiB upload limit."""
    async with running_trainer(
        tmp_path, with_registry=False, max_running_jobs=0, max_dataset_bytes=4 * MIB
    ) as running:
        yield running


def small_npz(rows: int = 60, features: int = 4) -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(rng.normal(size=(rows, features)), np.arange(rows) % 2)


def stored_files(running: Running) -> list[Path]:
    root = running.data_dir / "trainer" / "datasets"
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_built_in_datasets_are_listed_and_described(served: Running) -> None:
    listed = (await served.trainer.ListDatasets(rpc.ListDatasetsRequest(), timeout=60)).datasets
    assert [d.name for d in listed] == [
        "datasets/breast-cancer",
        "datasets/digits",
        "datasets/synthetic",
    ]
    cancer = (
        await served.trainer.GetDataset(rpc.GetDatasetRequest(name="datasets/breast-cancer"))
    ).dataset
    assert cancer.source == pb.DATASET_SOURCE_BUILTIN
    assert list(cancer.example_shape) == [30]
    assert list(cancer.class_names) == ["malignant", "benign"]
    assert cancer.task == registry_pb.TASK_TYPE_BINARY_CLASSIFICATION
    assert cancer.example_count == 569
    assert cancer.digest.startswith("sha256:")
    assert cancer.HasField("create_time")
    digits = listed[1]
    assert (digits.modality, list(digits.example_shape)) == (pb.DATA_MODALITY_IMAGE, [1, 8, 8])
    synthetic = listed[2]
    assert synthetic.source == pb.DATASET_SOURCE_GENERATOR
    assert synthetic.generator_args.fields["num_samples"].number_value == 1000

    async def names(filter_text: str) -> list[str]:
        reply = await served.trainer.ListDatasets(rpc.ListDatasetsRequest(filter=filter_text))
        return [d.name for d in reply.datasets]

    assert await names("source=BUILTIN") == ["datasets/breast-cancer", "datasets/digits"]
    assert await names("modality=IMAGE AND task=MULTICLASS_CLASSIFICATION") == ["datasets/digits"]
    assert await names("source=UPLOADED") == []

    first = await served.trainer.ListDatasets(rpc.ListDatasetsRequest(page_size=2))
    assert len(first.datasets) == 2
    assert first.next_page_token
    second = await served.trainer.ListDatasets(
        rpc.ListDatasetsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [d.name for d in second.datasets] == ["datasets/synthetic"]
    assert second.next_page_token == ""

    await invalid(served.trainer.ListDatasets(rpc.ListDatasetsRequest(page_size=-1)), "page_size")
    await invalid(served.trainer.ListDatasets(rpc.ListDatasetsRequest(filter="owner=x")), "filter")
    await invalid(
        served.trainer.ListDatasets(rpc.ListDatasetsRequest(filter="source=SOMEWHERE")), "filter"
    )
    await invalid(
        served.trainer.ListDatasets(rpc.ListDatasetsRequest(page_token="garbage")), "page_token"
    )
    await invalid(
        served.trainer.ListDatasets(
            rpc.ListDatasetsRequest(
                page_size=2, page_token=first.next_page_token, filter="source=BUILTIN"
            )
        ),
        "page_token",
    )
    await invalid(served.trainer.GetDataset(rpc.GetDatasetRequest(name="digits")), "name")
    await refused(
        served.trainer.GetDataset(rpc.GetDatasetRequest(name="datasets/nope")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_uploads_in_every_format_become_datasets(served: Running) -> None:
    data = small_npz()
    created = (
        await served.trainer.CreateDataset(
            upload_requests(
                "points",
                data,
                dataset=pb.Dataset(
                    format=pb.DATASET_FORMAT_NPZ,
                    display_name="Points",
                    description="Gaussian points",
                    class_names=["even", "odd"],
                ),
                chunk=1000,
            ),
            timeout=60,
        )
    ).dataset
    assert created.name == "datasets/points"
    assert created.source == pb.DATASET_SOURCE_UPLOADED
    assert created.format == pb.DATASET_FORMAT_NPZ
    assert (created.display_name, created.description) == ("Points", "Gaussian points")
    assert list(created.class_names) == ["even", "odd"]
    assert list(created.feature_names) == [f"feature_{i}" for i in range(4)]
    assert (created.example_count, list(created.example_shape)) == (60, [4])
    assert created.size_bytes == len(data)
    assert created.digest.startswith("sha256:")
    assert created.created_by == "user:anonymous"
    assert created.HasField("create_time")
    got = (await served.trainer.GetDataset(rpc.GetDatasetRequest(name=created.name))).dataset
    assert got == created

    table = csv_bytes(
        [(0.5 * i, i % 3, "yes" if i % 2 else "no") for i in range(40)], ["size", "count", "label"]
    )
    csv = (
        await served.trainer.CreateDataset(
            upload_requests(
                "table",
                table,
                dataset=pb.Dataset(format=pb.DATASET_FORMAT_CSV, label_column="label"),
                chunk=128,
            )
        )
    ).dataset
    assert list(csv.feature_names) == ["size", "count"]
    assert list(csv.class_names) == ["no", "yes"]
    assert csv.task == registry_pb.TASK_TYPE_BINARY_CLASSIFICATION

    frame = pd.DataFrame({"a": np.arange(30.0), "b": np.arange(30) % 5, "y": np.arange(30) % 3})
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    parquet = (
        await served.trainer.CreateDataset(
            upload_requests(
                "frame",
                buffer.getvalue(),
                dataset=pb.Dataset(format=pb.DATASET_FORMAT_PARQUET, label_column="y"),
            )
        )
    ).dataset
    assert parquet.task == registry_pb.TASK_TYPE_MULTICLASS_CLASSIFICATION
    assert list(parquet.class_names) == ["0", "1", "2"]

    listed = await served.trainer.ListDatasets(rpc.ListDatasetsRequest(filter="source=UPLOADED"))
    assert [d.name for d in listed.datasets] == [
        "datasets/frame",
        "datasets/points",
        "datasets/table",
    ]
    # A job can train on an upload: its schema is checked against the stored one.
    spec = make_spec("datasets/points", epochs=1, batch_size=8)
    assert (await create_job(served.trainer, spec)).state == pb.JOB_STATE_QUEUED


async def test_uploads_are_idempotent_and_ids_are_unique(served: Running) -> None:
    data = small_npz()
    first = (
        await served.trainer.CreateDataset(upload_requests("same", data, request_id="r-1"))
    ).dataset
    again = (
        await served.trainer.CreateDataset(upload_requests("same", data, request_id="r-1"))
    ).dataset
    assert again == first
    taken = await refused(
        served.trainer.CreateDataset(upload_requests("same", data)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert taken.reason == "DATASET_EXISTS"
    reused = await refused(
        served.trainer.CreateDataset(upload_requests("other", data, request_id="r-1")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert reused.reason == "REQUEST_ID_CONFLICT"
    # Two datasets with the same file share one stored copy.
    await served.trainer.CreateDataset(upload_requests("twin", data))
    assert len(stored_files(served)) == 1


async def test_bad_uploads_are_refused_and_leave_nothing(served: Running) -> None:
    trainer = served.trainer
    data = small_npz()

    async def only(*messages: rpc.CreateDatasetRequest) -> AsyncIterator[rpc.CreateDatasetRequest]:
        for message in messages:
            yield message

    def metadata(**fields: object) -> rpc.CreateDatasetRequest:
        values: dict[str, object] = {
            "dataset_id": "bad",
            "dataset": pb.Dataset(format=pb.DATASET_FORMAT_NPZ),
            "sha256": "0" * 64,
            "size_bytes": 10,
        }
        values.update(fields)
        return rpc.CreateDatasetRequest(metadata=rpc.CreateDatasetMetadata(**values))  # type: ignore[arg-type]

    await invalid(trainer.CreateDataset(only()), "metadata")
    await invalid(trainer.CreateDataset(only(rpc.CreateDatasetRequest(chunk=b"x"))), "metadata")
    await invalid(trainer.CreateDataset(only(metadata(dataset_id="Bad_Id"))), "metadata.dataset_id")
    await invalid(trainer.CreateDataset(only(metadata(dataset_id="digits"))), "metadata.dataset_id")
    await invalid(
        trainer.CreateDataset(only(metadata(sha256="abc", size_bytes=0, dataset=pb.Dataset()))),
        "metadata.sha256",
        "metadata.size_bytes",
        "metadata.dataset.format",
    )
    await invalid(trainer.CreateDataset(only(metadata(), metadata())), "chunk")  # metadata twice
    over = await refused(
        trainer.CreateDataset(only(metadata(size_bytes=5 * MIB))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert over.reason == "DATASET_TOO_LARGE"
    big = bytes(3 * MIB)
    await invalid(trainer.CreateDataset(upload_requests("bad", big, chunk=len(big))), "chunk")
    mismatch = await invalid(
        trainer.CreateDataset(upload_requests("bad", data, sha256="f" * 64)), "metadata.sha256"
    )
    assert mismatch.reason == "DIGEST_MISMATCH"
    await invalid(
        trainer.CreateDataset(upload_requests("bad", data, size_bytes=len(data) + 1)),
        "metadata.size_bytes",
    )
    await invalid(
        trainer.CreateDataset(upload_requests("bad", data, size_bytes=len(data) - 1)),
        "metadata.size_bytes",
    )
    garbage = await invalid(trainer.CreateDataset(upload_requests("bad", b"not a zip")), "chunk")
    assert garbage.reason == "DATASET_MALFORMED"
    table = csv_bytes([(1, "a", 0), (2, "b", 1), (3, "c", 0)], ["x", "word", "label"])
    csv = pb.Dataset(format=pb.DATASET_FORMAT_CSV, label_column="label")
    await invalid(
        trainer.CreateDataset(
            upload_requests("bad", table, dataset=pb.Dataset(format=pb.DATASET_FORMAT_CSV))
        ),
        "metadata.dataset.label_column",
    )
    await invalid(
        trainer.CreateDataset(
            upload_requests(
                "bad", table, dataset=pb.Dataset(format=pb.DATASET_FORMAT_CSV, label_column="y")
            )
        ),
        "metadata.dataset.label_column",
    )
    await invalid(trainer.CreateDataset(upload_requests("bad", table, dataset=csv)), "chunk")
    nan_labels = csv_bytes([(1, 0), (2, ""), (3, 1)], ["x", "label"])
    await invalid(trainer.CreateDataset(upload_requests("bad", nan_labels, dataset=csv)), "chunk")

    listed = await trainer.ListDatasets(rpc.ListDatasetsRequest(filter="source=UPLOADED"))
    assert list(listed.datasets) == []
    assert stored_files(served) == []
    assert await asyncio.to_thread(serving_status, served.trainer_target) == "SERVING"


async def test_delete_removes_an_upload_unless_a_job_needs_it(served: Running) -> None:
    trainer = served.trainer
    await trainer.CreateDataset(upload_requests("gone", small_npz()))
    await trainer.CreateDataset(upload_requests("kept", small_npz(rows=80)))
    job = await create_job(trainer, make_spec("datasets/kept", epochs=1, batch_size=8))
    assert len(stored_files(served)) == 2

    await trainer.DeleteDataset(rpc.DeleteDatasetRequest(name="datasets/gone"))
    await refused(
        trainer.GetDataset(rpc.GetDatasetRequest(name="datasets/gone")), grpc.StatusCode.NOT_FOUND
    )
    assert len(stored_files(served)) == 1
    await refused(
        trainer.DeleteDataset(rpc.DeleteDatasetRequest(name="datasets/gone")),
        grpc.StatusCode.NOT_FOUND,
    )
    in_use = await refused(
        trainer.DeleteDataset(rpc.DeleteDatasetRequest(name="datasets/kept")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert isinstance(in_use, FailedPreconditionError)
    assert (in_use.reason, in_use.metadata["used_by"]) == ("DATASET_IN_USE", job.name)
    builtin = await refused(
        trainer.DeleteDataset(rpc.DeleteDatasetRequest(name="datasets/digits")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert builtin.reason == "BUILTIN_DATASET"
    await invalid(trainer.DeleteDataset(rpc.DeleteDatasetRequest(name="kept")), "name")

    await trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=job.name))
    await trainer.DeleteDataset(rpc.DeleteDatasetRequest(name="datasets/kept"))
    assert stored_files(served) == []
    # A job naming a deleted dataset is refused.
    missing = await refused(
        trainer.CreateTrainingJob(
            rpc.CreateTrainingJobRequest(
                training_job=pb.TrainingJob(spec=make_spec("datasets/kept", epochs=1))
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert missing.reason == "DATASET_NOT_FOUND"
