"""Policy benchmark: Authorize latency and throughput, with and without the decision cache.

Measures, against a policy service started as a separate process (``conveyor
serve policy``, SQLite audit log in a temporary data directory) so that the
client and the server do not share an event loop:

* ``raw``: the ``PolicyService.Authorize`` RPC itself, no client cache. Every
  call asks a different question (principal, action, resource), and every call
  is decided and appended to the hash-chained audit log;
* ``cached``: the path every service's authentication interceptor takes,
  :class:`PolicyServiceAuthorizer` with a :class:`DecisionCache` (the auth
  settings' defaults: 10,000 entries, 5 s), over a small set of distinct
  questions (100 by default) asked again and again;
* ``uncached``: the same authorizer and workload with the cache's TTL at 0
  (``CONVEYOR_AUTH_DECISION_CACHE_TTL=0``): every question goes to the service.

Each mode runs ``--calls`` calls one after the other (latency p50/p99), then
``--duration`` seconds with each number of concurrent callers of
``--concurrency`` (throughput, and latency under load). The callers are tasks
on one event loop sharing one channel, as a service's interceptor shares its
channel to the policy service; each caller yields to the loop between calls,
as a server does between requests.

The client calls as ``service:registry`` with a token issued from the same
local secret store directory the policy process uses. The audit log's head is
read before and after each measurement (``ListDecisions`` as a security
auditor) and the whole chain is verified at the end (``VerifyAuditLog``), so
the table shows that every uncached decision was recorded. The CPU time of the
policy process (from ``/proc``) and of this one is divided by the calls made.
The cached and uncached modes start each measurement with a fresh authorizer
(a cold cache, as after a service's restart). Run from the repository root::

    .venv/bin/python bench/policy/bench_policy.py --json bench/policy/results.json

Not a test: ``make test`` never runs it and nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from conveyor.policy.v1 import policy_messages_pb2 as rpc
from conveyor.policy.v1 import policy_service_pb2, policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.shared.auth import (
    AuthSettings,
    DecisionCache,
    PolicyServiceAuthorizer,
    Principal,
    Resource,
    ServiceCredentials,
    TokenIssuer,
    ensure_token_keys,
)
from conveyor.shared.channel import create_channel
from conveyor.shared.health import ServerExitedError, wait_until_serving
from conveyor.shared.secrets import LocalSecretStore

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # bench/ lives at the repository root
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import free_port, machine_info  # noqa: E402

START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0
MODES = ("raw", "cached", "uncached")
POLICY_SERVICE = policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"]

CALLER_SERVICE = "registry"
"""The service identity the benchmark calls as (``service:registry``), as the
registry's interceptor does."""

AUDITOR = Principal(kind="user", id="bench-auditor", roles=("security_auditor",))
"""Reads the audit log's head and verifies the chain."""

