"""``conveyor alerts …`` against a real registry and monitor.

A rule made with ``alerts rules create`` opens an alert when drifted windows
arrive; ``watch --until-firing`` returns as it fires, ``list``, ``show`` and
``ack`` print what the API holds, ``--json`` is the API's own messages, and
failed calls say what to do next. The commands go through an ``argparse``
parser built by :func:`add_alerts_commands` (what ``conveyor`` mounts), each
in a worker thread, as the CLI runs its own event loop. The last test runs
``watch`` as its own process: it outlives a monitor restart and stops on a
real Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import monitor_service_pb2_grpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.services.monitor.alerts_cli import add_alerts_commands
from conveyor.services.monitor.server import build_monitor
from tests.monitor.conftest import Suite
from tests.monitor.test_service_alert_lifecycle import create_rule, monitored, outliers
from tests.support.suite import free_port

ROOT = Path(__file__).resolve().parents[2]
ALERT_HEADERS = ["ALERT", "STATE", "SEVERITY", "VERSION", "RULE", "VALUE", "THRESHOLD", "OPENED"]
SCRIPT = """
import argparse, sys
from conveyor.services.monitor.alerts_cli import add_alerts_commands
parser = argparse.ArgumentParser(prog="conveyor")
add_alerts_commands(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def parser() -> argparse.ArgumentParser:
    """``conveyor`` with only its ``alerts`` commands."""
    parser = argparse.ArgumentParser(prog="conveyor")
    add_alerts_commands(parser.add_subparsers(dest="command"))
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    code: int = args.handler(args)
    return code


def address(suite: Suite) -> str:
    return f"127.0.0.1:{suite.parts.server.port}"


async def conveyor(capsys: pytest.CaptureFixture[str], suite: Suite, *argv: str) -> Result:
    """``conveyor alerts *argv --monitor <the suite's>`` in a worker thread."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["alerts", *argv, "--monitor", address(suite)])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["alerts", *argv])
    assert exited.value.code == 2
    return capsys.readouterr().err


async def test_a_rule_fires_and_its_alert_is_listed_shown_and_acknowledged(
    suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await suite.register("fraud")
    windows = await monitored(suite, create=False, seed=5)  # v2, now in production
    created = await conveyor(
        capsys, suite, "rules", "create", "fraud-drift", "--model", "fraud",
        "--drift", "dataset", "--severity", "critical", "--rollback", "production",
    )  # fmt: skip
    assert created.code == 0, created.err
    assert "rule:          alertRules/fraud-drift" in created.out
    assert "condition:     dataset drift" in created.out
    assert "opens after 1 breaching window in a row, resolves after 1 clear window" in created.out
    assert "actions:       rollback production" in created.out

    # The watch starts before the drifted window; it returns as the alert fires.
    until_firing = ["watch", "--model", "fraud", "--until-firing", "--timeout", "30"]
    argv = ["alerts", *until_firing, "--monitor", address(suite)]
    watch = asyncio.create_task(asyncio.to_thread(main, argv))
    await asyncio.sleep(0.3)
    await windows.shifted()
    assert await asyncio.wait_for(watch, 30) == 0
    watched = capsys.readouterr().out.splitlines()
    await suite.parts.alerts.settled()  # the rollback has run
    (alert,) = (await suite.monitor.ListAlerts(rpc.ListAlertsRequest(), timeout=10)).alerts
    alert_id = alert.name.removeprefix("alerts/")
    assert alert.state == pb.ALERT_STATE_FIRING
    assert len(watched) == 1
    kind, *fields = watched[0].split()[2:7]
    assert kind in ("opened", "existing")  # "existing" when the watch started late
    assert fields == [alert_id, "fraud@2", "firing/critical", "fraud-drift:"]
    assert "dataset drift" in watched[0]

    listed = await conveyor(capsys, suite, "list", "--model", "fraud")
    assert listed.code == 0, listed.err
    header, row = listed.out.splitlines()
    assert header.split()[:8] == ALERT_HEADERS
    assert row.split()[:7] == [
        alert_id, "firing", "critical", "fraud@2", "fraud-drift",
        f"{alert.value:.4g}", f"{alert.threshold:.4g}",
    ]  # fmt: skip
    assert row.endswith(alert.summary)
    as_json = await conveyor(capsys, suite, "list", "--state", "open", "--json")
    assert as_json.json()["alerts"][0]["name"] == alert.name
    assert as_json.json()["alerts"][0]["state"] == "ALERT_STATE_FIRING"
    none = await conveyor(capsys, suite, "list", "--state", "resolved", "--rule", "fraud-drift")
    assert (none.code, none.out, none.err) == (0, "", "no alerts match\n")

    shown = await conveyor(capsys, suite, "show", alert_id)
    assert shown.code == 0, shown.err
    assert f"alert:           {alert.name}" in shown.out
    assert "state:           firing" in shown.out
    assert "trigger window:  0 (closed): 200 rows" in shown.out
    assert "acknowledged:    -" in shown.out
    action = shown.out.splitlines()[-1].split()
    assert action[:3] == ["rollback", "succeeded", "models/fraud@production"]
    aliases = await suite.registry.ListAliases(
        registry_rpc.ListAliasesRequest(parent="models/fraud"), timeout=10
    )
    production = {a.name: a.version for a in aliases.aliases}["models/fraud/aliases/production"]
    assert production == first  # the rule's rollback moved it back

    acked = await conveyor(capsys, suite, "ack", alert.name, "--comment", "on it")
    assert acked.code == 0, acked.err
    assert acked.out.startswith(f"{alert.name} acknowledged by ")
    assert acked.out.rstrip().endswith("it stays open until its condition clears")
    after = (await conveyor(capsys, suite, "show", alert_id, "--json")).json()["alert"]
    assert after["state"] == "ALERT_STATE_ACKNOWLEDGED"
    assert after["acknowledge_comment"] == "on it"

    rules = await conveyor(capsys, suite, "rules", "list", "--model", "fraud")
    assert rules.out.splitlines()[1].split() == [
        "fraud-drift", "fraud", "every", "dataset", "drift", "1/1", "critical",
        "rollback", "production", "yes",
    ]  # fmt: skip
    (rule,) = (await conveyor(capsys, suite, "rules", "list", "--json")).json()["alert_rules"]
    assert rule["drift"] == {"scope": "DRIFT_SCOPE_DATASET"}
    assert rule["actions"] == [{"rollback": {"alias": "production"}}]

    # A bounded watch prints the open alert (JSON Lines) and ends with 0; an
    # acknowledged alert is not firing, so --until-firing waits in vain.
    snapshot = await conveyor(capsys, suite, "watch", "--json", "--timeout", "0.5")
    assert snapshot.code == 0, snapshot.err
    (event,) = [json.loads(line) for line in snapshot.out.splitlines()]
    assert (event["type"], event["alert"]["name"]) == ("ALERT_EVENT_TYPE_EXISTING", alert.name)
    waited = await conveyor(
        capsys, suite, "watch", "--model", "fraud", "--until-firing", "--timeout", "0.5"
    )
    assert waited.code == 1
    assert (
        "conveyor: no alert of models/fraud fired in 0.5 s (acknowledged alerts do not count)"
        in waited.err
    )
    assert "hint: `conveyor alerts rules list` shows the rules" in waited.err

    deleted = await conveyor(capsys, suite, "rules", "delete", "fraud-drift")
    assert deleted.out.startswith("deleted alertRules/fraud-drift; its open alerts are resolved")
    late = await conveyor(capsys, suite, "ack", alert_id)
    assert late.code == 1
    assert late.err.startswith("conveyor: FAILED_PRECONDITION: ")
    assert "[ALERT_RESOLVED]" in late.err
    assert "hint: the alert has resolved, so there is nothing to acknowledge: " in late.err
    assert f"`conveyor alerts show {alert_id}`" in late.err


async def test_failures_say_what_to_do_next(
    suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    await monitored(suite)  # fraud, version 1, with a reference of x0 to x3
    unknown = await conveyor(capsys, suite, "show", "alert-nope")
    assert unknown.code == 1
    assert unknown.err.startswith("conveyor: NOT_FOUND: ")
    assert "hint: check the id: `conveyor alerts list` shows the alerts" in unknown.err

    invalid = await conveyor(
        capsys, suite, "rules", "create", "rate", "--model", "fraud", "--outlier-rate", "1.5",
        "--trigger-windows", "101",
    )  # fmt: skip
    assert invalid.code == 1
    assert invalid.err.startswith("conveyor: INVALID_ARGUMENT: ")
    assert "alert_rule.outliers.max_outlier_rate" in invalid.err
    assert "alert_rule.trigger_windows" in invalid.err
    assert "hint: fix --outlier-rate, --trigger-windows and run the command again" in invalid.err

    no_model = await conveyor(
        capsys, suite, "rules", "create", "drift", "--model", "nope", "--drift", "dataset"
    )
    assert no_model.err.startswith("conveyor: NOT_FOUND: ")
    assert "hint: check the name: `conveyor models versions nope`" in no_model.err

    made = await conveyor(
        capsys, suite, "rules", "create", "rate", "--model", "models/fraud", "--version", "1",
        "--outlier-rate", "0.2", "--json",
    )  # fmt: skip
    assert made.json()["alert_rule"]["model_version"] == "models/fraud/versions/1"
    taken = await conveyor(
        capsys, suite, "rules", "create", "rate", "--model", "fraud", "--outlier-rate", "0.2"
    )
    assert taken.err.startswith("conveyor: ALREADY_EXISTS: ")
    assert "hint: the id is taken: `conveyor alerts rules show rate` shows that rule" in taken.err
    performance = await conveyor(
        capsys, suite, "rules", "create", "decay", "--model", "fraud", "--performance",
        "accuracy", "--max-degradation", "0.05", "--trigger-windows", "2",
        "--resolve-windows", "3", "--retrain",
    )  # fmt: skip
    assert performance.code == 0, performance.err
    shown = await conveyor(capsys, suite, "rules", "show", "decay")
    assert "condition:     accuracy down by more than 0.05" in shown.out
    assert "opens after 2 breaching windows in a row, resolves after 3 clear windows" in shown.out
    assert "actions:       retrain" in shown.out
    feature = await conveyor(
        capsys,
        suite,
        "rules",
        "create",
        "x9",
        "--model",
        "fraud",
        "--version",
        "1",
        "--drift",
        "x9",
    )
    assert feature.err.startswith("conveyor: INVALID_ARGUMENT: ")
    assert "models/fraud/versions/1 has no feature 'x9'; its features: x0, x1" in feature.err
    assert "hint: fix --drift and run the command again" in feature.err
    stray = await conveyor(
        capsys, suite, "rules", "create", "r", "--model", "fraud", "--outlier-rate", "0.1",
        "--burn-rate", "2",
    )  # fmt: skip
    assert stray.code == 1
    assert stray.err == (
        "conveyor: INVALID_ARGUMENT: --burn-rate applies to a --slo condition only\n"
        "hint: add --slo or leave --burn-rate out\n"
    )
    gone = await conveyor(capsys, suite, "rules", "delete", "alertRules/nope")
    assert gone.err.startswith("conveyor: NOT_FOUND: ")
    assert "hint: check the id: `conveyor alerts rules list` shows the rules" in gone.err

    capsys.readouterr()
    nowhere = f"127.0.0.1:{free_port()}"
    down = await asyncio.to_thread(main, ["alerts", "list", "--monitor", nowhere])
    err = capsys.readouterr().err
    assert down == 1
    assert err.startswith("conveyor: UNAVAILABLE: ")
    assert f"hint: is a monitor running at {nowhere}?" in err

    assert "one of the arguments --drift --outlier-rate" in usage_error(
        capsys, "rules", "create", "x", "--model", "fraud"
    )
    assert "expected MODEL or models/MODEL" in usage_error(
        capsys, "list", "--model", "fraud@production"
    )
    assert "invalid choice: 'open'" in usage_error(
        capsys,
        "rules",
        "create",
        "x",
        "--model",
        "f",
        "--outlier-rate",
        "0.1",
        "--severity",
        "open",
    )


async def test_watch_resumes_across_a_monitor_restart_and_stops_on_ctrl_c(suite: Suite) -> None:
    windows = await monitored(suite)
    await create_rule(suite, "outliers", **outliers())
    await windows.outlying()
    port = suite.parts.server.port
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, "alerts", "watch", "--json", "--monitor", f"127.0.0.1:{port}",
        cwd=ROOT, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None
    assert watch.stderr is not None

    async def next_event() -> dict[str, Any]:
        line = await asyncio.wait_for(watch.stdout.readline(), 30)  # type: ignore[union-attr]
        assert line, (await watch.stderr.read()).decode()  # type: ignore[union-attr]
        event: dict[str, Any] = json.loads(line)
        return event

    try:
        existing = await next_event()
        await suite.parts.server.shutdown()
        settings = suite.settings.model_copy(update={"listen": f"127.0.0.1:{port}"})
        restarted = await build_monitor(settings)  # the same port and data
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = monitor_service_pb2_grpc.MonitorServiceStub(channel)
                request = rpc.AcknowledgeAlertRequest(name=existing["alert"]["name"])
                await stub.AcknowledgeAlert(request, timeout=10)
            acknowledged = await next_event()
            watch.send_signal(signal.SIGINT)
            try:
                code = await asyncio.wait_for(watch.wait(), 60)
            except TimeoutError:
                # Hung: SIGABRT makes faulthandler print every thread's stack.
                watch.send_signal(signal.SIGABRT)
                await watch.wait()
                stacks = (await watch.stderr.read()).decode()  # type: ignore[union-attr]
                pytest.fail(f"the watch did not exit on SIGINT; its stacks:\n{stacks}")
        finally:
            await restarted.server.shutdown()
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    err = (await watch.stderr.read()).decode()

    assert existing["type"] == "ALERT_EVENT_TYPE_EXISTING"
    assert acknowledged["type"] == "ALERT_EVENT_TYPE_ACKNOWLEDGED"
    assert acknowledged["alert"]["name"] == existing["alert"]["name"]
    assert int(acknowledged["sequence"]) > int(existing["sequence"])
    assert "the monitor went away; waiting for it" in err
    assert code == 130
    assert err.rstrip().endswith("conveyor: interrupted")
    assert "Traceback" not in err
