"""README's configuration reference, rendered from the settings classes.

Every setting is a field of a pydantic-settings class with a docstring; this
module turns those classes into markdown tables (variable, default, meaning), so
that the README cannot drift from the code. The variable names are the ones
pydantic-settings reads, worked out from each class's ``model_config`` and each
field's aliases the way pydantic-settings does it.

``python -m conveyor.services.settings_reference README.md`` rewrites the section
between the markers (``make settings-doc``); with ``--check`` it only compares,
and exits 1 with a diff when the README is stale.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import AliasChoices, AliasPath, Secret, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings

from conveyor.services import catalog
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.secrets.settings import SecretStoreSettings
from conveyor.shared.settings import ClientSettings, ServiceSettings, TelemetrySettings

BEGIN_MARKER = "<!-- settings-reference:begin -->"
END_MARKER = "<!-- settings-reference:end -->"
SERVICE_NAME_MARK = "<SERVICE>"
"""Stands for the service's upper-cased name in the variables every service has."""

SHARED_CLASSES: tuple[type[BaseSettings], ...] = (
    AuthSettings,
    SecretStoreSettings,
    TelemetrySettings,
    ClientSettings,
)
"""The shared classes documented after :class:`ServiceSettings`, in this order."""

_TABLE_HEADER = "| variable | default | meaning |\n|---|---|---|\n"
_INTRO = (
    "Where a row names several variables, the first one set wins. Durations are "
    "ISO 8601 (`PT10S`, `PT0.5S`, `P30D`); booleans `true` or `false`; unset: no "
    "value (the meaning says what that does).\n"
)


def render_reference() -> str:
    """The markdown between the markers: the settings every service has, then
    the shared classes, then what each implemented service adds."""
    services = [
        catalog.load(name).settings_class
        for name in catalog.ALL_SERVICES
        if name in catalog.IMPLEMENTED
    ]
    sections = [
        _INTRO,
        _service_base_section(services),
        *(_shared_section(settings_class) for settings_class in SHARED_CLASSES),
        *(_service_section(settings_class) for settings_class in services),
    ]
    return "\n".join(sections)


def env_names(field_name: str, field: FieldInfo, config: Mapping[str, Any]) -> list[str]:
    """The environment variables pydantic-settings reads ``field`` from, in the
    order it tries them: the field's validation aliases (every choice), then the
    prefixed field name when there is no alias or the class validates by name.
    Upper-cased unless the class is case-sensitive."""
    prefix = str(config.get("env_prefix") or "")
    target = config.get("env_prefix_target") or "variable"
    aliases = _alias_heads(field) if config.get("validate_by_alias") is not False else []
    alias_prefix = prefix if target in ("alias", "all") else ""
    names = [alias_prefix + alias for alias in aliases]
    if not aliases or _validates_by_name(config):
        names.append((prefix if target in ("variable", "all") else "") + field_name)
    if not config.get("case_sensitive"):
        names = [name.upper() for name in names]
    return list(dict.fromkeys(names))


def render_default(field_name: str, field: FieldInfo) -> str:
    """A field's default as the README shows it: a value as it would be written
    in the environment (durations in ISO 8601), ``unset`` for None, ``empty``
    for an empty string; a secret's value is never shown (``hidden``)."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True, validated_data={})
    if default is None:
        return "unset"
    if _is_secret(field.annotation) or isinstance(default, SecretStr | SecretBytes | Secret):
        return "hidden"
    value = to_jsonable_python(default)
    if value == "":
        return "empty"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    rendered = f"`{_escape(text)}`"
    if field_name.endswith("_bytes") and type(default) is int:
        rendered += _binary_size(default)
    return rendered


def render_meaning(field: FieldInfo) -> str:
    """The field's docstring on one line, its ``code`` spans in markdown."""
    return _one_line(field.description or "")


def render_table(
    settings_class: type[BaseSettings],
    *,
    fields: Mapping[str, FieldInfo] | None = None,
    config: Mapping[str, Any] | None = None,
) -> str:
    """One markdown table of ``fields`` (default: all of the class's) as read
    with ``config`` (default: the class's ``model_config``). A field holding a
    nested settings class is left to that class's own section; ValueError for a
    field without a docstring, or a nested class that has no section."""
    if fields is None:
        fields = settings_class.model_fields
    if config is None:
        config = settings_class.model_config
    rows: list[str] = []
    for name, field in fields.items():
        nested = _settings_class(field)
        if nested is not None:
            if nested not in SHARED_CLASSES:
                raise ValueError(
                    f"{settings_class.__name__}.{name}: {nested.__name__} has no section"
                )
            continue
        if not field.description:
            raise ValueError(f"{settings_class.__name__}.{name} has no docstring")
        variables = " or ".join(f"`{_escape(env)}`" for env in env_names(name, field, config))
        rows.append(f"| {variables} | {render_default(name, field)} | {render_meaning(field)} |\n")
    return _TABLE_HEADER + "".join(rows)


def read_section(text: str) -> str:
    """What lies between the markers of ``text``; ValueError when they are not
    there once each, begin first."""
    start, end = _marker_span(text)
    return text[start:end]


