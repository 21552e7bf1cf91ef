"""Backup and restore: a snapshot taken while the registry serves rebuilds a
registry that serves the same models, versions, aliases and bytes, on SQLite or
PostgreSQL whichever the source was; a damaged backup or a non-empty target is
refused before anything is written."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import sqlalchemy

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.backup import (
    CorruptBackupError,
    backup_registry,
    restore_registry,
)
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.errors import AlreadyExistsError, FailedPreconditionError
from conveyor.shared.secrets import SecretStoreSettings
from conveyor.shared.storage import create_engine, read_transaction, write_transaction
from tests.support.postgres import ThrowawayPostgres
from tests.support.registry import create_model, create_version, download

if TYPE_CHECKING:
    Stub = registry_service_pb2_grpc.RegistryServiceAsyncStub
WEIGHTS_V1 = os.urandom(3 * 1024 * 1024 + 17)  # several upload and download chunks
WEIGHTS_V3 = b"pruned" * 50_000


def settings_for(kind: str, data_dir: Path, request: pytest.FixtureRequest) -> RegistrySettings:
    """A registry whose secret store (local keys beside its data directory) is
    shared by every registry of the test: restoring encrypted blobs needs the
    store that wrote them."""
    url = None
    if kind == "postgresql":
        postgres: ThrowawayPostgres = request.getfixturevalue("postgres")
        url = postgres.create_database()
    return RegistrySettings(
        data_dir=data_dir,
        database_url=url,
        secrets=SecretStoreSettings(local_dir=data_dir.parent / "secrets"),
    )


def stored_blob(root: Path, digest: str) -> Path:
    """The file of blob ``digest`` under a blob directory (a registry's or a
    backup's ``blobs``): ``<digest>``, or ``<digest>.enc`` when encrypted."""
    [path] = (root / "sha256" / digest[:2]).glob(f"{digest}*")
    return path


@asynccontextmanager
async def serving(settings: RegistrySettings) -> AsyncIterator[Stub]:
    server = await build_server(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield registry_service_pb2_grpc.RegistryServiceStub(channel)
    finally:
        await server.shutdown()


async def populate(registry: Stub) -> None:
    """Two models with versions, lineage, an attachment, an archived version,
    aliases set, moved and deleted (so the alias history has every kind)."""
    await create_model(registry, "churn", labels={"team": "growth"})
    v1 = await create_version(registry, "churn", WEIGHTS_V1, metrics={"auc": 0.91})
    v2 = await create_version(registry, "churn", WEIGHTS_V1, metrics={"auc": 0.93})  # same bytes
    await create_version(
        registry,
        "churn",
        WEIGHTS_V3,
        metrics={"auc": 0.92},
        lineage=pb.Lineage(parent_version=v1.name, transformation="pruning"),
    )
    await registry.CreateAttachment(
        rpc.CreateAttachmentRequest(
            parent=v2.name,
            attachment_id="eval",
            attachment=pb.Attachment(
                kind=pb.ATTACHMENT_KIND_EVALUATION_REPORT,
                content_type="application/json",
                content=b'{"auc": 0.93}',
            ),
        ),
        timeout=10,
    )
    for alias, version in [("production", v1), ("canary", v2), ("production", v2)]:
        await registry.SetAlias(
            rpc.SetAliasRequest(
                reason="test", name=f"models/churn/aliases/{alias}", version=version.name
            ),
            timeout=10,
        )
    await registry.DeleteAlias(
        rpc.DeleteAliasRequest(reason="test", name="models/churn/aliases/canary"), timeout=10
    )
    await create_model(registry, "fraud")
    await create_version(registry, "fraud", b"fraud-v1")
    f2 = await create_version(registry, "fraud", b"fraud-v2")
    await registry.ArchiveModelVersion(rpc.ArchiveModelVersionRequest(name=f2.name), timeout=10)
    await registry.SetAlias(
        rpc.SetAliasRequest(
            reason="test", name="models/fraud/aliases/staging", version="models/fraud/versions/1"
        ),
        timeout=10,
    )


@dataclass
class Observed:
    """Everything a client can see of a registry, as the wire gives it."""

    models: list[pb.Model]
    versions: list[pb.ModelVersion]
    aliases: list[pb.Alias]
    watch_snapshot: list[rpc.WatchAliasesResponse]
    history: list[rpc.WatchAliasesResponse]
    artifacts: dict[str, bytes]
    attachment: pb.Attachment


async def observe(registry: Stub) -> Observed:
    models = (
        await registry.ListModels(rpc.ListModelsRequest(show_archived=True), timeout=10)
    ).models
    versions = (
        await registry.ListModelVersions(
            rpc.ListModelVersionsRequest(
                parent="models/-",
                show_archived=True,
                view=pb.MODEL_VERSION_VIEW_FULL,
            ),
            timeout=10,
        )
    ).model_versions
    versions = sorted(versions, key=lambda v: v.name)
    aliases = (
        await registry.ListAliases(rpc.ListAliasesRequest(parent="models/-"), timeout=10)
    ).aliases
    artifacts = {v.name: (await download(registry, v.name))[1] for v in versions}
    attachment = (
        await registry.GetAttachment(
            rpc.GetAttachmentRequest(name="models/churn/versions/2/attachments/eval"), timeout=10
        )
    ).attachment
    return Observed(
        list(models),
        list(versions),
        list(aliases),
        await watch_until_synced(registry, start_revision=0),
        await watch_until_synced(registry, start_revision=1),
        artifacts,
        attachment,
    )


def entries(directory: Path) -> list[str]:
    """What a directory holds, hidden entries (a half-made backup) included."""
    return sorted(path.name for path in directory.iterdir())


async def watch_until_synced(
    registry: Stub, *, start_revision: int
) -> list[rpc.WatchAliasesResponse]:
    events: list[rpc.WatchAliasesResponse] = []
    call = registry.WatchAliases(
        rpc.WatchAliasesRequest(parent="models/-", start_revision=start_revision), timeout=10
    )
    async for event in call:
        events.append(event)
        if event.type == pb.ALIAS_EVENT_TYPE_SYNCED:
            break
    call.cancel()
    return events


@pytest.mark.parametrize(
    ("source_kind", "target_kind"),
    [("sqlite", "sqlite"), ("sqlite", "postgresql"), ("postgresql", "sqlite")],
)
async def test_a_backup_taken_while_serving_restores_the_same_registry(
    source_kind: str, target_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = settings_for(source_kind, tmp_path / "source", request)
    target = settings_for(target_kind, tmp_path / "target", request)
    async with serving(source) as registry:
        await populate(registry)
        before = await observe(registry)
        manifest = await asyncio.to_thread(backup_registry, source, tmp_path / "backup")
        # The source keeps serving through and after the backup.
        assert (await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)).model

    assert manifest.row_counts["models"] == 2
    assert manifest.row_counts["model_versions"] == 5
    assert manifest.row_counts["attachments"] == 1
    assert manifest.row_counts["alias_events"] == 5
    # v1 and v2 share their bytes: four distinct contents, one attachment.
    assert sorted(b.sha256 for b in manifest.blobs) == sorted(
        {hashlib.sha256(data).hexdigest() for data in before.artifacts.values()}
        | {before.attachment.sha256}
    )
    written = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert written["alembic_revision"] == manifest.alembic_revision
    assert written["source_dialect"] == source_kind
    assert entries(tmp_path) == ["backup", "secrets", "source"]  # no half-made backup

    restored = await asyncio.to_thread(restore_registry, target, tmp_path / "backup")
    assert restored == manifest
    async with serving(target) as registry:
        after = await observe(registry)
        assert after == before
        assert after.artifacts["models/churn/versions/1"] == WEIGHTS_V1
        assert after.artifacts["models/churn/versions/3"] == WEIGHTS_V3
        assert [m.latest_version for m in after.models] == [
            "models/churn/versions/3",
            "models/fraud/versions/2",
        ]
        assert dict(after.models[0].aliases) == {"production": "models/churn/versions/2"}
        # The restored registry goes on where the source stopped: the next
        # version number, the next alias revision, new rows (PostgreSQL's
        # sequences moved past the restored ids).
        synced = before.watch_snapshot[-1].revision
        moved = await registry.SetAlias(
            rpc.SetAliasRequest(
                reason="test",
                name="models/churn/aliases/production",
                version="models/churn/versions/3",
            ),
            timeout=10,
        )
        assert moved.alias.revision == synced + 1
        assert (await create_version(registry, "churn", b"v4")).name == "models/churn/versions/4"
        await create_model(registry, "new-after-restore")
        assert (await create_version(registry, "new-after-restore")).name == (
            "models/new-after-restore/versions/1"
        )


@pytest.mark.parametrize("source_kind", ["sqlite", "postgresql"])
async def test_backups_during_writes_are_each_one_consistent_state(
    source_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = settings_for(source_kind, tmp_path / "source", request)
    backups: list[tuple[Path, int, int]] = []  # where, versions acknowledged before, after
    async with serving(source) as registry:
        await create_model(registry, "busy")
        # The first alias change creates the revision counter; make it alone
        # (see test_the_first_alias_changes_made_at_once_all_succeed_on_postgresql).
        await create_version(registry, "busy", b"content-0", metrics={"i": 0})
        await registry.SetAlias(
            rpc.SetAliasRequest(
                reason="first",
                name="models/busy/aliases/production",
                version="models/busy/versions/1",
            ),
            timeout=10,
        )
        started, acknowledged = 0, 1

        async def write_until(stop: asyncio.Event, under_way: asyncio.Event) -> None:
            # Each version moves `production` onto itself: a version row, the
            # model's counter, an alias row, an event and the revision counter.
            nonlocal started, acknowledged
            while not stop.is_set():
                started += 1
                content = f"content-{started}"
                version = await create_version(
                    registry, "busy", content.encode(), metrics={"i": started}
                )
                acknowledged += 1
                await registry.SetAlias(
                    rpc.SetAliasRequest(
                        reason=content, name="models/busy/aliases/production", version=version.name
                    ),
                    timeout=10,
                )
                if acknowledged >= 5:
                    under_way.set()

        stop, under_way = asyncio.Event(), asyncio.Event()
        writers = [asyncio.create_task(write_until(stop, under_way)) for _ in range(3)]
        await under_way.wait()
        for number in range(3):
            before = acknowledged
            await asyncio.to_thread(backup_registry, source, tmp_path / f"backup-{number}")
            backups.append((tmp_path / f"backup-{number}", before, started))
        stop.set()
        await asyncio.gather(*writers)

    for backup, acknowledged_before, started_after in backups:
        target = settings_for("sqlite", tmp_path / f"restored-{backup.name}", request)
        manifest = await asyncio.to_thread(restore_registry, target, backup)
        async with serving(target) as registry:
            await check_consistent(registry, manifest.row_counts)
            count = manifest.row_counts["model_versions"]
            assert acknowledged_before <= count <= started_after


async def check_consistent(registry: Stub, row_counts: dict[str, int]) -> None:
    """The restored `busy` model is one state the source went through."""
    versions = (
        await registry.ListModelVersions(
            rpc.ListModelVersionsRequest(parent="models/busy", page_size=1000), timeout=10
        )
    ).model_versions
    count = len(versions)
    assert count == row_counts["model_versions"]
    assert sorted(v.name for v in versions) == sorted(
        f"models/busy/versions/{n}" for n in range(1, count + 1)
    )
    for version in versions:
        _, data = await download(registry, version.name)
        assert data == f"content-{int(version.metrics['i'])}".encode()
    model = (await registry.GetModel(rpc.GetModelRequest(name="models/busy"), timeout=10)).model
    assert model.latest_version == f"models/busy/versions/{count}"
    # The alias points at a restored version, and the revision counter agrees
    # with the restored alias history.
    snapshot = await watch_until_synced(registry, start_revision=0)
    assert [e.alias.name for e in snapshot[:-1]] == ["models/busy/aliases/production"]
    assert snapshot[0].alias.version in {v.name for v in versions}
    assert snapshot[-1].revision == row_counts["alias_events"]
    # The model's version counter was restored with its versions.
    assert (await create_version(registry, "busy", b"next")).name == (
        f"models/busy/versions/{count + 1}"
    )


async def test_a_corrupted_blob_is_refused_before_anything_is_written(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = settings_for("sqlite", tmp_path / "source", request)
    async with serving(source) as registry:
        await populate(registry)
    manifest = await asyncio.to_thread(backup_registry, source, tmp_path / "backup")
    digest = hashlib.sha256(WEIGHTS_V1).hexdigest()
    blob = stored_blob(tmp_path / "backup" / "blobs", digest)
    damaged = bytearray(blob.read_bytes())
    damaged[1000] ^= 0xFF
    blob.unlink()  # the backup may hard-link the live blob: do not write through it
    blob.write_bytes(bytes(damaged))

    target = RegistrySettings(data_dir=tmp_path / "target")
    with pytest.raises(CorruptBackupError) as refused:
        await asyncio.to_thread(restore_registry, target, tmp_path / "backup")
    assert refused.value.reason == "BACKUP_CORRUPT"
    assert refused.value.metadata["blob"] == digest
    assert not (tmp_path / "target").exists()

    postgres_target = settings_for("postgresql", tmp_path / "pg-target", request)
    with pytest.raises(CorruptBackupError):
        await asyncio.to_thread(restore_registry, postgres_target, tmp_path / "backup")
    assert postgres_target.database_url is not None
    engine = sqlalchemy.create_engine(postgres_target.database_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert len(manifest.blobs) == 5


async def test_an_edited_table_file_is_refused(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = settings_for("sqlite", tmp_path / "source", request)
    async with serving(source) as registry:
        await populate(registry)
    await asyncio.to_thread(backup_registry, source, tmp_path / "backup")
    table = tmp_path / "backup" / "tables" / "aliases.jsonl"
    table.write_text(table.read_text().replace("production", "producti0n"))
    with pytest.raises(CorruptBackupError, match=r"aliases\.jsonl"):
        await asyncio.to_thread(
            restore_registry, RegistrySettings(data_dir=tmp_path / "t"), tmp_path / "backup"
        )
    assert not (tmp_path / "t").exists()


async def test_restore_refuses_a_registry_that_holds_data(
    registry_settings: RegistrySettings,
    registry: Stub,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    source = settings_for("sqlite", tmp_path / "source", request)
    async with serving(source) as other:
        await populate(other)
    await asyncio.to_thread(backup_registry, source, tmp_path / "backup")
    await create_model(registry, "already-here")

    with pytest.raises(FailedPreconditionError) as refused:
        await asyncio.to_thread(restore_registry, registry_settings, tmp_path / "backup")
    assert refused.value.reason == "TARGET_NOT_EMPTY"
    models = (
        await registry.ListModels(rpc.ListModelsRequest(show_archived=True), timeout=10)
    ).models
    assert [m.name for m in models] == ["models/already-here"]
    assert (
        await registry.GetModel(rpc.GetModelRequest(name="models/already-here"), timeout=10)
    ).model


async def test_a_failed_backup_leaves_no_directory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = settings_for("sqlite", tmp_path / "source", request)
    async with serving(source) as registry:
        await populate(registry)
    digest = hashlib.sha256(WEIGHTS_V3).hexdigest()
    stored_blob(source.service_data_dir / "blobs", digest).unlink()

    with pytest.raises(FailedPreconditionError) as failed:
        await asyncio.to_thread(backup_registry, source, tmp_path / "backups" / "nightly")
    assert failed.value.reason == "BLOB_MISSING"
    assert entries(tmp_path / "backups") == []


async def test_a_backup_does_not_overwrite_another(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = settings_for("sqlite", tmp_path / "source", request)
    async with serving(source) as registry:
        await create_model(registry, "churn")
    first = await asyncio.to_thread(backup_registry, source, tmp_path / "backup")
    with pytest.raises(AlreadyExistsError):
        await asyncio.to_thread(backup_registry, source, tmp_path / "backup")
    again = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert again["created_at"] == first.created_at.isoformat()
    assert entries(tmp_path) == ["backup", "secrets", "source"]


def test_read_transaction_is_one_snapshot_on_postgresql(postgres: ThrowawayPostgres) -> None:
    engine = create_engine(postgres.create_database())
    try:
        with write_transaction(engine) as db:
            db.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY)")
        with read_transaction(engine) as reader:
            first = reader.exec_driver_sql("SELECT count(*) FROM items").scalar_one()
            with write_transaction(engine) as writer:
                writer.exec_driver_sql("INSERT INTO items VALUES (1)")
            second = reader.exec_driver_sql("SELECT count(*) FROM items").scalar_one()
        assert (first, second) == (0, 0)
    finally:
        engine.dispose()


async def test_the_first_alias_changes_made_at_once_all_succeed_on_postgresql(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = settings_for("postgresql", tmp_path, request)
    assert settings.database_url is not None
    engine = sqlalchemy.create_engine(settings.database_url)
    try:
        async with serving(settings) as registry:
            models = [f"model-{n}" for n in range(4)]
            for model in models:
                await create_model(registry, model)
                await create_version(registry, model)
            with engine.connect() as blocker:
                # Hold every alias change at its first touch of the counter, then
                # let them all go at once: the way a burst of promotions arrives.
                blocker.exec_driver_sql("LOCK TABLE counters IN SHARE MODE")
                changes = [
                    asyncio.ensure_future(
                        registry.SetAlias(
                            rpc.SetAliasRequest(
                                name=f"models/{model}/aliases/production",
                                version=f"models/{model}/versions/1",
                                reason="first release",
                            ),
                            timeout=30,
                        )
                    )
                    for model in models
                ]
                await asyncio.to_thread(wait_for_lock_waiters, engine, "counters", 4)
                blocker.rollback()
            results = await asyncio.gather(*changes, return_exceptions=True)
            outcomes = [
                r.code().name if isinstance(r, grpc.aio.AioRpcError) else type(r).__name__
                for r in results
            ]
            assert outcomes == ["SetAliasResponse"] * 4
            assert sorted(r.alias.revision for r in results) == [1, 2, 3, 4]  # type: ignore[union-attr]
    finally:
        engine.dispose()


def wait_for_lock_waiters(engine: sqlalchemy.Engine, table: str, count: int) -> None:
    for _ in range(300):
        with engine.connect() as db:
            waiting = db.exec_driver_sql(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                (table,),
            ).scalar_one()
        if waiting >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{count} transactions never queued on {table}")