Stub = policy_service_pb2_grpc.PolicyServiceStub
"""Typed as ``PolicyServiceAsyncStub`` (the .pyi name) when built on an aio channel."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s): {', '.join(sorted(unknown))}")
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if any(c < 1 for c in concurrency) or args.calls < 1 or args.distinct < 1:
        raise SystemExit("--calls, --distinct and every --concurrency must be at least 1")
    if not args.duration > 0 or args.cache_ttl < 0:
        raise SystemExit("--duration must be positive and --cache-ttl not negative")
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.server_cache_ttl is not None:
        server_env["CONVEYOR_POLICY_DECISION_CACHE_TTL"] = args.server_cache_ttl
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-policy-", dir=args.work_dir))
    settings = BenchSettings(
        modes=modes,
        calls=args.calls,
        duration_s=args.duration,
        concurrency=concurrency,
        distinct=args.distinct,
        cache_ttl_s=args.cache_ttl,
        cache_size=AuthSettings.model_fields["decision_cache_size"].default,
        seed=args.seed,
        server_env=server_env,
        work_dir=str(root),
    )
    report: dict[str, Any] = {"machine": machine_info(root), "settings": asdict(settings)}
    try:
        with policy_process(root, server_env) as server:
            outcome = asyncio.run(run_all(server, settings))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["results"] = [{**asdict(row), "hit_ratio": row.hit_ratio} for row in outcome.rows]
    report["audit"] = outcome.audit
    print_table(report, outcome)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated: raw, cached, uncached"
    )
    parser.add_argument(
        "--calls", type=int, default=500, help="sequential calls per mode (latency)"
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per concurrency level")
    parser.add_argument(
        "--concurrency", default="1,8,32", help="comma-separated numbers of concurrent callers"
    )
    parser.add_argument(
        "--distinct",
        type=int,
        default=100,
        help="distinct questions of the cached and uncached modes",
    )
    parser.add_argument(
        "--cache-ttl",
        type=float,
        default=AuthSettings.model_fields["decision_cache_ttl"].default.total_seconds(),
        help="client cache's max TTL in seconds in the cached mode "
        "(CONVEYOR_AUTH_DECISION_CACHE_TTL; the service's answer may allow less)",
    )
    parser.add_argument(
        "--server-cache-ttl",
        metavar="ISO8601",
        help="CONVEYOR_POLICY_DECISION_CACHE_TTL of the policy process, e.g. PT5S or PT0S "
        "(default: the service's default, 5 s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the question mix")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--work-dir", type=Path, help="where the policy data goes (default: system temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the policy process (repeatable), "
        "e.g. CONVEYOR_POLICY_WORKER_THREADS=4",
    )
    return parser.parse_args(argv)


@dataclass
class BenchSettings:
    modes: list[str]
    calls: int
    duration_s: float
    concurrency: list[int]
    distinct: int
    cache_ttl_s: float
    cache_size: int
    seed: int
    server_env: dict[str, str]
    work_dir: str


# -- the questions ----------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One Authorize question, as an interceptor would ask it."""

    principal: Principal
    action: str
    resource: Resource
    context: dict[str, str]

    def request(self) -> rpc.AuthorizeRequest:
        """The wire form, built as :class:`PolicyServiceAuthorizer` builds it."""
        request = rpc.AuthorizeRequest(
            principal=self.principal.to_proto(),
            action=self.action,
            resource=self.resource.to_proto(),
        )
        request.context.update(self.context)
        return request


_ROLES = ("data_scientist", "ml_engineer", "approver", "security_auditor")
_SERVICES = ("trainer", "optimizer", "inference", "monitor", "explainer", "policy")
_ACTIONS = (
    ("registry.GetModel", "Model"),
    ("registry.UpdateModel", "Model"),
    ("registry.GetModelVersion", "ModelVersion"),
    ("registry.CreateModelVersion", "Model"),
    ("registry.DownloadArtifact", "ModelVersion"),
    ("registry.ListModelVersions", "Model"),
    ("registry.SetAlias", "Model"),
    ("registry.CreateAttachment", "ModelVersion"),
    ("trainer.CreateTrainingJob", "Model"),
    ("policy.ListDecisions", "Decision"),
)
_RISK_TIERS = ("RISK_TIER_LOW", "RISK_TIER_MEDIUM", "RISK_TIER_HIGH")


def questions(count: int, rng: random.Random) -> list[Question]:
    """``count`` distinct questions: users of every role and team and service
    identities, asking registry, trainer and policy actions about models and
    versions with owner teams, risk tiers and compliance tags; a mix of allows
    and denies."""
    result: dict[tuple[Any, ...], Question] = {}
    while len(result) < count:
        if rng.random() < 0.3:
            principal = Principal("service", rng.choice(_SERVICES), ("service",))
        else:
            user = rng.randrange(200)
            principal = Principal(
                "user", f"user-{user}", (_ROLES[user % len(_ROLES)],), f"team-{user % 5}"
            )
        action, kind = rng.choice(_ACTIONS)
        model = f"models/model-{rng.randrange(500)}"
        if kind == "Decision":
            resource = Resource(type="policy.conveyor.dev/Decision")
        else:
            name = f"{model}/versions/{rng.randrange(1, 20)}" if kind == "ModelVersion" else model
            tags = ["pii"] if rng.random() < 0.3 else []
            resource = Resource(
                type=f"registry.conveyor.dev/{kind}",
                name=name,
                owner_team=f"team-{rng.randrange(5)}",
                attributes={"risk_tier": rng.choice(_RISK_TIERS), "compliance_tags": tags},
            )
        context = {"authn_method": "jwt"}
        if action == "registry.SetAlias":
            context["alias"] = rng.choice(("staging", "production"))
        question = Question(principal, action, resource, context)
        key = (principal, action, resource.name, resource.owner_team, repr(resource.attributes))
        result[key + tuple(sorted(context.items()))] = question
    return list(result.values())


