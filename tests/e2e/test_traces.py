"""One OpenTelemetry trace across the suite's processes, as an OTLP backend sees it.

Policy, the registry, inference and the monitor run as ``conveyor serve``
processes (what ``conveyor up`` starts), on free ports, with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an OTLP/gRPC receiver in this test.
A promotion tried through the CLI and a prediction sent by a traced client each
make one trace whose parent/child structure crosses every process on the way:

- promotion: the CLI's ``SetAlias`` client span → the registry's server span →
  its client call to policy's ``EvaluatePromotion`` → policy's server span →
  the audit log append (and likewise the ``Authorize`` question the registry
  asked policy about the caller, with its own append);
- prediction: the client's ``ModelInfer`` span → inference's server span → its
  queue and compute spans (version, execution provider, device, batch size) →
  the prediction log's send span → its ``BatchLogPredictions`` call → the
  monitor's server span, where the records are ingested.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from conveyor.inference.v1 import inference_messages_pb2 as inference_rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.inference.prediction_log import SEND_SPAN
from conveyor.services.policy.decisions import AUDIT_APPEND_SPAN
from conveyor.shared.auth.credentials import write_dev_credentials
from conveyor.shared.channel import create_channel
from conveyor.shared.health import wait_until_serving
from conveyor.shared.ports import SERVICE_PORTS
from conveyor.shared.secrets import LocalSecretStore
from tests.inference.conftest import infer_request, linear_classifier, signature, weights
from tests.support import canary
from tests.support.otlp_receiver import OtlpTraceReceiver, ReceivedSpan
from tests.support.registry import a_model, a_version, upload_requests
from tests.support.suite import free_port

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SERVICES = ("policy", "registry", "inference", "monitor")
MODEL = "traced"
USER = "erin"
"""An ML engineer of team A: may register, deploy, query and promote team A's models."""

SET_ALIAS = "/conveyor.registry.v1.RegistryService/SetAlias"
EVALUATE_PROMOTION = "/conveyor.policy.v1.PolicyService/EvaluatePromotion"
AUTHORIZE = "/conveyor.policy.v1.PolicyService/Authorize"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
LOG_PREDICTIONS = "/conveyor.monitor.v1.MonitorService/BatchLogPredictions"

PROMOTION = {"conveyor.audit.kind": "promotion"}
"""The audit entry of a promotion decision."""
SET_ALIAS_ALLOWED = {"conveyor.audit.action": "registry.SetAlias", "conveyor.audit.result": "allow"}
"""The audit entry of the caller's authorization to move the alias (policy may
append one beside it for its own caller, the registry)."""


@dataclass
class RunningSuite:
    """The services' processes, their addresses, and the receiver of their spans."""

    receiver: OtlpTraceReceiver
    addresses: dict[str, str]
    environment: dict[str, str]
    """The processes' environment (the CLI's too)."""
    token_file: Path
    """The development token of :data:`USER`."""
    version: str
    """The registered version of :data:`MODEL`."""

    def channel(
        self,
        service: str,
        *,
        tracing: bool,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """A channel to ``service`` calling as :data:`USER`."""
        return _channel(
            self.addresses[service], self.token_file, tracing=tracing, interceptors=interceptors
        )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningSuite]:
    data_dir = tmp_path_factory.mktemp("suite")
    async with OtlpTraceReceiver() as receiver:
        # What `conveyor up` does first: a token per local user, from the store
        # the services will share.
        tokens = write_dev_credentials(
            LocalSecretStore(data_dir / "secrets"), data_dir / "credentials"
        )
        addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICE_PORTS}
        environment = _environment(receiver.endpoint, addresses)
        processes = {
            name: _serve(name, addresses[name], data_dir, environment) for name in SERVICES
        }
        try:
            await _serving(processes, addresses)
            version = await _register(_channel(addresses["registry"], tokens[USER], tracing=False))
            yield RunningSuite(receiver, addresses, environment, tokens[USER], version)
        finally:
            # Stopped before the receiver, so that their last spans reach it.
            await _stop(processes.values())
            _watch_for_secrets(receiver.spans)


