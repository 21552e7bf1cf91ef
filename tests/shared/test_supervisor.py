"""The supervisor of ``conveyor up``, with real child processes (tiny ``python -c``
scripts): crashed children restart after a doubling backoff, a child that keeps
crashing is given up on, SIGTERM drains everyone, a child that ignores it is
killed; and ``conveyor up`` itself brings a SIGKILLed service back and drains on
SIGINT.

No assertion bounds how long anything took from above: only orderings, the
recorded backoff delays and lower bounds that the supervisor guarantees (a
restart never comes before its delay has passed).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from conveyor.services.supervisor import (
    ChildSpec,
    Event,
    EventKind,
    Supervisor,
    SupervisorPolicy,
)
from conveyor.shared.health import serving_status
from conveyor.shared.ports import SERVICE_PORTS
from tests.support.suite import free_base_port, free_port

pytestmark = pytest.mark.timeout(120)

FAST = SupervisorPolicy(
    backoff_initial_s=0.05,
    backoff_factor=2.0,
    backoff_max_s=0.15,
    stable_after_s=30.0,
    max_quick_crashes=5,
    startup_timeout_s=30.0,
    poll_interval_s=0.01,
)
"""Small backoffs; ``stable_after_s`` far longer than any of these children runs."""

SLEEPER = "import time; time.sleep(120)"
"""Runs until signalled (SIGTERM's default action ends it: a clean stop)."""

HEALTH_SERVER = textwrap.dedent(
    """
    import sys
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(sys.argv[1])
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.wait_for_termination()
    """
)
"""A gRPC server whose health says SERVING, on the address given."""


def python(code: str, *args: str | Path) -> tuple[str, ...]:
    return (sys.executable, "-c", code, *(str(arg) for arg in args))


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def of(events: list[Event], service: str, *kinds: EventKind) -> list[Event]:
    return [e for e in events if e.service == service and (not kinds or e.kind in kinds)]


@contextmanager
def running(supervisor: Supervisor) -> Iterator[Future[int]]:
    """``supervisor.run()`` in a thread; stopped (and its children gone) on the way out."""
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(supervisor.run)
        try:
            yield result
        finally:
            if not result.done():
                supervisor.request_stop()
                supervisor.request_stop()
            result.result(timeout=60)


def test_a_crashed_child_restarts_after_a_doubling_capped_backoff(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    crasher = textwrap.dedent(
        """
        import pathlib, sys, time
        runs = pathlib.Path(sys.argv[1])
        done = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (done + 1))
        if done < 4:
            sys.exit(3)
        time.sleep(120)
        """
    )
    reports: list[str] = []
    supervisor = Supervisor(
        [
            ChildSpec("steady", python(SLEEPER)),
            ChildSpec("crasher", python(crasher, runs)),
        ],
        FAST,
        report=reports.append,
    )
    with running(supervisor) as result:
        wait_for(lambda: len(of(supervisor.events, "crasher", EventKind.STARTED)) == 5)
        supervisor.request_stop()
        assert result.result(timeout=60) == 0

    events = supervisor.events
    crashes = of(events, "crasher", EventKind.EXITED)
    assert [e.returncode for e in crashes] == [3, 3, 3, 3]
    backoffs = of(events, "crasher", EventKind.BACKOFF)
    assert [e.delay_s for e in backoffs] == [0.05, 0.1, 0.15, 0.15]
    starts = of(events, "crasher", EventKind.STARTED)
    assert [e.restarts for e in starts] == [0, 1, 2, 3, 4]
    for crash, backoff, restart in zip(crashes, backoffs, starts[1:], strict=True):
        assert crash.time <= backoff.time
        assert backoff.delay_s is not None
        assert restart.time >= backoff.time + backoff.delay_s
    # The other child was left alone and both drained on the stop request.
    assert [e.kind for e in of(events, "steady")] == [
        EventKind.STARTED,
        EventKind.READY,
        EventKind.DRAINING,
        EventKind.STOPPED,
    ]
    assert not of(events, "crasher", EventKind.GAVE_UP, EventKind.KILLED)
    assert any("crasher (pid" in r and "exited with code 3" in r for r in reports)
    assert any("restarting it in 0.05 s (restart 1;" in r for r in reports)
    assert reports[-1] == "every service stopped cleanly"


def test_a_child_that_stayed_up_long_enough_restarts_after_the_initial_backoff() -> None:
    policy = SupervisorPolicy(
        backoff_initial_s=0.05,
        backoff_max_s=10,
        stable_after_s=0.1,
        max_quick_crashes=2,
        poll_interval_s=0.01,
    )
    supervisor = Supervisor(
        [ChildSpec("flaky", python("import sys, time; time.sleep(0.5); sys.exit(1)"))],
        policy,
        report=lambda _line: None,
    )
    with running(supervisor):
        wait_for(lambda: len(of(supervisor.events, "flaky", EventKind.BACKOFF)) == 3)
        supervisor.request_stop()

    # Each crash came 0.5 s after a start, later than stable_after_s: a new
    # streak every time, so neither the delay grows nor is the child given up.
    backoffs = of(supervisor.events, "flaky", EventKind.BACKOFF)
    assert [e.delay_s for e in backoffs] == [0.05, 0.05, 0.05]
    assert not of(supervisor.events, "flaky", EventKind.GAVE_UP)


def test_a_child_that_keeps_crashing_is_given_up_on_and_the_others_keep_running() -> None:
    reports: list[str] = []
    policy = SupervisorPolicy(backoff_initial_s=0.05, max_quick_crashes=3, poll_interval_s=0.01)
    supervisor = Supervisor(
        [
            ChildSpec("steady", python(SLEEPER)),
            ChildSpec("doomed", python("import sys; sys.exit(7)")),
        ],
        policy,
        report=reports.append,
    )
    with running(supervisor) as result:
        wait_for(lambda: of(supervisor.events, "doomed", EventKind.GAVE_UP))
        steady = supervisor.pid("steady")
        assert steady is not None
        supervisor.request_stop()
        # Something was given up on: not a clean run.
        assert result.result(timeout=60) == 1

    events = supervisor.events
    assert [e.kind for e in of(events, "doomed")] == [
        EventKind.STARTED,
        EventKind.READY,
        EventKind.EXITED,
        EventKind.BACKOFF,
        EventKind.STARTED,
        EventKind.READY,
        EventKind.EXITED,
        EventKind.BACKOFF,
        EventKind.STARTED,
        EventKind.READY,
        EventKind.EXITED,
        EventKind.GAVE_UP,
    ]
    assert [e.delay_s for e in of(events, "doomed", EventKind.BACKOFF)] == [0.05, 0.1]
    # The steady child kept its one process until the stop request.
    assert [e.kind for e in of(events, "steady")] == [
        EventKind.STARTED,
        EventKind.READY,
        EventKind.DRAINING,
        EventKind.STOPPED,
    ]
    assert {e.pid for e in of(events, "steady")} == {steady}
    gave_up = [r for r in reports if r.startswith("GIVING UP on doomed")]
    assert len(gave_up) == 1
    assert "exited with code 7" in gave_up[0]
    assert "3 times in a row" in gave_up[0]
    assert "the other services keep running" in gave_up[0]


def test_children_start_in_order_once_serving_and_a_failed_first_start_stops_all() -> None:
    first, second = free_port(), free_port()
    reports: list[str] = []
    supervisor = Supervisor(
        [
            ChildSpec("first", python(HEALTH_SERVER, f"127.0.0.1:{first}"), f"127.0.0.1:{first}"),
            ChildSpec("broken", python("import sys; sys.exit(2)"), f"127.0.0.1:{second}"),
            ChildSpec("never", python(SLEEPER)),
        ],
        FAST,
        report=reports.append,
    )
    assert supervisor.run() == 1

    events = supervisor.events
    assert [(e.service, e.kind) for e in events] == [
        ("first", EventKind.STARTED),
        ("first", EventKind.READY),
        ("broken", EventKind.STARTED),
        ("broken", EventKind.EXITED),
        ("broken", EventKind.FAILED_START),
        ("first", EventKind.DRAINING),
        ("first", EventKind.STOPPED),
    ]
    assert of(events, "broken", EventKind.EXITED)[0].returncode == 2
    assert f"first ready on 127.0.0.1:{first} (pid" in reports[0]
    assert "broken (pid" in reports[1]
    assert "exited with code 2 at its first start; stopping" in reports[1]


def test_a_wave_starts_together_once_the_child_before_it_is_ready() -> None:
    ports = [free_port() for _ in range(4)]
    servers = [
        ChildSpec(
            name,
            python(HEALTH_SERVER, f"127.0.0.1:{port}"),
            f"127.0.0.1:{port}",
            starts_with_previous=together,
        )
        for name, port, together in zip(
            ("base", "a", "b", "last"), ports, (False, False, True, False), strict=True
        )
    ]
    supervisor = Supervisor(servers, FAST, report=lambda _: None)
    events: list[tuple[str, EventKind]] = []

    def stop_once_ready() -> None:
        events.extend((e.service, e.kind) for e in supervisor.events)
        supervisor.request_stop()

    assert supervisor.run(on_ready=stop_once_ready) == 0
    started = [(service, kind) for service, kind in events if kind is EventKind.STARTED]
    assert [service for service, _ in started] == ["base", "a", "b", "last"]
    order = [f"{service}:{kind.name}" for service, kind in events]
    # a and b both start once base is ready, before either of them is; last
    # waits for both.
    assert order.index("base:READY") < order.index("a:STARTED")
    assert order.index("b:STARTED") < min(order.index("a:READY"), order.index("b:READY"))
    assert max(order.index("a:READY"), order.index("b:READY")) < order.index("last:STARTED")


def test_sigterm_drains_every_child_and_exits_0(tmp_path: Path) -> None:
    polite = textwrap.dedent(
        """
        import os, pathlib, signal, sys, time
        marker = pathlib.Path(sys.argv[1])
        def drain(signum, frame):
            time.sleep(0.1)  # in-flight work
            marker.with_suffix(".drained").write_text("")
            sys.exit(0)
        signal.signal(signal.SIGTERM, drain)
        marker.write_text(str(os.getpid()))
        time.sleep(120)
        """
    )
    supervise = textwrap.dedent(
        """
        import sys
        from conveyor.services.supervisor import ChildSpec, Supervisor, SupervisorPolicy
        code, directory = sys.argv[1], sys.argv[2]
        children = [
            ChildSpec(name, (sys.executable, "-c", code, f"{directory}/{name}.pid"))
            for name in ("a", "b", "c")
        ]
        supervisor = Supervisor(children, SupervisorPolicy(poll_interval_s=0.01))
        with supervisor.stopping_on_signals():
            sys.exit(supervisor.run())
        """
    )
    process = subprocess.Popen(
        python(supervise, polite, tmp_path), stderr=subprocess.PIPE, text=True
    )
    try:
        markers = [tmp_path / f"{name}.pid" for name in ("a", "b", "c")]
        wait_for(lambda: all(m.exists() and m.read_text() for m in markers))
        pids = [int(m.read_text()) for m in markers]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert all(m.with_suffix(".drained").exists() for m in markers)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "draining c, b, a (SIGTERM" in stderr
    assert stderr.rstrip().endswith("every service stopped cleanly")


def test_a_child_ignoring_sigterm_is_killed_after_its_bound_and_reported(tmp_path: Path) -> None:
    marker = tmp_path / "ignoring"
    stubborn = textwrap.dedent(
        """
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path(sys.argv[1]).write_text("")
        time.sleep(120)
        """
    )
    reports: list[str] = []
    supervisor = Supervisor(
        [
            ChildSpec("polite", python(SLEEPER)),
            ChildSpec("stubborn", python(stubborn, marker), drain_timeout_s=0.3),
        ],
        FAST,
        report=reports.append,
    )
    with running(supervisor) as result:
        wait_for(marker.exists)
        supervisor.request_stop()
        assert result.result(timeout=60) == 1

    events = supervisor.events
    [drained] = of(events, "stubborn", EventKind.DRAINING)
    [killed] = of(events, "stubborn", EventKind.KILLED)
    assert killed.returncode == -signal.SIGKILL
    assert killed.time >= drained.time + 0.3
    assert [e.returncode for e in of(events, "polite", EventKind.STOPPED)] == [-signal.SIGTERM]
    assert any(
        "stubborn (pid" in r and "did not stop within 0.3 s of SIGTERM; killed it" in r
        for r in reports
    )
    assert "every service stopped cleanly" not in reports


def test_a_second_stop_request_kills_at_once(tmp_path: Path) -> None:
    marker = tmp_path / "ignoring"
    stubborn = textwrap.dedent(
        """
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path(sys.argv[1]).write_text("")
        time.sleep(120)
        """
    )
    reports: list[str] = []
    supervisor = Supervisor(
        [ChildSpec("stubborn", python(stubborn, marker), drain_timeout_s=600)],
        FAST,
        report=reports.append,
    )
    with running(supervisor) as result:
        wait_for(marker.exists)
        supervisor.request_stop()
        wait_for(lambda: of(supervisor.events, "stubborn", EventKind.DRAINING))
        supervisor.request_stop()
        assert result.result(timeout=60) == 1
    [killed] = of(supervisor.events, "stubborn", EventKind.KILLED)
    assert killed.returncode == -signal.SIGKILL
    assert "killing stubborn at once" in reports


def test_the_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="backoff_initial_s"):
        SupervisorPolicy(backoff_initial_s=0)
    with pytest.raises(ValueError, match="max_quick_crashes"):
        SupervisorPolicy(max_quick_crashes=0)
    with pytest.raises(ValueError, match="unique"):
        Supervisor([ChildSpec("a", ("true",)), ChildSpec("a", ("true",))])


def _port_free(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_conveyor_up_restarts_a_killed_service_and_drains_on_sigint(tmp_path: Path) -> None:
    services = ("policy", "registry")
    base = free_base_port()  # never the default ports: a developer's suite may hold them
    addresses = {
        name: f"127.0.0.1:{base + SERVICE_PORTS[name] - min(SERVICE_PORTS.values()) + 1}"
        for name in services
    }
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor.services.cli",
                "up",
                "--services",
                "registry,policy",
                "--data-dir",
                str(tmp_path / "data"),
                "--base-port",
                str(base),
            ],
            stdout=stdout,
            stderr=stderr,
        )

    def ready_pids(name: str) -> list[int]:
        pattern = rf"conveyor up: {name} ready on {re.escape(addresses[name])} \(pid (\d+)"
        return [int(pid) for pid in re.findall(pattern, err.read_text())]

    try:
        wait_for(lambda: "Ctrl-C drains" in out.read_text())
        # Started in catalog order (policy first), whatever order --services gave.
        log = err.read_text()
        assert log.index("policy ready on") < log.index("registry ready on")
        [registry] = ready_pids("registry")
        os.kill(registry, signal.SIGKILL)
        wait_for(lambda: len(ready_pids("registry")) == 2)
        assert serving_status(addresses["registry"]) == "SERVING"
        assert re.search(
            rf"registry \(pid {registry}\) killed by SIGKILL .*restarting it in 1 s \(restart 1;",
            err.read_text(),
        )
        children = ready_pids("policy") + ready_pids("registry")[1:]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:  # the test failed: leave no process behind
            up.kill()
            up.wait()
            for pid in ready_pids("policy") + ready_pids("registry"):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log = err.read_text()
    assert "conveyor up: draining registry, policy (SIGTERM" in log
    assert log.rstrip().endswith("conveyor up: every service stopped cleanly")
    for address in addresses.values():
        assert _port_free(address)
