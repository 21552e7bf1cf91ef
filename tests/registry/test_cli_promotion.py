"""``conveyor promote`` and ``conveyor rollback`` against a real registry.

The registry here has no policy service, so no gate applies: these tests are
about the alias moves, their compare-and-set and the failures a person meets.
A gate's refusal, as printed, is tested with the whole suite
(``tests/e2e/test_lifecycle.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.shared.server import ConveyorServer
from tests.registry.test_cli import conveyor, create_churn, server, upload

__all__ = ["server"]  # the fixture, imported for these tests


async def three_versions(
    capsys: pytest.CaptureFixture[str], server: ConveyorServer, tmp_path: Path
) -> None:
    await create_churn(capsys, server)
    for number in range(3):
        path = tmp_path / f"model-{number}.onnx"
        path.write_bytes(f"model {number}".encode() * 100)
        await upload(capsys, server, path)


async def test_promote_moves_the_alias_and_rollback_moves_it_back(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await three_versions(capsys, server, tmp_path)
    first = await conveyor(capsys, "promote", "churn@1", "--reason", "first", server=server)
    assert first.code == 0, first.err
    assert (
        first.out.strip()
        == "models/churn/aliases/production -> models/churn/versions/1, revision 1"
    )
    second = await conveyor(
        capsys, "promote", "models/churn/versions/3", "--reason", "better", server=server
    )
    assert second.code == 0, second.err
    assert "-> models/churn/versions/3 (was models/churn/versions/1), revision 2" in second.out
    again = await conveyor(capsys, "promote", "churn@3", "--reason", "again", server=server)
    assert again.code == 0
    assert again.err.strip() == "models/churn@production already points at models/churn/versions/3"
    assert again.out == ""

    back = await conveyor(capsys, "rollback", "churn", "--reason", "drift", server=server)
    assert back.code == 0, back.err
    assert "-> models/churn/versions/1 (was models/churn/versions/3), revision 3" in back.out
    pinned = await conveyor(
        capsys, "rollback", "churn", "--to-version", "2", "--reason", "pin", server=server
    )
    assert pinned.code == 0, pinned.err
    assert "-> models/churn/versions/2 (was models/churn/versions/1), revision 4" in pinned.out
    listed = await conveyor(capsys, "models", "alias", "list", "churn", "--json", server=server)
    assert '"version": "models/churn/versions/2"' in listed.out
    scripted = await conveyor(
        capsys, "rollback", "churn", "--json", "--reason", "script", server=server
    )
    alias = json.loads(scripted.out)
    assert alias["version"] == "models/churn/versions/1"
    assert alias["previous_version"] == "models/churn/versions/2"
    assert alias["reason"] == "script"


async def test_staging_takes_an_alias_promoted_by_alias(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await three_versions(capsys, server, tmp_path)
    staged = await conveyor(
        capsys, "promote", "churn@2", "--to", "staging", "--reason", "try", server=server
    )
    assert staged.code == 0, staged.err
    # MODEL@ALIAS promotes the version the alias points at now.
    promoted = await conveyor(
        capsys, "promote", "churn@staging", "--reason", "tried", server=server
    )
    assert promoted.code == 0, promoted.err
    assert "production -> models/churn/versions/2" in promoted.out


async def test_failures_say_what_to_do_next(
    server: ConveyorServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await three_versions(capsys, server, tmp_path)
    missing_alias = await conveyor(capsys, "rollback", "churn", "--reason", "x", server=server)
    assert missing_alias.code == 1
    assert "conveyor: NOT_FOUND: models/churn/aliases/production does not exist" in (
        missing_alias.err
    )
    assert "conveyor models alias list churn" in missing_alias.err

    await conveyor(capsys, "promote", "churn@1", "--reason", "first", server=server)
    nothing_before = await conveyor(capsys, "rollback", "churn", "--reason", "x", server=server)
    assert nothing_before.code == 1
    assert "has never pointed at another version" in nothing_before.err
    assert "--to-version N" in nothing_before.err

    unknown = await conveyor(capsys, "promote", "churn@9", "--reason", "x", server=server)
    assert unknown.code == 1
    assert "conveyor: NOT_FOUND" in unknown.err
    assert "conveyor models versions churn" in unknown.err

    unknown_alias = await conveyor(
        capsys, "promote", "churn@canary", "--reason", "x", server=server
    )
    assert unknown_alias.code == 1
    assert "NOT_FOUND" in unknown_alias.err

    with pytest.raises(SystemExit) as usage:
        await conveyor(capsys, "promote", "churn", "--reason", "x", server=server)
    assert usage.value.code == 2
    assert "expected MODEL@VERSION" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        await conveyor(capsys, "rollback", "churn", server=server)  # --reason is required
    # Nothing moved through all of that.
    listed = await conveyor(capsys, "models", "alias", "list", "churn", "--json", server=server)
    assert '"version": "models/churn/versions/1"' in listed.out
    assert '"revision": "1"' in listed.out
