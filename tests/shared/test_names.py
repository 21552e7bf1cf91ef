"""Resource names: formatting, parsing, and clear errors for bad ones."""

from __future__ import annotations

import pytest

from conveyor.shared import names
from conveyor.shared.errors import InvalidArgumentError


def test_round_trips() -> None:
    assert names.model_version_name("churn-mlp", 3) == "models/churn-mlp/versions/3"
    assert names.parse_model_name("models/churn-mlp") == "churn-mlp"
    ref = names.parse_model_version_ref("models/churn-mlp/versions/12")
    assert (ref.model, ref.version, ref.alias) == ("churn-mlp", 12, None)
    alias = names.parse_model_version_ref("models/churn-mlp@production")
    assert (alias.model, alias.version, alias.alias) == ("churn-mlp", None, "production")
    assert str(alias) == "models/churn-mlp@production"
    assert names.resource_name("trainingJobs", "job-7") == "trainingJobs/job-7"
    assert names.parse_resource_name("trainingJobs/job-7", "trainingJobs") == "job-7"


@pytest.mark.parametrize(
    "bad",
    [
        "models/Churn",
        "models/churn-",
        "models/churn/versions/0",
        "models/churn/versions/-1",
        "models/churn@",
        "models/../x",
        "churn",
        "models/" + "a" * 64,
    ],
)
def test_malformed_names_name_the_field(bad: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        names.parse_model_version_ref(bad, field="source_version")
    assert raised.value.violations[0].field == "source_version"
    assert raised.value.reason == "INVALID_NAME"


def test_ids_and_versions_are_checked_when_building() -> None:
    with pytest.raises(InvalidArgumentError):
        names.model_name("Has Spaces")
    with pytest.raises(InvalidArgumentError):
        names.model_version_name("ok", 0)
    with pytest.raises(ValueError, match="unknown collection"):
        names.resource_name("widgets", "w")
