"""A sweep's search space: the parameters it varies, its trials, their specs.

A parameter is addressed by its path in ``TrainingJobSpec``
(``hyperparameters.learning_rate``, ``hyperparameters.optimizer``,
``architecture.args.hidden_sizes``) and takes values from a real interval,
an integer interval or an explicit list. :func:`plan_trials` lays the trials
out deterministically:

- **GRID**: every combination, the last parameter varying fastest, cut off
  after ``max_trials``. Combinations are computed by index (mixed radix), so
  a huge grid costs nothing beyond the trials it runs.
- **RANDOM**: ``max_trials`` independent draws from a PCG64 generator seeded
  with the sweep's seed (log-uniform on a log-scale interval).

The data and the registration cannot be swept: trials are compared on one
validation split, and only the best trial is registered.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from conveyor.shared.errors import FieldViolation
from conveyor.trainer.v1 import resources_pb2 as pb

MAX_PARAMETERS: Final = 16
MAX_TRIALS: Final = 1_000
MAX_GRID_POINTS: Final = MAX_TRIALS
MAX_EXACT_INTEGER: Final = 2**53
"""Parameter values travel as ``google.protobuf.Value`` numbers (doubles)."""
FIXED_PREFIXES: Final = ("data", "registration")

_STRUCT: Final = struct_pb2.Struct.DESCRIPTOR.full_name
_REALS: Final = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
_INTEGERS: Final = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-MAX_EXACT_INTEGER, MAX_EXACT_INTEGER),
    FieldDescriptor.TYPE_SINT64: (-MAX_EXACT_INTEGER, MAX_EXACT_INTEGER),
    FieldDescriptor.TYPE_SFIXED64: (-MAX_EXACT_INTEGER, MAX_EXACT_INTEGER),
    FieldDescriptor.TYPE_UINT64: (0, MAX_EXACT_INTEGER),
    FieldDescriptor.TYPE_FIXED64: (0, MAX_EXACT_INTEGER),
}


# -- paths --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a parameter's value goes: the message fields leading to it, then
    a scalar field or a key of a ``Struct`` field."""

    fields: tuple[str, ...]
    leaf: FieldDescriptor | None
    """The scalar field set, or None for a ``Struct`` key."""
    struct_key: str = ""

    @property
    def takes_reals(self) -> bool:
        return self.leaf is None or self.leaf.type in _REALS

    @property
    def takes_integers_only(self) -> bool:
        return self.leaf is not None and self.leaf.type in _INTEGERS


def resolve_path(path: str) -> Target | str:
    """The target of ``path`` in ``TrainingJobSpec``, or why it cannot be swept."""
    segments = path.split(".")
    if not path or any(not s for s in segments):
        return "a dotted field path such as hyperparameters.learning_rate"
    if segments[0] in FIXED_PREFIXES:
        return (
            f"{segments[0]} cannot be swept: trials share the data and split they are "
            "compared on, and only the best trial is registered"
        )
    message: Descriptor = pb.TrainingJobSpec.DESCRIPTOR
    walked: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if message.full_name == _STRUCT:
            if not last:
                return f"{'.'.join(walked)} takes one key level ({segment} is the key)"
            return Target(tuple(walked), None, segment)
        field = message.fields_by_name.get(segment)
        if field is None:
            known = ", ".join(sorted(message.fields_by_name))
            return f"{message.name} has no field {segment!r}; it has: {known}"
        if field.is_repeated:
            return f"{segment} is a list field; sweep a list inside architecture.args instead"
        walked.append(segment)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if last:
                return f"{segment} is a message; name one of its fields"
            assert field.message_type is not None  # a message field has a type
            message = field.message_type
            continue
        if not last:
            return f"{segment} is a single value with no fields"
        if field.type == FieldDescriptor.TYPE_BYTES:
            return f"{segment} holds bytes and cannot be swept"
        return Target(tuple(walked), field)
    raise AssertionError("unreachable: the loop returns at the last segment")


