"""Our Open Inference Protocol is wire-identical to what tritonclient speaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("describe_protocol.py")

# What Conveyor's inference service answers; everything in these it must have.
REQUIRED_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}


def describe(which: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), which], capture_output=True, check=True, text=True
    )
    shape: dict[str, Any] = json.loads(result.stdout)
    return shape


@pytest.fixture(scope="module")
def shapes() -> tuple[dict[str, Any], dict[str, Any]]:
    return describe("ours"), describe("tritonclient")


def test_every_rpc_matches_tritonclient(shapes: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ours, theirs = shapes
    service = "inference.GRPCInferenceService"
    assert set(ours["services"][service]) == REQUIRED_RPCS
    for rpc, signature in ours["services"][service].items():
        assert signature == theirs["services"][service][rpc], rpc


def test_every_field_and_enum_matches_tritonclient(
    shapes: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    ours, theirs = shapes
    assert ours["messages"], "no messages described"
    for message, fields in ours["messages"].items():
        assert message in theirs["messages"], f"{message} is not in the protocol"
        for number, field in fields.items():
            assert theirs["messages"][message].get(number) == field, f"{message} #{number}"
    for enum, values in ours["enums"].items():
        assert values == theirs["enums"][enum], enum


def test_the_requests_a_client_sends_are_complete(
    shapes: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    ours, theirs = shapes
    # A field we lacked in a request would be silently dropped on decode.
    for message in (
        "inference.ModelInferRequest",
        "inference.ModelInferRequest.InferInputTensor",
        "inference.InferTensorContents",
        "inference.InferParameter",
        "inference.ModelInferResponse",
        "inference.ModelStatisticsRequest",
    ):
        assert ours["messages"][message] == theirs["messages"][message], message