# -- measurements -------------------------------------------------------------------


@dataclass
class Row:
    """One measurement: a mode, a number of concurrent callers (0: sequential)."""

    mode: str
    callers: int
    calls: int
    seconds: float
    rate: float
    """Calls per second."""
    p50_ms: float
    p99_ms: float
    max_ms: float
    allowed: int
    rpcs: int
    """Authorize RPCs sent (calls the client cache did not answer)."""
    audit_entries: int
    """Entries the audit log grew by during the measurement."""
    server_cpu_ms: float
    """CPU time of the policy process (all its threads) per call, in ms."""
    client_cpu_ms: float
    """CPU time of this benchmark process per call, in ms."""

    @property
    def hit_ratio(self) -> float:
        return 1 - self.rpcs / self.calls if self.calls else 0.0


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    audit: dict[str, Any] = field(default_factory=dict)


if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; at run time it is not
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor


class CountingInterceptor(_UnaryUnary):
    """Counts the Authorize RPCs that leave the client."""

    def __init__(self) -> None:
        self.count = 0

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        if name.endswith("/Authorize"):
            self.count += 1
        return await continuation(client_call_details, request)


Call = Callable[[int], Awaitable[bool]]
"""Asks question number ``i`` of a workload; True when allowed."""


async def run_all(server: PolicyProcess, settings: BenchSettings) -> Outcome:
    store = LocalSecretStore(server.secrets_dir)
    issuer = TokenIssuer(store)
    credentials = ServiceCredentials(issuer, CALLER_SERVICE, timedelta(minutes=30))
    counter = CountingInterceptor()
    extra: list[Any] = [counter]  # the stubs' ClientInterceptor is a placeholder type
    channel = create_channel(
        server.address,
        services=[POLICY_SERVICE],
        token_provider=credentials.token_provider("policy"),
        interceptors=extra,
    )
    # The auditor's token is a credential: it lives in this channel only, never printed.
    auditor_channel = create_channel(
        server.address,
        services=[POLICY_SERVICE],
        bearer_token=issuer.issue(AUDITOR, ["policy"], timedelta(hours=1)),
    )
    outcome = Outcome()
    try:
        stub: policy_service_pb2_grpc.PolicyServiceAsyncStub = Stub(channel)
        auditor: policy_service_pb2_grpc.PolicyServiceAsyncStub = Stub(auditor_channel)
        rng = random.Random(settings.seed)
        many = questions(max(5000, settings.calls), rng)
        few = questions(settings.distinct, rng)
        # Warm-up: connect, issue the token, decide once (not counted anywhere).
        for question in many[:20]:
            await stub.Authorize(question.request(), timeout=CALL_TIMEOUT_S)
        start_head = await audit_head(auditor)
        for mode in settings.modes:
            for callers in [0, *settings.concurrency]:
                call = workload(mode, stub, many, few, settings, rng)
                before = await audit_head(auditor)
                rpcs_before = counter.count
                cpu_before = (process_cpu_seconds(server.process.pid), time.process_time())
                if callers == 0:
                    latencies, allowed, seconds = await sequential(call, settings.calls)
                else:
                    latencies, allowed, seconds = await concurrent(
                        call, callers, settings.duration_s
                    )
                cpu = (
                    process_cpu_seconds(server.process.pid) - cpu_before[0],
                    time.process_time() - cpu_before[1],
                )
                rpcs = counter.count - rpcs_before
                appended = await audit_head(auditor) - before
                row = summarize(mode, callers, latencies, allowed, seconds, rpcs, appended, cpu)
                outcome.rows.append(row)
                print(
                    f"  {mode:<8} callers {callers or 'seq':>3}: {row.rate:9.1f} calls/s, "
                    f"p50 {row.p50_ms:.3f} ms, p99 {row.p99_ms:.3f} ms, "
                    f"RPCs {row.rpcs}, audit +{row.audit_entries}, "
                    f"server CPU {row.server_cpu_ms:.3f} ms/call",
                    file=sys.stderr,
                )
        outcome.audit = await verify_audit_log(auditor, start_head)
    finally:
        await channel.close(None)
        await auditor_channel.close(None)
    return outcome