def convert(value: struct_pb2.Value, target: Target) -> struct_pb2.Value | str:
    """``value`` as the target field takes it (enum names resolved, integers
    checked), or why it does not fit."""
    leaf = target.leaf
    kind = value.WhichOneof("kind")
    if leaf is None:
        if kind is None or kind == "null_value":
            return "a value, not null"
        return value
    if leaf.type == FieldDescriptor.TYPE_BOOL:
        return value if kind == "bool_value" else "true or false"
    if leaf.type == FieldDescriptor.TYPE_STRING:
        return value if kind == "string_value" else "a string"
    if leaf.type == FieldDescriptor.TYPE_ENUM:
        return _enum_value(value, leaf)
    if kind != "number_value" or not math.isfinite(value.number_value):
        return "a finite number"
    if leaf.type in _REALS:
        return value
    low, high = _INTEGERS[leaf.type]
    if not value.number_value.is_integer() or not low <= value.number_value <= high:
        return f"an integer from {low} to {high}"
    return value


def _enum_value(value: struct_pb2.Value, leaf: FieldDescriptor) -> struct_pb2.Value | str:
    prefix = _enum_prefix(leaf)
    names = [v.name for v in _enum(leaf).values if not v.name.endswith("_UNSPECIFIED")]
    short = [name.removeprefix(prefix) for name in names]
    if value.WhichOneof("kind") == "string_value":
        given = value.string_value.upper()
        for name, plain in zip(names, short, strict=True):
            if given in (name, plain):
                return struct_pb2.Value(string_value=plain)
    return f"one of {', '.join(short)}"


def _enum(leaf: FieldDescriptor) -> EnumDescriptor:
    assert leaf.enum_type is not None  # an enum field has a type
    return leaf.enum_type


def _enum_prefix(leaf: FieldDescriptor) -> str:
    """``OPTIMIZER_ALGORITHM_`` of ``OPTIMIZER_ALGORITHM_SGD``, ``..._ADAM``."""
    words = [value.name.split("_") for value in _enum(leaf).values]
    shared: list[str] = []
    for parts in zip(*words, strict=False):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    shared = shared[: min(len(w) for w in words) - 1]
    return "".join(f"{word}_" for word in shared)


def apply(spec: pb.TrainingJobSpec, parameters: struct_pb2.Struct) -> pb.TrainingJobSpec:
    """A copy of ``spec`` with each parameter (path → value, already
    converted by :func:`convert`) set."""
    trial = pb.TrainingJobSpec()
    trial.CopyFrom(spec)
    for path, value in parameters.fields.items():
        target = resolve_path(path)
        if isinstance(target, str):
            raise ValueError(f"{path}: {target}")
        message = trial
        for name in target.fields[:-1]:
            message = getattr(message, name)
        if target.leaf is None:
            getattr(message, target.fields[-1]).fields[target.struct_key].CopyFrom(value)
        elif target.leaf.type == FieldDescriptor.TYPE_ENUM:
            name = f"{_enum_prefix(target.leaf)}{value.string_value}"
            number = _enum(target.leaf).values_by_name[name].number
            setattr(message, target.leaf.name, number)
        elif target.leaf.type in _INTEGERS:
            setattr(message, target.leaf.name, int(value.number_value))
        elif target.leaf.type in _REALS:
            setattr(message, target.leaf.name, value.number_value)
        elif target.leaf.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, target.leaf.name, value.bool_value)
        else:
            setattr(message, target.leaf.name, value.string_value)
    return trial


# -- domains ------------------------------------------------------------------------


class Domain(ABC):
    """The values one parameter takes."""

    @property
    @abstractmethod
    def size(self) -> int:
        """How many grid points it has."""

    @abstractmethod
    def at(self, index: int) -> struct_pb2.Value:
        """The ``index``-th grid point."""

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> struct_pb2.Value:
        """A random value."""