async def test_a_promotion_is_one_trace_from_the_cli_through_policy_to_the_audit_log(
    suite: RunningSuite,
) -> None:
    number = suite.version.rpartition("/")[2]
    cli = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "conveyor.services.cli", "models", "alias", "set"),
        *(MODEL, "production", number, "--reason", "traced promotion"),
        env={
            **suite.environment,
            "CONVEYOR_REGISTRY_ADDR": suite.addresses["registry"],
            "CONVEYOR_TOKEN_FILE": str(suite.token_file),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(cli.communicate(), timeout=60)
    # Refused by a gate (no approval yet): a decision, recorded and traced all the same.
    assert cli.returncode == 1, stderr.decode()
    assert "FAILED_PRECONDITION" in stderr.decode()

    def promotion(spans: Sequence[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
        for root in spans:
            if (root.service, root.kind, root.name) != ("conveyor-cli", "CLIENT", SET_ALIAS):
                continue
            found = Trace(spans, root.trace_id).path(
                root,
                Step("call", "conveyor-registry", "SERVER", SET_ALIAS),
                Step("ask", "conveyor-registry", "CLIENT", EVALUATE_PROMOTION),
                Step("evaluate", "conveyor-policy", "SERVER", EVALUATE_PROMOTION),
                Step("audit", "conveyor-policy", "INTERNAL", AUDIT_APPEND_SPAN, PROMOTION),
            )
            authorized = Trace(spans, root.trace_id).path(
                root,
                Step("call", "conveyor-registry", "SERVER", SET_ALIAS),
                Step("ask", "conveyor-registry", "CLIENT", AUTHORIZE),
                Step("authorize", "conveyor-policy", "SERVER", AUTHORIZE),
                Step("audit", "conveyor-policy", "INTERNAL", AUDIT_APPEND_SPAN, SET_ALIAS_ALLOWED),
            )
            if found is not None and authorized is not None:
                return {"root": root, **found, "authorization": authorized["audit"]}
        return None

    path = await suite.receiver.wait_for(promotion, what="promotion trace")
    assert not path["root"].parent_span_id  # the CLI's call starts the trace
    assert path["call"].status == "ERROR"  # FAILED_PRECONDITION
    assert path["audit"].attributes["conveyor.audit.action"] == "registry.SetAlias"
    assert path["audit"].attributes["conveyor.audit.result"] == "deny"
    assert path["authorization"].attributes["conveyor.audit.kind"] == "authorization"


async def test_a_prediction_is_one_trace_from_the_client_through_inference_to_the_monitor(
    suite: RunningSuite,
) -> None:
    await _deploy(suite)
    # The client's own tracer provider, exporting to the same receiver.
    client = TracerProvider(resource=Resource.create({"service.name": "e2e-client"}))
    client.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=suite.receiver.endpoint, insecure=True),
            schedule_delay_millis=100,
        )
    )
    channel = suite.channel(
        "inference",
        tracing=False,
        interceptors=aio_client_interceptors(tracer_provider=client),  # type: ignore[no-untyped-call]
    )
    rows = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    try:
        oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = await oip.ModelInfer(infer_request(MODEL, rows), timeout=30)
    finally:
        await channel.close(None)
        await asyncio.to_thread(client.shutdown)  # flushes, to the receiver on this loop
    assert reply.model_version == suite.version.rpartition("/")[2]

    def prediction(spans: Sequence[ReceivedSpan]) -> dict[str, ReceivedSpan] | None:
        for root in spans:
            if (root.service, root.kind, root.name) != ("e2e-client", "CLIENT", MODEL_INFER):
                continue
            trace = Trace(spans, root.trace_id)
            served = trace.path(root, Step("call", "conveyor-inference", "SERVER", MODEL_INFER))
            if served is None:
                return None
            call = served["call"]
            ingest = trace.path(
                call,
                Step("send", "conveyor-inference", "INTERNAL", SEND_SPAN),
                Step("log", "conveyor-inference", "CLIENT", LOG_PREDICTIONS),
                Step("ingest", "conveyor-monitor", "SERVER", LOG_PREDICTIONS),
            )
            queue = trace.path(
                call, Step("queue", "conveyor-inference", "INTERNAL", "inference.queue")
            )
            compute = trace.path(
                call, Step("compute", "conveyor-inference", "INTERNAL", "inference.compute")
            )
            if ingest is None or queue is None or compute is None:
                return None
            return {"root": root, "call": call, **queue, **compute, **ingest}
        return None

    path = await suite.receiver.wait_for(prediction, what="prediction trace")
    assert not path["root"].parent_span_id
    for step in ("queue", "compute"):
        attributes = path[step].attributes
        assert attributes["conveyor.model_version"] == suite.version
        assert attributes["conveyor.batch_size"] == 3
        provider, device = attributes["conveyor.execution_provider"], attributes["conveyor.device"]
        assert (provider, str(device).partition(":")[0]) in (
            ("CPUExecutionProvider", "cpu"),
            ("CUDAExecutionProvider", "cuda"),
        )
    assert path["send"].attributes == {
        "conveyor.prediction_log.records": 3,
        "conveyor.prediction_log.predictions": 1,
    }
    assert path["ingest"].status != "ERROR"  # the monitor stored the records


@dataclass(frozen=True)
class Step:
    """A span expected in a trace, as the child of the step before it."""

    label: str
    service: str
    kind: str
    name: str
    attributes: Mapping[str, object] = field(default_factory=dict)
    """Attributes it must have (among others)."""

    def matches(self, span: ReceivedSpan) -> bool:
        return (span.service, span.kind, span.name) == (self.service, self.kind, self.name) and all(
            span.attributes.get(key) == value for key, value in self.attributes.items()
        )