def workload(
    mode: str,
    stub: policy_service_pb2_grpc.PolicyServiceAsyncStub,
    many: list[Question],
    few: list[Question],
    settings: BenchSettings,
    rng: random.Random,
) -> Call:
    """The call of one measurement; the cached and uncached modes get a fresh
    authorizer (a cold cache), as a service has after a restart."""
    if mode == "raw":
        offset = rng.randrange(len(many))
        requests = [q.request() for q in many]

        async def raw(i: int) -> bool:
            response = await stub.Authorize(
                requests[(offset + i) % len(requests)], timeout=CALL_TIMEOUT_S
            )
            return response.outcome == pb.OUTCOME_ALLOW

        return raw
    ttl = timedelta(seconds=settings.cache_ttl_s if mode == "cached" else 0)
    authorizer = PolicyServiceAuthorizer(stub, DecisionCache(settings.cache_size, ttl))
    order = [rng.randrange(len(few)) for _ in range(4096)]

    async def through_authorizer(i: int) -> bool:
        question = few[order[i % len(order)]]
        result = await authorizer.authorize(
            question.principal, question.action, question.resource, question.context
        )
        return result.allowed

    return through_authorizer


async def sequential(call: Call, calls: int) -> tuple[list[float], int, float]:
    """Latencies of ``calls`` calls one after the other, allows, elapsed seconds."""
    latencies: list[float] = []
    allowed = 0
    start = time.perf_counter()
    for i in range(calls):
        began = time.perf_counter()
        allowed += await call(i)
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0)
    return latencies, allowed, time.perf_counter() - start


async def concurrent(call: Call, callers: int, duration_s: float) -> tuple[list[float], int, float]:
    """``callers`` tasks calling for ``duration_s``: latencies, allows, elapsed seconds."""
    deadline = time.perf_counter() + duration_s
    counter = iter(range(sys.maxsize))

    async def caller() -> tuple[list[float], int]:
        latencies: list[float] = []
        allowed = 0
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            allowed += await call(next(counter))
            latencies.append(time.perf_counter() - began)
            await asyncio.sleep(0)  # a server yields between requests
        return latencies, allowed

    start = time.perf_counter()
    results = await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - start
    return [x for latencies, _ in results for x in latencies], sum(a for _, a in results), elapsed