@dataclass(frozen=True)
class RealDomain(Domain):
    low: float
    high: float
    log_scale: bool
    grid_points: int

    @property
    def size(self) -> int:
        return self.grid_points

    def at(self, index: int) -> struct_pb2.Value:
        if index == 0:
            return _number(self.low)
        if index == self.grid_points - 1:
            return _number(self.high)
        fraction = index / (self.grid_points - 1)
        if self.log_scale:
            log_low, log_high = math.log(self.low), math.log(self.high)
            # 12 significant digits: 0.01, not exp(log(...))'s 0.010000000000000004.
            return _number(float(f"{math.exp(log_low + fraction * (log_high - log_low)):.12g}"))
        return _number(self.low + fraction * (self.high - self.low))

    def sample(self, rng: np.random.Generator) -> struct_pb2.Value:
        if self.log_scale:
            point = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
            return _number(min(max(point, self.low), self.high))
        return _number(float(rng.uniform(self.low, self.high)))


@dataclass(frozen=True)
class IntegerDomain(Domain):
    low: int
    high: int
    step: int

    @property
    def size(self) -> int:
        return (self.high - self.low) // self.step + 1

    def at(self, index: int) -> struct_pb2.Value:
        return _number(float(self.low + index * self.step))

    def sample(self, rng: np.random.Generator) -> struct_pb2.Value:
        return self.at(int(rng.integers(0, self.size)))


@dataclass(frozen=True)
class ListDomain(Domain):
    values: tuple[struct_pb2.Value, ...]

    @property
    def size(self) -> int:
        return len(self.values)

    def at(self, index: int) -> struct_pb2.Value:
        return self.values[index]

    def sample(self, rng: np.random.Generator) -> struct_pb2.Value:
        return self.at(int(rng.integers(0, self.size)))


def _number(value: float) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=value)


# -- the space -----------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    path: str
    target: Target
    domain: Domain


def search_space(
    spec: pb.SweepJobSpec, field: str, violations: list[FieldViolation]
) -> list[Parameter]:
    """The parameters of ``spec``, each bad one recorded in ``violations``
    (under ``{field}.parameters[i]``)."""
    grid = spec.algorithm == pb.SEARCH_ALGORITHM_GRID
    if not spec.parameters:
        violations.append(FieldViolation(f"{field}.parameters", "required: at least one"))
    if len(spec.parameters) > MAX_PARAMETERS:
        violations.append(FieldViolation(f"{field}.parameters", f"at most {MAX_PARAMETERS}"))
    seen: set[str] = set()
    found: list[Parameter] = []
    for index, parameter in enumerate(spec.parameters[:MAX_PARAMETERS]):
        at = f"{field}.parameters[{index}]"
        if parameter.path in seen:
            violations.append(FieldViolation(f"{at}.path", "already varied by another parameter"))
            continue
        seen.add(parameter.path)
        target = resolve_path(parameter.path)
        if isinstance(target, str):
            violations.append(FieldViolation(f"{at}.path", target))
            continue
        domain = _domain(parameter, target, grid=grid, field=at, violations=violations)
        if domain is not None:
            found.append(Parameter(parameter.path, target, domain))
    return found


def _domain(
    parameter: pb.ParameterSpec,
    target: Target,
    *,
    grid: bool,
    field: str,
    violations: list[FieldViolation],
) -> Domain | None:
    kind = parameter.WhichOneof("domain")
    if kind == "double_range":
        return _real_domain(
            parameter.double_range, target, grid, f"{field}.double_range", violations
        )
    if kind == "integer_range":
        return _integer_domain(
            parameter.integer_range, target, f"{field}.integer_range", violations
        )
    if kind == "categorical":
        return _list_domain(parameter.categorical, target, f"{field}.categorical", violations)
    violations.append(
        FieldViolation(field, "required: one of double_range, integer_range or categorical")
    )
    return None


