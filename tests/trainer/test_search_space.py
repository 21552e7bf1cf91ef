"""A sweep's search space: field paths, value conversion, grid and random
plans, trial specs, ranking of trials, and the checks CreateSweepJob runs."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from conveyor.services.trainer import search_space, sweeps
from conveyor.services.trainer.datasets import DatasetSchema
from conveyor.shared.errors import FieldViolation
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import make_spec

BINARY = DatasetSchema((30,), 2, pb.DATA_MODALITY_TABULAR, 569)
THREE_CLASSES = DatasetSchema((8,), 3, pb.DATA_MODALITY_TABULAR, 300)


def value(python: Any) -> struct_pb2.Value:
    converted = struct_pb2.Value()
    json_format.ParseDict(python, converted)
    return converted


def parameter(path: str, **domain: Any) -> pb.ParameterSpec:
    spec = pb.ParameterSpec(path=path)
    if "values" in domain:
        spec.categorical.values.extend(value(v) for v in domain["values"])
    elif "step" in domain or isinstance(domain.get("min"), int):
        spec.integer_range.CopyFrom(pb.IntegerRange(**domain))
    else:
        spec.double_range.CopyFrom(pb.DoubleRange(**domain))
    return spec


def sweep_spec(*parameters: pb.ParameterSpec, **fields: Any) -> pb.SweepJobSpec:
    fields.setdefault("algorithm", pb.SEARCH_ALGORITHM_GRID)
    fields.setdefault("max_trials", 100)
    fields.setdefault("objective_metric", "accuracy")
    return pb.SweepJobSpec(
        base_spec=make_spec("datasets/breast-cancer", args={"hidden_sizes": [8]}),
        parameters=parameters,
        **fields,
    )


def space(spec: pb.SweepJobSpec) -> tuple[list[search_space.Parameter], list[FieldViolation]]:
    violations: list[FieldViolation] = []
    return search_space.search_space(spec, "spec", violations), violations


def plan(spec: pb.SweepJobSpec) -> list[dict[str, Any]]:
    parameters, violations = space(spec)
    assert violations == []
    return [json_format.MessageToDict(t) for t in search_space.plan_trials(spec, parameters)]


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("", "dotted field path"),
        ("hyperparameters..dropout", "dotted field path"),
        ("data.split_seed", "data cannot be swept"),
        ("registration.model", "registration cannot be swept"),
        ("hyperparameters.learnin_rate", "has no field 'learnin_rate'"),
        ("hyperparameters", "is a message"),
        ("max_run_duration", "is a message"),
        ("hyperparameters.epochs.x", "single value with no fields"),
        ("architecture.args.a.b", "one key level"),
    ],
)
def test_paths_that_cannot_be_swept_say_why(path: str, fragment: str) -> None:
    target = search_space.resolve_path(path)
    assert isinstance(target, str)
    assert fragment in target


def test_paths_reach_scalars_nested_messages_and_architecture_arguments() -> None:
    learning_rate = search_space.resolve_path("hyperparameters.learning_rate")
    patience = search_space.resolve_path("hyperparameters.early_stopping.patience")
    hidden = search_space.resolve_path("architecture.args.hidden_sizes")
    assert isinstance(learning_rate, search_space.Target)
    assert learning_rate.takes_reals
    assert isinstance(patience, search_space.Target)
    assert patience.takes_integers_only
    assert isinstance(hidden, search_space.Target)
    assert (hidden.fields, hidden.leaf, hidden.struct_key) == (
        ("architecture", "args"),
        None,
        "hidden_sizes",
    )


def test_values_are_converted_to_what_the_field_takes() -> None:
    def target(path: str) -> search_space.Target:
        found = search_space.resolve_path(path)
        assert isinstance(found, search_space.Target)
        return found

    optimizer = target("hyperparameters.optimizer")
    assert search_space.convert(value("adamw"), optimizer) == value("ADAMW")
    assert search_space.convert(value("OPTIMIZER_ALGORITHM_SGD"), optimizer) == value("SGD")
    assert search_space.convert(value("rmsprop"), optimizer) == "one of SGD, ADAM, ADAMW"
    epochs = target("hyperparameters.epochs")
    assert search_space.convert(value(2.5), epochs) == f"an integer from {-(2**31)} to {2**31 - 1}"
    assert search_space.convert(value(3), epochs) == value(3)
    assert search_space.convert(value("3"), epochs) == "a finite number"
    stratify = target("hyperparameters.augmentation.horizontal_flip")
    assert search_space.convert(value(1), stratify) == "true or false"
    hidden = target("architecture.args.hidden_sizes")
    assert search_space.convert(value([16, 8]), hidden) == value([16, 8])
    assert search_space.convert(struct_pb2.Value(null_value=0), hidden) == "a value, not null"


def test_a_grid_enumerates_every_combination_with_the_last_parameter_fastest() -> None:
    spec = sweep_spec(
        parameter(
            "hyperparameters.learning_rate", min=1e-4, max=1e-2, log_scale=True, grid_points=3
        ),
        parameter("hyperparameters.optimizer", values=["sgd", "adam"]),
        parameter("hyperparameters.epochs", min=1, max=5, step=2),
    )
    trials = plan(spec)
    assert len(trials) == 3 * 2 * 3
    assert [t["hyperparameters.learning_rate"] for t in trials[::6]] == [1e-4, 1e-3, 1e-2]
    assert [t["hyperparameters.optimizer"] for t in trials[:6]] == ["SGD"] * 3 + ["ADAM"] * 3
    assert [t["hyperparameters.epochs"] for t in trials[:3]] == [1, 3, 5]
    assert len({tuple(sorted(t.items())) for t in trials}) == 18  # all distinct
    spec.max_trials = 4
    assert plan(spec) == trials[:4]


def test_a_huge_grid_costs_only_the_trials_it_runs() -> None:
    spec = sweep_spec(
        parameter("hyperparameters.seed", min=0, max=2**40),
        parameter("hyperparameters.epochs", min=1, max=10_000),
        max_trials=3,
    )
    assert plan(spec) == [
        {"hyperparameters.seed": 0, "hyperparameters.epochs": n} for n in (1, 2, 3)
    ]


def test_random_search_is_seeded_and_stays_inside_the_ranges() -> None:
    spec = sweep_spec(
        parameter("hyperparameters.learning_rate", min=1e-5, max=1e-1, log_scale=True),
        parameter("hyperparameters.dropout", min=0.0, max=0.5),
        parameter("hyperparameters.batch_size", min=16, max=64, step=16),
        parameter("architecture.args.hidden_sizes", values=[[8], [16, 8]]),
        algorithm=pb.SEARCH_ALGORITHM_RANDOM,
        max_trials=200,
        seed=42,
    )
    trials = plan(spec)
    assert trials == plan(spec)
    spec.seed = 43
    assert plan(spec) != trials
    rates = [t["hyperparameters.learning_rate"] for t in trials]
    assert all(1e-5 <= r <= 1e-1 for r in rates)
    # Log-uniform: about half the draws below the geometric midpoint 1e-3.
    assert 70 < sum(r < 1e-3 for r in rates) < 130
    assert {t["hyperparameters.batch_size"] for t in trials} == {16, 32, 48, 64}
    assert all(0.0 <= t["hyperparameters.dropout"] <= 0.5 for t in trials)
    assert {tuple(t["architecture.args.hidden_sizes"]) for t in trials} == {(8,), (16, 8)}


def test_a_trial_spec_is_the_base_spec_with_its_values() -> None:
    spec = sweep_spec(
        parameter("hyperparameters.optimizer", values=["sgd"]),
        parameter("hyperparameters.momentum", values=[0.9]),
        parameter("hyperparameters.epochs", values=[7]),
        parameter("architecture.args.hidden_sizes", values=[[16, 8]]),
        parameter("hyperparameters.early_stopping.patience", values=[2]),
    )
    parameters, _ = space(spec)
    [values] = search_space.plan_trials(spec, parameters)
    trial = search_space.apply(spec.base_spec, values)
    hp = trial.hyperparameters
    assert (hp.optimizer, hp.momentum, hp.epochs) == (pb.OPTIMIZER_ALGORITHM_SGD, 0.9, 7)
    assert hp.early_stopping.patience == 2
    assert json_format.MessageToDict(trial.architecture.args) == {"hidden_sizes": [16, 8]}
    assert trial.data == spec.base_spec.data
    assert spec.base_spec.hyperparameters.epochs == 3  # the base is untouched


def test_bad_parameters_are_each_named() -> None:
    spec = sweep_spec(
        parameter("hyperparameters.learning_rate", min=0.1, max=0.01, grid_points=2),
        parameter("hyperparameters.dropout", min=0.0, max=0.5),  # GRID needs grid_points
        parameter("hyperparameters.weight_decay", min=0.0, max=1.0, log_scale=True, grid_points=2),
        parameter("hyperparameters.epochs", min=1.0, max=3.0, grid_points=2),  # integers
        parameter("hyperparameters.optimizer", values=["sgd", "rmsprop"]),
        parameter("hyperparameters.momentum", values=[]),
        parameter("hyperparameters.momentum", values=[0.5]),
        parameter("data.split_seed", values=[1]),
        pb.ParameterSpec(path="hyperparameters.seed"),
    )
    _, violations = space(spec)
    assert [v.field for v in violations] == [
        "spec.parameters[0].double_range.max",
        "spec.parameters[1].double_range.grid_points",
        "spec.parameters[2].double_range.min",
        "spec.parameters[3].double_range",
        "spec.parameters[4].categorical.values[1]",
        "spec.parameters[5].categorical.values",
        "spec.parameters[6].path",
        "spec.parameters[7].path",
        "spec.parameters[8]",
    ]
    assert "use integer_range or categorical" in violations[3].description
    assert "SGD, ADAM, ADAMW" in violations[4].description
    assert "already varied" in violations[6].description


def test_a_sweep_needs_parameters_an_algorithm_and_a_bounded_size() -> None:
    spec = pb.SweepJobSpec(max_trials=0, max_parallel_trials=65, objective_goal=7)
    _, violations = space(spec)
    violations += sweeps.sweep_violations(spec, "spec")
    assert {v.field for v in violations} == {
        "spec.parameters",
        "spec.algorithm",
        "spec.max_trials",
        "spec.max_parallel_trials",
        "spec.objective_metric",
        "spec.objective_goal",
    }


def test_the_objective_is_a_validation_metric_the_task_has() -> None:
    spec = sweep_spec(objective_metric="roc_auc")
    assert sweeps.objective_violations(spec, BINARY, "spec") == []
    [violation] = sweeps.objective_violations(spec, THREE_CLASSES, "spec")
    assert violation.field == "spec.objective_metric"
    assert "roc_auc" not in violation.description
    assert sweeps.objective_violations(sweep_spec(objective_metric="test/accuracy"), BINARY, "x")


def test_invalid_trials_are_named_with_their_values() -> None:
    spec = sweep_spec(
        parameter("hyperparameters.learning_rate", values=[0.01, 20.0, 50.0]),
        parameter("hyperparameters.dropout", values=[0.0, 0.2]),
    )
    parameters, _ = space(spec)
    found = sweeps.trial_violations(spec, parameters, BINARY, cuda_available=False, field="spec")
    assert len(found) == 4  # trials 3 to 6: learning rates above 10
    assert {v.field for v in found} == {"spec.parameters"}
    assert found[0].description.startswith(
        'trial 3 {"hyperparameters.dropout": 0.0, "hyperparameters.learning_rate": 20.0} '
        "is invalid: spec.base_spec.hyperparameters.learning_rate:"
    )


def trial(job: str, state: pb.JobState.ValueType, objective: float | None = None) -> pb.SweepTrial:
    made = pb.SweepTrial(training_job=f"trainingJobs/{job}", state=state)
    if objective is not None:
        made.objective_value = objective
    return made


def test_the_best_trial_is_the_best_succeeded_one_and_the_earliest_on_ties() -> None:
    sweep = pb.SweepJob(spec=sweep_spec(objective_metric="accuracy"))
    sweep.trials.extend(
        [
            trial("a", pb.JOB_STATE_SUCCEEDED, 0.9),
            trial("b", pb.JOB_STATE_SUCCEEDED, 0.95),
            trial("c", pb.JOB_STATE_FAILED),
            trial("d", pb.JOB_STATE_SUCCEEDED, 0.95),
            trial("e", pb.JOB_STATE_RUNNING),
        ]
    )
    best = sweeps.best_trial(sweep)
    assert best is not None
    assert best.training_job == "trainingJobs/b"
    sweep.spec.objective_metric = "loss"  # smaller is better
    best = sweeps.best_trial(sweep)
    assert best is not None
    assert best.training_job == "trainingJobs/a"
    sweep.spec.objective_goal = pb.METRIC_GOAL_MAXIMIZE
    best = sweeps.best_trial(sweep)
    assert best is not None
    assert best.training_job == "trainingJobs/b"
    assert sweeps.best_trial(pb.SweepJob(spec=sweep.spec, trials=sweep.trials[2:3])) is None


def test_recording_trials_copies_states_objectives_and_the_best() -> None:
    sweep = pb.SweepJob(spec=sweep_spec(objective_metric="f1"))
    sweep.trials.extend([trial("a", pb.JOB_STATE_RUNNING), trial("b", pb.JOB_STATE_QUEUED)])
    done = pb.TrainingJob(name="trainingJobs/a", state=pb.JOB_STATE_SUCCEEDED)
    done.result.validation_metrics.update({"f1": 0.8, "accuracy": 0.9})
    started = pb.TrainingJob(name="trainingJobs/b", state=pb.JOB_STATE_RUNNING)
    assert sweeps.record_trials(sweep, {done.name: done, started.name: started})
    assert [(t.state, t.HasField("objective_value")) for t in sweep.trials] == [
        (pb.JOB_STATE_SUCCEEDED, True),
        (pb.JOB_STATE_RUNNING, False),
    ]
    assert math.isclose(sweep.trials[0].objective_value, 0.8)
    assert sweep.best_trial == "trainingJobs/a"
    assert not sweeps.record_trials(sweep, {done.name: done, started.name: started})


def test_a_trial_job_registers_nothing_and_names_its_sweep() -> None:
    sweep = pb.SweepJob(
        name="sweepJobs/lr", spec=sweep_spec(), labels={"team": "a"}, created_by="user:alice"
    )
    sweep.spec.base_spec.registration.model = "models/fraud"
    values = struct_pb2.Struct()
    values.fields["hyperparameters.learning_rate"].number_value = 0.5
    job = sweeps.trial_job(sweep, 2, values)
    assert (job.name, job.sweep_job, job.created_by) == (
        "trainingJobs/lr-trial-3",
        "sweepJobs/lr",
        "user:alice",
    )
    assert job.display_name == "lr trial 3"
    assert not job.spec.HasField("registration")
    assert job.spec.hyperparameters.learning_rate == 0.5
    assert dict(job.labels) == {"team": "a"}