def summarize(
    mode: str,
    callers: int,
    latencies: list[float],
    allowed: int,
    seconds: float,
    rpcs: int,
    appended: int,
    cpu: tuple[float, float],
) -> Row:
    ordered = sorted(latencies)
    p99 = statistics.quantiles(ordered, n=100)[98] if len(ordered) > 1 else ordered[0]
    return Row(
        mode=mode,
        callers=callers,
        calls=len(ordered),
        seconds=seconds,
        rate=len(ordered) / seconds,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * p99,
        max_ms=1000 * ordered[-1],
        allowed=allowed,
        rpcs=rpcs,
        audit_entries=appended,
        server_cpu_ms=1000 * cpu[0] / len(ordered),
        client_cpu_ms=1000 * cpu[1] / len(ordered),
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def audit_head(auditor: policy_service_pb2_grpc.PolicyServiceAsyncStub) -> int:
    """The sequence number of the audit log's newest entry (0 when empty)."""
    reply = await auditor.ListDecisions(
        rpc.ListDecisionsRequest(page_size=1, order_by="sequence desc"), timeout=CALL_TIMEOUT_S
    )
    return reply.decisions[0].sequence if reply.decisions else 0


async def verify_audit_log(
    auditor: policy_service_pb2_grpc.PolicyServiceAsyncStub, start_head: int
) -> dict[str, Any]:
    """Verify the whole chain (hashes, order, signed heads) and time it."""
    began = time.perf_counter()
    reply = await auditor.VerifyAuditLog(rpc.VerifyAuditLogRequest(), timeout=600)
    return {
        "verified": reply.verified,
        "checked_count": reply.checked_count,
        "head_sequence": reply.head_sequence,
        "last_signed_sequence": reply.last_signed_sequence,
        "entries_during_measurements": reply.head_sequence - start_head,
        "verify_seconds": time.perf_counter() - began,
    }


# -- the policy service -----------------------------------------------------------


@dataclass
class PolicyProcess:
    address: str
    secrets_dir: Path
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def policy_process(root: Path, extra_env: dict[str, str]) -> Iterator[PolicyProcess]:
    """``conveyor serve policy`` in a child process, SERVING on a free loopback port,
    with its data (SQLite audit log) and local secret store under ``root``."""
    data_dir = root / "data"
    secrets_dir = root / "secrets"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The token keys exist before either side reads them (no creation race).
    ensure_token_keys(LocalSecretStore(secrets_dir))
    address = f"127.0.0.1:{free_port()}"
    # Only what is set here configures the service: no CONVEYOR_* or OTEL_* from
    # the caller's shell (a stray database URL or Vault address would change it).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "OTEL_"))}
    env.update(
        {
            "CONVEYOR_POLICY_LOG_LEVEL": "WARNING",
            "CONVEYOR_POLICY_SHUTDOWN_GRACE": "PT5S",
            "CONVEYOR_SECRETS_BACKEND": "local",
            "CONVEYOR_SECRETS_LOCAL_DIR": str(secrets_dir),
            "CONVEYOR_AUTH_MODE": "enforce",
            **extra_env,
        }
    )
    command = [sys.executable, "-m", "conveyor.services.cli", "serve", "policy"]
    command += ["--listen", address, "--data-dir", str(data_dir)]
    log_path = root / "policy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        try:
            wait_until_serving(address, process=process, timeout_s=START_TIMEOUT_S)
        except (ServerExitedError, TimeoutError) as error:
            raise RuntimeError(f"{error}:\n{log_path.read_text()}") from error
        print(f"  policy service pid {process.pid} at {address}", file=sys.stderr)
        yield PolicyProcess(address, secrets_dir, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- report ---------------------------------------------------------------------------

_MODE_LABELS = {
    "raw": "raw Authorize RPC",
    "cached": "authorizer + cache",
    "uncached": "authorizer, TTL 0",
}


def print_table(report: dict[str, Any], outcome: Outcome) -> None:
    machine = report["machine"]
    settings = report["settings"]
    print(
        f"\n{machine['cpu']} ({machine['cpus_usable']} usable CPUs), "
        f"Python {machine['python']}, grpcio {machine['grpcio']}; "
        f"{settings['calls']} sequential calls, {settings['duration_s']:g} s per level, "
        f"{settings['distinct']} distinct questions, cache TTL {settings['cache_ttl_s']:g} s"
    )
    header = (
        f"{'mode':<20} {'callers':>7} {'calls':>7} {'calls/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'allow %':>7} {'hit %':>6} {'RPCs':>6} {'audit +':>7} "
        f"{'srv CPU':>7} {'cli CPU':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in outcome.rows:
        print(
            f"{_MODE_LABELS[row.mode]:<20} {row.callers or 'seq':>7} {row.calls:>7} "
            f"{row.rate:>9.1f} {row.p50_ms:>8.3f} {row.p99_ms:>8.3f} {row.max_ms:>8.1f} "
            f"{100 * row.allowed / row.calls:>7.0f} {100 * row.hit_ratio:>6.1f} "
            f"{row.rpcs:>6} {row.audit_entries:>7} {row.server_cpu_ms:>7.3f} "
            f"{row.client_cpu_ms:>7.3f}"
        )
    print("srv CPU, cli CPU: ms of CPU per call in the policy process and in this one")
    audit = outcome.audit
    extra = audit["entries_during_measurements"] - sum(r.rpcs for r in outcome.rows)
    print(
        f"audit log: {audit['entries_during_measurements']} entries appended during the "
        f"measurements for {sum(r.rpcs for r in outcome.rows)} Authorize RPCs "
        f"(+{extra}: the policy service's own interceptor decisions); whole chain of "
        f"{audit['checked_count']} entries verified={audit['verified']} "
        f"in {audit['verify_seconds']:.1f} s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
