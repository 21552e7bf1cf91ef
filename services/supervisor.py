"""Keeping a set of child processes running: the supervisor of ``conveyor up``.

A :class:`Supervisor` starts its children one after the other, in the order
given, each once the previous one is ready (SERVING on gRPC health when the
child has an address). Then it watches them:

- A child that exits while nobody asked it to is reported (which one, its exit
  code or signal, its restarts so far) and started again after a backoff that
  doubles from ``backoff_initial_s`` up to ``backoff_max_s``. A child that
  stayed ready for ``stable_after_s`` before it crashed starts a new streak:
  its next backoff is ``backoff_initial_s`` again.
- A child that crashes ``max_quick_crashes`` times in a row, each time less than
  ``stable_after_s`` after it became ready (or before it became ready at all),
  is given up on, loudly. The others keep running; when every child has been
  given up on, the supervisor stops.
- A child that fails its very first start (exits, or is not ready within
  ``startup_timeout_s``) stops the whole set: a wrong setting or a port in use
  is shown at once instead of being retried.

:meth:`Supervisor.request_stop` (the first SIGINT or SIGTERM under
:meth:`Supervisor.stopping_on_signals`) drains: every running child gets
SIGTERM, in reverse start order, and has its ``drain_timeout_s`` to exit; a
child still running then is killed (SIGKILL) and reported. A second request
kills every child left at once. :meth:`Supervisor.run` returns 0 when every
child stopped cleanly on SIGTERM and none was given up on, else 1.

Everything that happens is recorded as an :class:`Event` (monotonic time
stamps) and reported as one line through ``report``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import grpc

from conveyor.shared.health import serving_status

HEALTH_CHECK_TIMEOUT_S = 1.0
"""Deadline of one health check of a starting child."""

_CLEAN_STOPS = (0, -signal.SIGTERM, -signal.SIGINT)
"""Exit statuses of a child that stopped as asked while draining."""


@dataclass(frozen=True)
class ChildSpec:
    """One child process to keep running."""

    name: str
    """How reports name it (``registry``); unique in a supervisor."""

    argv: tuple[str, ...]
    """The command line."""

    address: str | None = None
    """``HOST:PORT`` whose gRPC health must say SERVING before the child counts as
    ready; ``None``: ready once started."""

    env: Mapping[str, str] | None = None
    """Its environment (``None``: this process's)."""

    drain_timeout_s: float = 20.0
    """How long it may take to exit after SIGTERM before it is killed."""

    log_file: Path | None = None
    """Where its stdout and stderr go, appended (``None``: this process's)."""

    starts_with_previous: bool = False
    """Start it together with the child before it instead of once that one is
    ready (a wave of children that need only what started earlier)."""


@dataclass(frozen=True)
class SupervisorPolicy:
    """Backoff, give-up and start-up bounds of a :class:`Supervisor`."""

    backoff_initial_s: float = 1.0
    """Delay before the first restart of a crash streak."""

    backoff_factor: float = 2.0
    """Each further quick crash multiplies the delay by this."""

    backoff_max_s: float = 30.0
    """The delay never exceeds this."""

    stable_after_s: float = 60.0
    """A child ready this long before it crashes starts a new streak (backoff and
    quick-crash count reset)."""

    max_quick_crashes: int = 5
    """Give a child up after this many crashes in a row, each less than
    ``stable_after_s`` after it became ready."""

    startup_timeout_s: float = 60.0
    """A (re)started child not ready after this long is killed and counts as a crash."""

    poll_interval_s: float = 0.1
    """How often children are looked at."""

    def __post_init__(self) -> None:
        for name in ("backoff_initial_s", "backoff_max_s", "startup_timeout_s", "poll_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.backoff_factor < 1:
            raise ValueError("backoff_factor must be at least 1")
        if self.stable_after_s < 0:
            raise ValueError("stable_after_s must not be negative")
        if self.max_quick_crashes < 1:
            raise ValueError("max_quick_crashes must be at least 1")


class EventKind(StrEnum):
    """What happened to a child."""

    STARTED = "started"
    """A process was started (``restarts`` says which restart; 0: the first start)."""
    READY = "ready"
    """It became ready (SERVING)."""
    EXITED = "exited"
    """It exited unexpectedly, could not be started or was not ready in time."""
    BACKOFF = "backoff"
    """A restart is scheduled in ``delay_s``."""
    GAVE_UP = "gave_up"
    """Too many quick crashes: it stays down."""
    FAILED_START = "failed_start"
    """Its first start failed: the supervisor stops."""
    DRAINING = "draining"
    """It was sent SIGTERM."""
    STOPPED = "stopped"
    """It exited while draining."""
    KILLED = "killed"
    """It was sent SIGKILL while draining (too slow, or a second stop request)."""


@dataclass(frozen=True)
class Event:
    """One thing that happened to a child, at ``time`` (``time.monotonic()``)."""

    time: float
    service: str
    kind: EventKind
    pid: int | None = None
    returncode: int | None = None
    restarts: int = 0
    """Restarts of the child so far (a :attr:`EventKind.BACKOFF` event schedules the next)."""
    delay_s: float | None = None
    """For :attr:`EventKind.BACKOFF`: the delay before the restart."""


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class _State(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    GAVE_UP = "gave_up"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class _Child:
    spec: ChildSpec
    state: _State = _State.PENDING
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    ever_ready: bool = False
    restarts: int = 0
    quick_crashes: int = 0
    delay_s: float = 0.0
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Supervisor:
    """Starts ``specs`` in order, restarts crashed ones, drains them all on request."""

    specs: Sequence[ChildSpec]
    policy: SupervisorPolicy = field(default_factory=SupervisorPolicy)
    report: Callable[[str], None] = _print_to_stderr
    """Where one-line reports go (default: stderr)."""

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._children = [
            _Child(spec, delay_s=self.policy.backoff_initial_s) for spec in self.specs
        ]
        self._events: list[Event] = []
        self._stop_requests = 0

    @property
    def events(self) -> list[Event]:
        """What happened so far, oldest first (a copy)."""
        return list(self._events)

    def pid(self, name: str) -> int | None:
        """The process id of the child ``name`` now (``None``: not running)."""
        for child in self._children:
            if child.name == name and child.alive():
                return child.pid
        return None

    def request_stop(self) -> None:
        """Drain every child (the first request) or kill them at once (the next).

        Only counts the request, so a signal handler or another thread may call it.
        """
        self._stop_requests += 1

    @contextmanager
    def stopping_on_signals(
        self, signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
    ) -> Iterator[None]:
        """While inside, each of ``signals`` calls :meth:`request_stop` (main thread only)."""
        previous = {signum: signal.getsignal(signum) for signum in signals}

        def handle(_signum: int, _frame: object) -> None:
            self.request_stop()

        for signum in signals:
            signal.signal(signum, handle)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Start every child in order (then call ``on_ready``), keep them running
        until a stop request, drain them; 0 when all went well, else 1."""
        try:
            started = self._start_in_order()
            if started and not self._stop_requests:
                if on_ready is not None:
                    on_ready()
                self._supervise()
            clean = self._drain()
            gave_up = [c.name for c in self._children if c.state is _State.GAVE_UP]
            if clean and started and not gave_up:
                self.report("every service stopped cleanly")
                return 0
            return 1
        finally:
            self._kill_remaining()

    def _start_in_order(self) -> bool:
        """False when a child's first start failed; True when all are ready or a
        stop was requested. Children start in waves, each once the one before
        is ready (see :attr:`ChildSpec.starts_with_previous`)."""
        started = 0
        for wave in self._waves():
            for child in wave:
                self._spawn(child, time.monotonic())
            started += len(wave)
            while (
                any(child.state is _State.STARTING for child in wave)
                and not any(child.state is _State.FAILED for child in wave)
                and not self._stop_requests
            ):
                time.sleep(self.policy.poll_interval_s)
                # Those started before are supervised meanwhile.
                for earlier in self._children[:started]:
                    self._step(earlier, time.monotonic())
            if self._stop_requests:
                return True
            if any(child.state is _State.FAILED for child in wave):
                return False
        return True

    def _waves(self) -> list[list[_Child]]:
        waves: list[list[_Child]] = []
        for child in self._children:
            if waves and child.spec.starts_with_previous:
                waves[-1].append(child)
            else:
                waves.append([child])
        return waves

    def _supervise(self) -> None:
        while not self._stop_requests:
            for child in self._children:
                self._step(child, time.monotonic())
            if all(child.state is _State.GAVE_UP for child in self._children):
                self.report("every service has been given up on; stopping")
                return
            time.sleep(self.policy.poll_interval_s)

    def _record(
        self,
        child: _Child,
        kind: EventKind,
        at: float,
        *,
        returncode: int | None = None,
        delay_s: float | None = None,
    ) -> None:
        event = Event(
            at,
            child.name,
            kind,
            pid=child.pid,
            returncode=returncode,
            restarts=child.restarts,
            delay_s=delay_s,
        )
        self._events.append(event)

    def _spawn(self, child: _Child, now: float) -> None:
        if child.state is _State.BACKOFF:
            child.restarts += 1
        child.state = _State.STARTING
        child.started_at = now
        child.ready_at = None
        try:
            child.process = self._popen(child.spec)
        except OSError as error:
            child.process = None
            self._crashed(child, now, None, f"could not be started ({error})")
            return
        self._record(child, EventKind.STARTED, now)
        if child.spec.address is None:
            self._ready(child)

    @staticmethod
    def _popen(spec: ChildSpec) -> subprocess.Popen[bytes]:
        if spec.log_file is None:
            return subprocess.Popen(spec.argv, env=spec.env)
        spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_file.open("ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(spec.argv, env=spec.env, stdout=log, stderr=subprocess.STDOUT)

    def _step(self, child: _Child, now: float) -> None:
        if self._stop_requests:
            # Ctrl-C in a terminal reaches the children too: from now on an exit
            # is a child draining, not a crash (and nothing is started again).
            return
        if child.state is _State.BACKOFF and now >= child.restart_at:
            self._spawn(child, now)
            return
        if child.state not in (_State.STARTING, _State.RUNNING) or child.process is None:
            return
        returncode = child.process.poll()
        if returncode is not None:
            self._crashed(child, now, returncode, describe_exit(returncode))
        elif child.state is _State.STARTING:
            if self._is_ready(child):
                self._ready(child)
            elif now - child.started_at > self.policy.startup_timeout_s:
                child.process.kill()
                child.process.wait()
                self._crashed(
                    child,
                    now,
                    child.process.returncode,
                    f"was not ready within {self.policy.startup_timeout_s:g} s (killed it)",
                )

    def _ready(self, child: _Child) -> None:
        child.state = _State.RUNNING
        child.ready_at = time.monotonic()
        child.ever_ready = True
        self._record(child, EventKind.READY, child.ready_at)
        where = f" on {child.spec.address}" if child.spec.address else ""
        again = f", restart {child.restarts}" if child.restarts else ""
        self.report(f"{child.name} ready{where} (pid {child.pid}{again})")

    def _is_ready(self, child: _Child) -> bool:
        if child.spec.address is None:
            return True
        try:
            status = serving_status(child.spec.address, timeout_s=HEALTH_CHECK_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return status == "SERVING"

    def _crashed(self, child: _Child, now: float, returncode: int | None, what: str) -> None:
        self._record(child, EventKind.EXITED, now, returncode=returncode)
        who = f"{child.name} (pid {child.pid})" if child.process is not None else child.name
        if not child.ever_ready:
            child.state = _State.FAILED
            self._record(child, EventKind.FAILED_START, now, returncode=returncode)
            self.report(f"{who} {what} at its first start; stopping")
            return
        if child.ready_at is not None and now - child.ready_at >= self.policy.stable_after_s:
            child.quick_crashes = 0
            child.delay_s = self.policy.backoff_initial_s
        child.quick_crashes += 1
        up = f" after {now - child.ready_at:.1f} s up" if child.ready_at is not None else ""
        if child.quick_crashes >= self.policy.max_quick_crashes:
            child.state = _State.GAVE_UP
            self._record(child, EventKind.GAVE_UP, now, returncode=returncode)
            self.report(
                f"GIVING UP on {child.name}: it {what}{up}; it crashed "
                f"{child.quick_crashes} times in a row, each less than "
                f"{self.policy.stable_after_s:g} s after it was ready ({child.restarts} "
                "restarts). It stays down; the other services keep running."
            )
            return
        delay = child.delay_s
        child.state = _State.BACKOFF
        child.restart_at = now + delay
        child.delay_s = min(delay * self.policy.backoff_factor, self.policy.backoff_max_s)
        self._record(child, EventKind.BACKOFF, now, delay_s=delay, returncode=returncode)
        self.report(
            f"{who} {what}{up}; restarting it in {delay:g} s (restart {child.restarts + 1}; "
            f"quick crash {child.quick_crashes}, gives up at {self.policy.max_quick_crashes})"
        )

    def _drain(self) -> bool:
        """SIGTERM every running child, wait for each up to its drain bound, kill
        the rest; True when every child stopped cleanly."""
        requests_before = self._stop_requests
        alive: list[_Child] = []
        for child in reversed(self._children):
            if child.state in (_State.BACKOFF, _State.PENDING):
                child.state = _State.STOPPED
            elif child.alive():
                alive.append(child)
        if not alive:
            return True
        longest = max(child.spec.drain_timeout_s for child in alive)
        self.report(
            f"draining {', '.join(child.name for child in alive)} (SIGTERM; killed after "
            f"{longest:g} s at most; Ctrl-C again kills them at once)"
        )
        deadlines: dict[str, float] = {}
        for child in alive:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
            now = time.monotonic()
            deadlines[child.name] = now + child.spec.drain_timeout_s
            self._record(child, EventKind.DRAINING, now)
        clean = True
        while alive:
            for child in list(alive):
                assert child.process is not None
                returncode = child.process.poll()
                if returncode is None:
                    continue
                alive.remove(child)
                child.state = _State.STOPPED
                self._record(child, EventKind.STOPPED, time.monotonic(), returncode=returncode)
                if returncode not in _CLEAN_STOPS:
                    clean = False
                    self.report(
                        f"{child.name} (pid {child.pid}) {describe_exit(returncode)} while draining"
                    )
            hurry = self._stop_requests > requests_before
            now = time.monotonic()
            overdue = [child for child in alive if hurry or now >= deadlines[child.name]]
            if hurry and overdue:
                self.report(f"killing {', '.join(child.name for child in overdue)} at once")
            for child in overdue:
                assert child.process is not None
                child.process.kill()
                child.process.wait()
                alive.remove(child)
                child.state = _State.STOPPED
                clean = False
                self._record(child, EventKind.KILLED, now, returncode=child.process.returncode)
                if not hurry:
                    self.report(
                        f"{child.name} (pid {child.pid}) did not stop within "
                        f"{child.spec.drain_timeout_s:g} s of SIGTERM; killed it (SIGKILL)"
                    )
            if alive:
                time.sleep(self.policy.poll_interval_s)
        return clean

    def _kill_remaining(self) -> None:
        """Never leave a child behind, whatever ended :meth:`run`."""
        for child in self._children:
            if child.process is not None and child.alive():
                child.process.kill()
                child.process.wait()
