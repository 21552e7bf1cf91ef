"""The ``conveyor models`` and ``conveyor registry`` commands against a real registry.

The CLI runs its own event loop, so each command runs in a worker thread while
the server keeps serving on the test's loop; stdout and stderr are read as a
person would read them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.services import cli
from conveyor.services.registry import cli as registry_cli
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.server import ConveyorServer

MIB = 1024 * 1024
SIGNATURE = ("--input", "input:FP32:-1,30", "--output", "probabilities:FP32:-1,2")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ConveyorServer]:
    """One registry on SQLite (the CLI speaks only gRPC, so one store is enough)."""
    server = await build_server(RegistrySettings(data_dir=tmp_path / "data"))
    yield server
    await server.shutdown()


async def conveyor(
    capsys: pytest.CaptureFixture[str], *argv: str, server: ConveyorServer | None = None
) -> Result:
    """``conveyor *argv`` (pointed at ``server``) in a worker thread."""
    capsys.readouterr()
    address = ("--registry", f"127.0.0.1:{server.port}") if server else ()
    code = await asyncio.to_thread(cli.main, [*argv, *address])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def create_churn(capsys: pytest.CaptureFixture[str], server: ConveyorServer) -> None:
    """``conveyor models create churn`` (the model most tests start from)."""
    result = await conveyor(
        capsys,
        "models",
        "create",
        "churn",
        "--owner-team",
        "t",
        "--risk-tier",
        "low",
        server=server,
    )
    assert result.code == 0, result.err


def artifact(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def upload(
    capsys: pytest.CaptureFixture[str], server: ConveyorServer, path: Path, *extra: str
) -> str:
    result = await conveyor(
        capsys,
        "models",
        "upload",
        "churn",
        str(path),
        "--format",
        "onnx_fp32",
        *SIGNATURE,
        *extra,
        server=server,
    )
    assert result.code == 0, result.err
    return result.out.strip()


async def test_a_model_goes_from_upload_to_download(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    created = await conveyor(
        capsys,
        "models",
        "create",
        "churn",
        "--owner-team",
        "payments-ml",
        "--risk-tier",
        "high",
        "--tag",
        "tabular",
        "fraud",
        server=server,
    )
    assert (created.code, created.out) == (0, "models/churn\n"), created.err
    data = artifact(3 * MIB + 17, seed=1)
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    name = await upload(
        capsys, server, source, "--metrics", "accuracy=0.97", "f1=0.91", "--label", "team=risk"
    )
    assert name == "models/churn/versions/1"

    versions = await conveyor(capsys, "models", "versions", "churn", server=server)
    assert versions.code == 0, versions.err
    header, row = versions.out.splitlines()
    assert header.split()[:3] == ["VERSION", "FORMAT", "STAGE"]
    digest = hashlib.sha256(data).hexdigest()
    assert row.split()[:3] == ["1", "onnx_fp32", "none"]
    assert "accuracy=0.97 f1=0.91" in row
    assert digest[:12] in row
    assert "3.0 MiB" in row

    alias = await conveyor(
        capsys,
        "models",
        "alias",
        "set",
        "churn",
        "production",
        "1",
        "--reason",
        "first release",
        server=server,
    )
    assert alias.code == 0, alias.err
    assert alias.out.startswith("models/churn/aliases/production -> models/churn/versions/1")

    target = tmp_path / "downloaded.onnx"
    download = await conveyor(
        capsys, "models", "download", "churn@production", "-o", str(target), server=server
    )
    assert download.code == 0, download.err
    assert target.read_bytes() == data
    assert f"sha256 {digest} verified" in download.out
    assert "downloading models/churn/versions/1: 100%" in download.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # noqa: ASYNC240
        "data",
        "downloaded.onnx",
        "model.onnx",
    ]

    listing = await conveyor(capsys, "models", "list", "--json", server=server)
    assert listing.code == 0, listing.err
    [model] = json.loads(listing.out)["models"]
    assert model["name"] == "models/churn"
    assert model["latest_version"] == "models/churn/versions/1"
    assert model["aliases"] == {"production": "models/churn/versions/1"}
    assert model["risk_tier"] == "RISK_TIER_HIGH"

    table = await conveyor(capsys, "models", "list", server=server)
    assert table.out.splitlines()[1].split() == [
        "churn",
        "payments-ml",
        "high",
        "1",
        "production=1",
    ]
    shown = await conveyor(capsys, "models", "show", "churn", server=server)
    assert "tabular, fraud" in shown.out
    assert "-> models/churn/versions/1 (revision 1" in shown.out
    assert "first release" in shown.out
    shown_json = json.loads(
        (await conveyor(capsys, "models", "show", "churn", "--json", server=server)).out
    )
    assert [a["name"] for a in shown_json["aliases"]] == ["models/churn/aliases/production"]


async def test_download_resumes_from_a_truncated_partial_file(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await create_churn(capsys, server)
    data = artifact(2 * MIB + 5, seed=2)
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    await upload(capsys, server, source)
    target = tmp_path / "out.onnx"
    partial = tmp_path / "out.onnx.part"
    partial.write_bytes(data[: MIB + 123])

    result = await conveyor(
        capsys, "models", "download", "churn@latest", "-o", str(target), "--resume", server=server
    )

    assert result.code == 0, result.err
    assert f"at byte {MIB + 123}" in result.err
    assert target.read_bytes() == data
    assert not partial.exists()
    assert not (tmp_path / "out.onnx.part.json").exists()


async def test_resume_continues_the_version_the_partial_file_belongs_to(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await create_churn(capsys, server)
    first, second = artifact(MIB + 1, seed=3), artifact(MIB + 1, seed=4)
    for i, data in enumerate((first, second)):
        (tmp_path / f"v{i}").write_bytes(data)
        await upload(capsys, server, tmp_path / f"v{i}")
    await conveyor(
        capsys, "models", "alias", "set", "churn", "production", "1", "--reason", "r", server=server
    )
    target = tmp_path / "out.onnx"
    # A download of churn@production (then version 1) was interrupted after 1000 bytes ...
    (tmp_path / "out.onnx.part").write_bytes(first[:1000])
    record = {
        "model_version": "models/churn/versions/1",
        "sha256": hashlib.sha256(first).hexdigest(),
        "size_bytes": len(first),
    }
    (tmp_path / "out.onnx.part.json").write_text(json.dumps(record))
    # ... and the alias moved before it was resumed.
    await conveyor(
        capsys, "models", "alias", "set", "churn", "production", "2", "--reason", "r", server=server
    )

    result = await conveyor(
        capsys,
        "models",
        "download",
        "churn@production",
        "-o",
        str(target),
        "--resume",
        server=server,
    )

    assert result.code == 0, result.err
    assert target.read_bytes() == first
    assert result.out.startswith("models/churn/versions/1 -> ")


async def test_resume_refuses_a_partial_file_of_other_bytes(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await create_churn(capsys, server)
    data = artifact(MIB, seed=5)
    (tmp_path / "model.onnx").write_bytes(data)
    await upload(capsys, server, tmp_path / "model.onnx")
    target = tmp_path / "out.onnx"
    partial = tmp_path / "out.onnx.part"

    partial.write_bytes(b"x" * 1000)  # right length so far, wrong bytes: caught at the end
    result = await conveyor(
        capsys,
        "models",
        "download",
        "churn/versions/1",
        "-o",
        str(target),
        "--resume",
        server=server,
    )
    assert result.code == 1
    assert "\nconveyor: DATA_LOSS: " in result.err
    assert not target.exists()
    assert not partial.exists()

    partial.write_bytes(b"x" * (len(data) + 1))  # longer than the artifact
    result = await conveyor(
        capsys,
        "models",
        "download",
        "churn/versions/1",
        "-o",
        str(target),
        "--resume",
        server=server,
    )
    assert result.code == 1
    assert result.err.startswith("resuming models/churn/versions/1 at byte")
    assert "conveyor: INVALID_ARGUMENT: " in result.err
    assert "without --resume" in result.err
    assert not target.exists()


async def test_an_unknown_model_is_not_found_without_a_traceback(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv in (
        ("models", "show", "nope"),
        ("models", "versions", "nope"),
        ("models", "alias", "list", "nope"),
        ("models", "download", "nope@latest", "-o", str(tmp_path / "f")),
    ):
        result = await conveyor(capsys, *argv, server=server)
        assert result.code == 1, argv
        assert result.err.startswith("conveyor: NOT_FOUND: "), result.err
        assert "models/nope" in result.err
        assert "\nhint: " in result.err
        assert "Traceback" not in result.err
        assert result.out == ""
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # noqa: ASYNC240


async def test_bad_input_prints_the_field_violations(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await create_churn(capsys, server)
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    result = await conveyor(
        capsys,
        "models",
        "upload",
        "churn",
        str(tmp_path / "model.onnx"),
        "--format",
        "onnx_fp32",
        server=server,
    )
    assert result.code == 1
    assert "conveyor: INVALID_ARGUMENT: " in result.err
    assert "signature" in result.err
    assert "fix the fields named above" in result.err

    taken = await conveyor(
        capsys,
        "models",
        "create",
        "churn",
        "--owner-team",
        "t",
        "--risk-tier",
        "low",
        server=server,
    )
    assert taken.code == 1
    assert taken.err.startswith("conveyor: ALREADY_EXISTS: ")


async def test_alias_compare_and_set_and_delete(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await create_churn(capsys, server)
    (tmp_path / "model.onnx").write_bytes(b"onnx-bytes")
    await upload(capsys, server, tmp_path / "model.onnx")
    await upload(capsys, server, tmp_path / "model.onnx")

    def set_alias(version: str, expected: str) -> list[str]:
        return [
            "models",
            "alias",
            "set",
            "churn",
            "canary",
            version,
            "--reason",
            "try",
            "--expected",
            expected,
        ]

    assert (await conveyor(capsys, *set_alias("1", "-"), server=server)).code == 0
    stale = await conveyor(capsys, *set_alias("2", "-"), server=server)
    assert stale.code == 1
    assert stale.err.startswith("conveyor: ABORTED: ")
    assert "--expected" in stale.err
    moved = await conveyor(capsys, *set_alias("2", "1"), server=server)
    assert moved.code == 0, moved.err
    assert "(was models/churn/versions/1)" in moved.out

    listed = await conveyor(capsys, "models", "alias", "list", "churn", "--json", server=server)
    [alias] = json.loads(listed.out)["aliases"]
    assert (alias["version"], alias["previous_version"]) == (
        "models/churn/versions/2",
        "models/churn/versions/1",
    )
    deleted = await conveyor(
        capsys, "models", "alias", "delete", "churn", "canary", "--reason", "done", server=server
    )
    assert deleted.code == 0, deleted.err
    listed = await conveyor(capsys, "models", "alias", "list", "churn", "--json", server=server)
    assert json.loads(listed.out) == {"aliases": []}


async def test_list_follows_every_page_and_filters(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_cli, "PAGE_SIZE", 2)
    for i in range(5):
        tags = ("--tag", "fraud") if i % 2 else ()
        result = await conveyor(
            capsys,
            "models",
            "create",
            f"m{i}",
            "--owner-team",
            "t",
            "--risk-tier",
            "low",
            *tags,
            server=server,
        )
        assert result.code == 0, result.err

    listing = await conveyor(capsys, "models", "list", "--json", server=server)
    assert [m["name"] for m in json.loads(listing.out)["models"]] == [
        f"models/m{i}" for i in range(5)
    ]
    filtered = await conveyor(capsys, "models", "list", "--filter", 'tags:"fraud"', server=server)
    assert [line.split()[0] for line in filtered.out.splitlines()[1:]] == ["m1", "m3"]


async def test_an_unreachable_registry_says_where_it_looked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await conveyor(
        capsys, "models", "list", "--registry", f"127.0.0.1:{port}", "--timeout", "5"
    )
    assert result.code == 1
    assert result.err.startswith("conveyor: UNAVAILABLE: ")
    assert f"is a registry running at 127.0.0.1:{port}?" in result.err
    assert "Traceback" not in result.err


async def test_backup_and_restore_serve_the_same_bytes(
    server: ConveyorServer,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("conveyor.services.registry.backup")
    # The restored registry keeps the source's secret store (its local key
    # directory): it unwraps the data keys of the encrypted blobs.
    monkeypatch.setenv("CONVEYOR_SECRETS_LOCAL_DIR", str(tmp_path / "data" / "secrets"))
    await create_churn(capsys, server)
    data = artifact(MIB + 3, seed=6)
    (tmp_path / "model.onnx").write_bytes(data)
    await upload(capsys, server, tmp_path / "model.onnx")

    backup = await conveyor(
        capsys,
        "registry",
        "backup",
        str(tmp_path / "snapshot"),
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert backup.code == 0, backup.err
    assert backup.out.startswith(f"registry backed up to {tmp_path / 'snapshot'}")
    assert "blobs: 1 (1.0 MiB)" in backup.out
    restored_dir = tmp_path / "restored"
    restore = await conveyor(
        capsys, "registry", "restore", str(tmp_path / "snapshot"), "--data-dir", str(restored_dir)
    )
    assert restore.code == 0, restore.err
    again = await conveyor(
        capsys, "registry", "restore", str(tmp_path / "snapshot"), "--data-dir", str(restored_dir)
    )
    assert again.code == 1
    assert again.err.startswith("conveyor: FAILED_PRECONDITION: ")

    restored = await build_server(RegistrySettings(data_dir=restored_dir))
    try:
        target = tmp_path / "out.onnx"
        result = await conveyor(
            capsys, "models", "download", "churn/versions/1", "-o", str(target), server=restored
        )
        assert result.code == 0, result.err
        assert target.read_bytes() == data
    finally:
        await restored.shutdown()


async def test_health_and_usage_still_work(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    health = await conveyor(capsys, "health", f"127.0.0.1:{server.port}")
    assert (health.code, health.out) == (0, f"127.0.0.1:{server.port}: SERVING\n")
    usage = await conveyor(capsys, "models")
    assert usage.code == 2
    assert "download" in usage.err