def replace_section(text: str, section: str) -> str:
    """``text`` with ``section`` between its markers."""
    start, end = _marker_span(text)
    return text[:start] + section + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` compare) the README's configuration reference."""
    parser = argparse.ArgumentParser(
        prog="python -m conveyor.services.settings_reference",
        description="Render the configuration reference between the README's "
        f"{BEGIN_MARKER} and {END_MARKER} markers from the settings classes.",
    )
    parser.add_argument("readme", type=Path, help="the README to rewrite")
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 with a diff when the section is stale",
    )
    args = parser.parse_args(argv)
    readme: Path = args.readme
    section = render_reference()
    # Read only now, just before writing: other edits to the file must survive.
    text = readme.read_text(encoding="utf-8")
    try:
        updated = replace_section(text, section)
    except ValueError as error:
        print(f"{readme}: {error}", file=sys.stderr)
        return 2
    if args.check:
        if updated == text:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                text.splitlines(keepends=True),
                updated.splitlines(keepends=True),
                fromfile=f"{readme} (as written)",
                tofile=f"{readme} (from the settings classes)",
            )
        )
        print(f"{readme}: the configuration reference is stale: run `make settings-doc`")
        return 1
    if updated != text:
        readme.write_text(updated, encoding="utf-8")
    return 0


def _service_base_section(services: Sequence[type[ServiceSettings]]) -> str:
    base = ServiceSettings
    config = {**base.model_config, "env_prefix": _service_prefix_template(services)}
    nested = {name: _settings_class(field) for name, field in base.model_fields.items()}
    nested_names = [
        f"`{name}` (`{nested_class.__name__}`)"
        for name, nested_class in nested.items()
        if nested_class is not None
    ]
    intro = (
        f"{_class_summary(base)} `{SERVICE_NAME_MARK}` is the service's name, "
        f"upper-cased (`{services[0].service_name.upper()}`)."
    )
    if nested_names:
        intro += f" Read by their own classes below: {', '.join(nested_names)}."
    return _section(f"Every service: `{base.__name__}`", intro, base, base.model_fields, config)


def _shared_section(settings_class: type[BaseSettings]) -> str:
    return _section(
        f"`{settings_class.__name__}`",
        f"{_class_summary(settings_class)} In `{settings_class.__module__}`.",
        settings_class,
        settings_class.model_fields,
        settings_class.model_config,
    )


def _service_section(settings_class: type[ServiceSettings]) -> str:
    base_fields = ServiceSettings.model_fields
    added = {
        name: field
        for name, field in settings_class.model_fields.items()
        if name not in base_fields or _field_key(field) != _field_key(base_fields[name])
    }
    return _section(
        f"{settings_class.service_name}: `{settings_class.__name__}`",
        f"{_class_summary(settings_class)} Beyond every service's settings:",
        settings_class,
        added,
        settings_class.model_config,
    )


def _section(
    title: str,
    intro: str,
    settings_class: type[BaseSettings],
    fields: Mapping[str, FieldInfo],
    config: Mapping[str, Any],
) -> str:
    table = render_table(settings_class, fields=fields, config=config)
    return f"### {title}\n\n{intro}\n\n{table}"


def _service_prefix_template(services: Sequence[type[ServiceSettings]]) -> str:
    """The services' common ``env_prefix``, ``<SERVICE>`` where their names go."""
    templates = {
        str(service.model_config.get("env_prefix") or "").replace(
            service.service_name.upper(), SERVICE_NAME_MARK
        )
        for service in services
    }
    if len(templates) != 1 or SERVICE_NAME_MARK not in next(iter(templates)):
        raise ValueError(f"the services' env prefixes follow no one pattern: {sorted(templates)}")
    return templates.pop()


def _alias_heads(field: FieldInfo) -> list[str]:
    """The alias names that are environment variables: each choice of an
    ``AliasChoices``, the first key of an ``AliasPath``."""
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    heads: list[str] = []
    for choice in choices:
        if isinstance(choice, AliasPath):
            heads.append(str(choice.path[0]))
        elif isinstance(choice, str):
            heads.append(choice)
    return heads


def _validates_by_name(config: Mapping[str, Any]) -> bool:
    # pydantic's resolution: validate_by_name, else populate_by_name, else
    # implied when aliases are off.
    for key in ("validate_by_name", "populate_by_name"):
        if config.get(key) is not None:
            return bool(config[key])
    return config.get("validate_by_alias") is False


def _settings_class(field: FieldInfo) -> type[BaseSettings] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
        return annotation
    return None


def _field_key(field: FieldInfo) -> tuple[object, ...]:
    return (
        field.annotation,
        field.default,
        field.default_factory,
        field.validation_alias,
        field.description,
    )


def _is_secret(annotation: object) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, SecretStr | SecretBytes | Secret):
        return True
    if get_origin(annotation) is Secret:
        return True
    return any(_is_secret(argument) for argument in get_args(annotation))


def _class_summary(settings_class: type[BaseSettings]) -> str:
    """The first paragraph of the class's docstring, on one line."""
    return _one_line((settings_class.__doc__ or "").strip().split("\n\n")[0])


def _one_line(text: str) -> str:
    """Docstring text as one table-safe markdown line (``code`` becomes `code`)."""
    return _escape(re.sub(r"``([^`]+)``", r"`\1`", " ".join(text.split())))


def _binary_size(value: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size and value % size == 0:
            return f" ({value // size} {unit})"
    return ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _marker_span(text: str) -> tuple[int, int]:
    begin, end = f"{BEGIN_MARKER}\n", END_MARKER
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one {BEGIN_MARKER} line and one {END_MARKER}")
    start = text.index(begin) + len(begin)
    stop = text.index(end)
    if stop < start:
        raise ValueError(f"{END_MARKER} comes before {BEGIN_MARKER}")
    return start, stop


if __name__ == "__main__":
    sys.exit(main())
