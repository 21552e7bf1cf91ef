"""Models: create, get, list (paged, filtered, ordered), update, archive."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.errors import from_rpc_error
from tests.support.registry import a_model, create_model, create_version, expect_error

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub


async def list_all(registry: Registry, **fields: object) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        reply = await registry.ListModels(
            rpc.ListModelsRequest(page_token=token, **fields),
            timeout=10,  # type: ignore[arg-type]
        )
        names.extend(m.name for m in reply.models)
        if not (token := reply.next_page_token):
            return names


async def test_create_and_get_fill_output_fields(registry: Registry) -> None:
    created = await create_model(
        registry, "fraud-mlp", display_name="Fraud", tags=["tabular"], labels={"team": "risk"}
    )
    assert created.name == "models/fraud-mlp"
    assert created.state == pb.MODEL_STATE_ACTIVE
    assert created.created_by == "user:anonymous"
    assert created.etag
    assert created.create_time.seconds > 0
    fetched = await registry.GetModel(rpc.GetModelRequest(name="models/fraud-mlp"), timeout=10)
    assert fetched.model == created


async def test_generated_id_when_none_is_given(registry: Registry) -> None:
    reply = await registry.CreateModel(rpc.CreateModelRequest(model=a_model()), timeout=10)
    assert reply.model.name.startswith("models/model-")


async def test_request_id_makes_create_idempotent(registry: Registry) -> None:
    request = rpc.CreateModelRequest(model_id="churn", model=a_model(), request_id="r-1")
    first = await registry.CreateModel(request, timeout=10)
    again = await registry.CreateModel(request, timeout=10)
    assert again.model == first.model
    other = rpc.CreateModelRequest(model_id="churn-2", model=a_model(), request_id="r-1")
    error = await expect_error(
        registry.CreateModel(other, timeout=10), grpc.StatusCode.ALREADY_EXISTS
    )
    assert from_rpc_error(error).reason == "REQUEST_ID_CONFLICT"
    assert await list_all(registry) == ["models/churn"]


async def test_bad_models_are_refused_with_every_violation(registry: Registry) -> None:
    await create_model(registry, "taken")
    bad = pb.Model(tags=["UPPER"], labels={"Bad Key": "x"})
    error = await expect_error(
        registry.CreateModel(rpc.CreateModelRequest(model_id="ok", model=bad), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {v.field for v in from_rpc_error(error).violations}
    assert fields == {"model.owner_team", "model.risk_tier", "model.tags", "model.labels"}
    for model_id in ("Bad_Id", "-x", "a" * 64):
        await expect_error(
            registry.CreateModel(
                rpc.CreateModelRequest(model_id=model_id, model=a_model()), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    await expect_error(
        registry.CreateModel(rpc.CreateModelRequest(model_id="taken", model=a_model()), timeout=10),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert await list_all(registry) == ["models/taken"]


@pytest.mark.parametrize("name", ["models/", "model/x", "models/x/versions/1", "models/X"])
async def test_get_with_malformed_name_is_invalid(registry: Registry, name: str) -> None:
    error = await expect_error(
        registry.GetModel(rpc.GetModelRequest(name=name), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert from_rpc_error(error).violations[0].field == "name"


async def test_unknown_model_is_not_found(registry: Registry) -> None:
    error = await expect_error(
        registry.GetModel(rpc.GetModelRequest(name="models/nope"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    assert from_rpc_error(error).reason == "MODEL_NOT_FOUND"


async def test_list_pages_through_everything_in_order(registry: Registry) -> None:
    for i in range(7):
        await create_model(registry, f"m-{i}")
    assert await list_all(registry, page_size=3) == [f"models/m-{i}" for i in range(7)]
    reversed_names = await list_all(registry, page_size=2, order_by="create_time desc")
    assert reversed_names == [f"models/m-{i}" for i in reversed(range(7))]


async def test_list_filters(registry: Registry) -> None:
    await create_model(registry, "fraud-a", tags=["tabular"], labels={"team": "risk"})
    await create_model(registry, "fraud-b", risk_tier=pb.RISK_TIER_HIGH, compliance_tags=["gdpr"])
    await create_model(registry, "churn", owner_team="growth")
    version = await create_version(registry, "churn")
    await registry.SetAlias(
        rpc.SetAliasRequest(
            name="models/churn/aliases/production", version=version.name, reason="release"
        ),
        timeout=10,
    )
    expectations = {
        'name:"models/fraud-*"': ["models/fraud-a", "models/fraud-b"],
        'tags:"tabular"': ["models/fraud-a"],
        'aliases:"production"': ["models/churn"],
        "stage=PRODUCTION": ["models/churn"],
        "stage=NONE": ["models/fraud-a", "models/fraud-b"],
        'owner_team="growth"': ["models/churn"],
        "risk_tier=HIGH": ["models/fraud-b"],
        'compliance_tags:"gdpr"': ["models/fraud-b"],
        'labels.team="risk"': ["models/fraud-a"],
        "labels.team:*": ["models/fraud-a"],
        'name:"models/fraud-*" AND risk_tier=MEDIUM': ["models/fraud-a"],
    }
    for text, expected in expectations.items():
        assert await list_all(registry, filter=text) == expected, text


@pytest.mark.parametrize(
    ("fields", "violation"),
    [
        ({"page_size": -1}, "page_size"),
        ({"filter": "colour=red"}, "filter"),
        ({"filter": "risk_tier=EXTREME"}, "filter"),
        ({"filter": "tags>3"}, "filter"),
        ({"order_by": "owner_team"}, "order_by"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
async def test_list_refuses_bad_parameters(
    registry: Registry, fields: dict[str, object], violation: str
) -> None:
    error = await expect_error(
        registry.ListModels(rpc.ListModelsRequest(**fields), timeout=10),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in from_rpc_error(error).violations] == [violation]


async def test_page_token_only_works_with_its_own_request(registry: Registry) -> None:
    for i in range(3):
        await create_model(registry, f"m-{i}")
    first = await registry.ListModels(rpc.ListModelsRequest(page_size=1), timeout=10)
    await expect_error(
        registry.ListModels(
            rpc.ListModelsRequest(page_size=1, page_token=first.next_page_token, filter="tags:*"),
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_update_changes_only_masked_fields(registry: Registry) -> None:
    created = await create_model(registry, "churn", description="old", tags=["a"])
    change = pb.Model(name="models/churn", description="new", tags=["b"], owner_team="ignored")
    reply = await registry.UpdateModel(
        rpc.UpdateModelRequest(model=change, update_mask=FieldMask(paths=["description", "tags"])),
        timeout=10,
    )
    assert (reply.model.description, list(reply.model.tags)) == ("new", ["b"])
    assert reply.model.owner_team == created.owner_team
    assert reply.model.etag != created.etag


async def test_update_refuses_bad_masks_and_stale_etags(registry: Registry) -> None:
    created = await create_model(registry, "churn")
    for paths in ([], ["name"], ["state"], ["nonsense"]):
        await expect_error(
            registry.UpdateModel(
                rpc.UpdateModelRequest(
                    model=pb.Model(name="models/churn"), update_mask=FieldMask(paths=paths)
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    await expect_error(
        registry.UpdateModel(
            rpc.UpdateModelRequest(
                model=pb.Model(name="models/churn", owner_team=""),
                update_mask=FieldMask(paths=["owner_team"]),
            ),
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    stale = pb.Model(name="models/churn", description="x", etag="stale")
    error = await expect_error(
        registry.UpdateModel(
            rpc.UpdateModelRequest(model=stale, update_mask=FieldMask(paths=["description"])),
            timeout=10,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert from_rpc_error(error).reason == "ETAG_MISMATCH"
    unchanged = await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)
    assert unchanged.model == created


async def test_archive_hides_the_model_and_blocks_new_versions(registry: Registry) -> None:
    await create_model(registry, "old")
    await create_model(registry, "new")
    archived = await registry.ArchiveModel(rpc.ArchiveModelRequest(name="models/old"), timeout=10)
    assert archived.model.state == pb.MODEL_STATE_ARCHIVED
    assert await list_all(registry) == ["models/new"]
    assert await list_all(registry, show_archived=True) == ["models/new", "models/old"]
    error = await expect_error(create_version(registry, "old"), grpc.StatusCode.FAILED_PRECONDITION)
    assert from_rpc_error(error).reason == "MODEL_ARCHIVED"
    restored = await registry.UnarchiveModel(
        rpc.UnarchiveModelRequest(name="models/old"), timeout=10
    )
    assert restored.model.state == pb.MODEL_STATE_ACTIVE
    assert (await create_version(registry, "old")).name == "models/old/versions/1"
