"""README's configuration reference is what the settings classes say, and the
variables it names are the ones pydantic-settings reads."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from pydantic import AliasChoices, AliasPath, Field, SecretStr
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from conveyor.services import catalog
from conveyor.services.settings_reference import (
    BEGIN_MARKER,
    END_MARKER,
    SHARED_CLASSES,
    env_names,
    main,
    read_section,
    render_default,
    render_reference,
    render_table,
)

README = Path(__file__).resolve().parents[2] / "README.md"
SENTINEL = "settings-reference-sentinel"


def test_readme_reference_is_rendered_from_the_settings_classes() -> None:
    section = read_section(README.read_text(encoding="utf-8"))
    assert section == render_reference(), (
        "README.md's configuration reference differs from the settings classes: "
        "run `make settings-doc`"
    )


def _documented_classes() -> list[type[BaseSettings]]:
    services = [catalog.load(name).settings_class for name in catalog.IMPLEMENTED]
    return [*SHARED_CLASSES, *services]


def test_every_named_variable_is_read_by_pydantic_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked = 0
    for settings_class in _documented_classes():
        for name, field in settings_class.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings):
                continue
            variables = env_names(name, field, settings_class.model_config)
            for variable in variables:
                with monkeypatch.context() as env:
                    for other in variables:  # one that takes precedence must not hide it
                        env.delenv(other, raising=False)
                    env.setenv(variable, SENTINEL)
                    read = EnvSettingsSource(settings_class)()
                assert SENTINEL in read.values(), f"{settings_class.__name__}.{name}: {variable}"
                checked += 1
    assert checked > 50


# Throwaway classes: one way each of naming a variable.


class Prefixed(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", use_attribute_docstrings=True)

    port: int = 1
    """The port."""


class CaseSensitive(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="App_", case_sensitive=True)

    port: int = 1


class Choices(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_")

    endpoint: str = Field(default="", validation_alias=AliasChoices("APP_TRACES_URL", "app_url"))


class StringAlias(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_")

    log_file: str = Field(default="", validation_alias="OTHER_LOG_FILE")


class AliasAndName(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", validate_by_name=True)

    peer: str = Field(default="", validation_alias="SHARED_PEER")


class PathAlias(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_")

    level: str = Field(default="", validation_alias=AliasPath("LOGGING", "level"))


class PlainAlias(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_")

    region: str = Field(default="", alias="CLOUD_REGION")


@pytest.mark.parametrize(
    ("settings_class", "field_name", "expected"),
    [
        (Prefixed, "port", ["APP_PORT"]),
        (CaseSensitive, "port", ["App_port"]),
        (Choices, "endpoint", ["APP_TRACES_URL", "APP_URL"]),
        (StringAlias, "log_file", ["OTHER_LOG_FILE"]),
        (AliasAndName, "peer", ["SHARED_PEER", "APP_PEER"]),
        (PathAlias, "level", ["LOGGING"]),
        (PlainAlias, "region", ["CLOUD_REGION"]),
    ],
)
def test_env_names_are_the_variables_pydantic_settings_reads(
    settings_class: type[BaseSettings],
    field_name: str,
    expected: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    field = settings_class.model_fields[field_name]
    assert env_names(field_name, field, settings_class.model_config) == expected
    value = '{"level": "DEBUG"}' if settings_class is PathAlias else "42"
    for variable in expected:
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            settings = settings_class()
        assert str(getattr(settings, field_name)) in {"42", "DEBUG"}, variable


def test_a_prefix_does_not_apply_to_aliases_unless_configured() -> None:
    field = StringAlias.model_fields["log_file"]
    config = {**StringAlias.model_config, "env_prefix_target": "all"}
    assert env_names("log_file", field, config) == ["APP_OTHER_LOG_FILE"]


class Defaults(BaseSettings):
    model_config = SettingsConfigDict(use_attribute_docstrings=True)

    grace: timedelta = timedelta(seconds=10)
    poll: timedelta = timedelta(milliseconds=500)
    delay: timedelta = timedelta(0)
    retention: timedelta = timedelta(days=30)
    data_dir: Path = Path(".data/suite")
    ca_file: Path | None = None
    token: SecretStr | None = None
    password: SecretStr = SecretStr("hunter2")
    json_logs: bool = True
    revision: str = ""
    mode: Literal["enforce", "off"] = "enforce"
    ratio: float = 1.0
    max_message_bytes: int = 16 * 1024 * 1024
    count: int = 10_000
    addresses: list[str] = Field(default_factory=lambda: ["a:1", "b:2"])
    name: str
    """Required: no default."""


@pytest.mark.parametrize(
    ("field_name", "rendered"),
    [
        ("grace", "`PT10S`"),
        ("poll", "`PT0.5S`"),
        ("delay", "`PT0S`"),
        ("retention", "`P30D`"),
        ("data_dir", "`.data/suite`"),
        ("ca_file", "unset"),
        ("token", "unset"),
        ("password", "hidden"),
        ("json_logs", "`true`"),
        ("revision", "empty"),
        ("mode", "`enforce`"),
        ("ratio", "`1.0`"),
        ("max_message_bytes", "`16777216` (16 MiB)"),
        ("count", "`10000`"),
        ("addresses", '`["a:1","b:2"]`'),
        ("name", "required"),
    ],
)
def test_defaults_are_rendered_as_written_in_the_environment(
    field_name: str, rendered: str
) -> None:
    assert render_default(field_name, Defaults.model_fields[field_name]) == rendered


class Documented(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", use_attribute_docstrings=True)

    pattern: str = "a|b"
    """Which ``names`` match,
    as ``a|b``."""


def test_a_table_row_is_variable_default_and_one_line_meaning() -> None:
    assert render_table(Documented) == (
        "| variable | default | meaning |\n"
        "|---|---|---|\n"
        "| `APP_PATTERN` | `a\\|b` | Which `names` match, as `a\\|b`. |\n"
    )


class Undocumented(BaseSettings):
    model_config = SettingsConfigDict(use_attribute_docstrings=True)

    port: int = 1


def test_an_undocumented_setting_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Undocumented\.port has no docstring"):
        render_table(Undocumented)


def test_main_rewrites_only_the_section_and_check_reports_staleness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{BEGIN_MARKER}\nold table\n{END_MARKER}\n\nAfter.\n")

    assert main([str(readme), "--check"]) == 1
    out = capsys.readouterr().out
    assert "-old table" in out
    assert "make settings-doc" in out

    assert main([str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n{BEGIN_MARKER}\n")
    assert text.endswith(f"{END_MARKER}\n\nAfter.\n")
    assert read_section(text) == render_reference()
    assert main([str(readme), "--check"]) == 0


def test_main_refuses_a_readme_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    assert main([str(readme)]) == 2
    assert BEGIN_MARKER in capsys.readouterr().err
    assert readme.read_text() == "# Title\n"