def _real_domain(
    interval: pb.DoubleRange,
    target: Target,
    grid: bool,
    field: str,
    violations: list[FieldViolation],
) -> Domain | None:
    before = len(violations)
    if not target.takes_reals:
        violations.append(
            FieldViolation(
                field, "the field takes integers or names: use integer_range or categorical"
            )
        )
    if not (math.isfinite(interval.min) and math.isfinite(interval.max)):
        violations.append(FieldViolation(field, "min and max must be finite"))
    elif interval.min > interval.max:
        violations.append(FieldViolation(f"{field}.max", "must be at least min"))
    elif interval.log_scale and interval.min <= 0:
        violations.append(FieldViolation(f"{field}.min", "must be greater than 0 on a log scale"))
    points = interval.grid_points
    if grid and not 2 <= points <= MAX_GRID_POINTS:
        violations.append(
            FieldViolation(f"{field}.grid_points", f"from 2 to {MAX_GRID_POINTS} for GRID search")
        )
    elif interval.grid_points < 0:
        violations.append(FieldViolation(f"{field}.grid_points", "must not be negative"))
    if len(violations) > before:
        return None
    return RealDomain(interval.min, interval.max, interval.log_scale, max(points, 2))


def _integer_domain(
    interval: pb.IntegerRange, target: Target, field: str, violations: list[FieldViolation]
) -> Domain | None:
    before = len(violations)
    if target.leaf is not None and not (target.takes_reals or target.takes_integers_only):
        violations.append(FieldViolation(field, "the field does not take numbers"))
    step = interval.step or 1
    if interval.min > interval.max:
        violations.append(FieldViolation(f"{field}.max", "must be at least min"))
    if step < 0:
        violations.append(FieldViolation(f"{field}.step", "must be positive; 0 means 1"))
    if max(abs(interval.min), abs(interval.max)) > MAX_EXACT_INTEGER:
        violations.append(FieldViolation(field, f"bounds within ±2^53 ({MAX_EXACT_INTEGER})"))
    if len(violations) > before:
        return None
    domain = IntegerDomain(interval.min, interval.max, step)
    for end in (domain.at(0), domain.at(domain.size - 1)):
        converted = convert(end, target)
        if isinstance(converted, str):
            violations.append(FieldViolation(field, f"the field takes {converted}"))
            return None
    return domain


def _list_domain(
    values: pb.CategoricalValues, target: Target, field: str, violations: list[FieldViolation]
) -> Domain | None:
    if not values.values:
        violations.append(FieldViolation(f"{field}.values", "required: at least one value"))
        return None
    if len(values.values) > MAX_GRID_POINTS:
        violations.append(FieldViolation(f"{field}.values", f"at most {MAX_GRID_POINTS}"))
        return None
    converted: list[struct_pb2.Value] = []
    for index, value in enumerate(values.values):
        result = convert(value, target)
        if isinstance(result, str):
            violations.append(FieldViolation(f"{field}.values[{index}]", f"must be {result}"))
        else:
            converted.append(result)
    if len(converted) < len(values.values):
        return None
    return ListDomain(tuple(converted))


def grid_size(parameters: list[Parameter]) -> int:
    """How many combinations the parameters' grids make."""
    return math.prod(parameter.domain.size for parameter in parameters)


def plan_trials(spec: pb.SweepJobSpec, parameters: list[Parameter]) -> list[struct_pb2.Struct]:
    """Each trial's parameter values (path → value), in trial order."""
    count = min(spec.max_trials, MAX_TRIALS)
    if spec.algorithm == pb.SEARCH_ALGORITHM_GRID:
        count = min(count, grid_size(parameters))
        return [_combination(parameters, index) for index in range(count)]
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    trials = []
    for _ in range(count):
        trial = struct_pb2.Struct()
        for parameter in parameters:
            trial.fields[parameter.path].CopyFrom(parameter.domain.sample(rng))
        trials.append(trial)
    return trials


def _combination(parameters: list[Parameter], index: int) -> struct_pb2.Struct:
    """The ``index``-th grid combination, the last parameter varying fastest."""
    trial = struct_pb2.Struct()
    digits = []
    for parameter in reversed(parameters):
        index, digit = divmod(index, parameter.domain.size)
        digits.append((parameter, digit))
    for parameter, digit in reversed(digits):
        trial.fields[parameter.path].CopyFrom(parameter.domain.at(digit))
    return trial