class Trace:
    """The spans of one trace, walked from parent to child."""

    def __init__(self, spans: Iterable[ReceivedSpan], trace_id: str) -> None:
        self._spans = [span for span in spans if span.trace_id == trace_id]

    def path(self, start: ReceivedSpan, *steps: Step) -> dict[str, ReceivedSpan] | None:
        """The spans of ``steps`` by label, each the child of the one before (the
        first, of ``start``); None while one is missing."""
        found: dict[str, ReceivedSpan] = {}
        parent = start
        for step in steps:
            child = next(
                (
                    span
                    for span in self._spans
                    if span.parent_span_id == parent.span_id and step.matches(span)
                ),
                None,
            )
            if child is None:
                return None
            found[step.label] = parent = child
        return found


# -- the suite's processes ------------------------------------------------------------


def _environment(endpoint: str, addresses: dict[str, str]) -> dict[str, str]:
    """This process's environment without its Conveyor and OpenTelemetry
    settings, plus the suite's: every peer on its free port (those not started
    too, so that nothing reaches a service outside the test), spans to the
    receiver without delay, the prediction log flushed promptly."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CONVEYOR_", "OTEL_"))
    }
    environment.update(canary.CANARY_ENVIRONMENT)
    environment.update({f"CONVEYOR_{name.upper()}_ADDR": addresses[name] for name in addresses})
    environment.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "CONVEYOR_INFERENCE_METRICS_LISTEN": "",
            "CONVEYOR_MONITOR_METRICS_LISTEN": "",
            "CONVEYOR_INFERENCE_PREDICTION_LOG_FLUSH_INTERVAL": "PT0.1S",
        }
    )
    return environment


def _serve(
    name: str, address: str, data_dir: Path, environment: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``conveyor serve NAME``, as ``conveyor up`` starts it (its output is
    the test's: captured, shown when the test fails)."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "conveyor.services.cli", "serve", name),
            *("--listen", address, "--data-dir", str(data_dir)),
        ],
        env=environment,
    )


async def _serving(
    processes: dict[str, subprocess.Popen[bytes]], addresses: dict[str, str]
) -> None:
    """Wait until every process serves (they start side by side); their logs
    are in the test's captured output."""
    await asyncio.gather(
        *(
            asyncio.to_thread(wait_until_serving, addresses[name], process=process, timeout_s=90)
            for name, process in processes.items()
        )
    )


async def _stop(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (each drains), then SIGKILL whatever is left after 30 s."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    await asyncio.gather(*(asyncio.to_thread(_wait_or_kill, process, 30) for process in running))


def _wait_or_kill(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _channel(
    address: str,
    token_file: Path,
    *,
    tracing: bool,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    return create_channel(
        address,
        bearer_token=token_file.read_text(encoding="ascii").strip(),
        tracing=tracing,
        interceptors=interceptors,
    )


async def _register(channel: grpc.aio.Channel) -> str:
    """:data:`MODEL` (team A's) and one version of it; the version's name."""
    async with channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.CreateModel(
            registry_rpc.CreateModelRequest(
                model_id=MODEL,
                model=a_model(owner_team="team-a", risk_tier=registry_pb.RISK_TIER_LOW),
            ),
            timeout=30,
        )
        reply = await registry.CreateModelVersion(
            upload_requests(
                f"models/{MODEL}",
                linear_classifier(weights(0)),
                version=a_version(signature=signature()),
            ),
            timeout=60,
        )
    return str(reply.model_version.name)


async def _deploy(suite: RunningSuite) -> None:
    """Serve the version in inference (pinned: no alias needed) and wait until READY."""
    deployment = inference_pb.Deployment(
        model=f"models/{MODEL}",
        traffic=inference_pb.TrafficSplit(
            targets=[inference_pb.TrafficTarget(model_version=suite.version, percent=100)]
        ),
    )
    async with suite.channel("inference", tracing=False) as channel:
        management = inference_service_pb2_grpc.InferenceManagementServiceStub(channel)
        await management.CreateDeployment(
            inference_rpc.CreateDeploymentRequest(deployment=deployment), timeout=30
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        while True:
            reply = await management.GetDeploymentStatus(
                inference_rpc.GetDeploymentStatusRequest(name=f"deployments/{MODEL}"), timeout=10
            )
            if reply.status.state == inference_pb.DEPLOYMENT_STATE_READY:
                return
            assert loop.time() < give_up, f"the deployment did not become ready: {reply.status}"
            await asyncio.sleep(0.05)


def _watch_for_secrets(spans: Iterable[ReceivedSpan]) -> None:
    """Give the run's secret leak watch every span the processes exported."""
    for span in spans:
        texts = [span.name, span.status_message]
        texts.extend(f"{key}={value!r}" for key, value in span.attributes.items())
        canary.WATCH.check(f"span {span.name} of {span.service}", texts)
