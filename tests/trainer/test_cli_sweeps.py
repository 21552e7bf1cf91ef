"""``conveyor train … --sweep`` and ``conveyor sweeps …`` against a real trainer
(and registry).

The commands run as in ``test_cli.py``: in a worker thread while the servers
serve on the test's loop, their stdout and stderr read as a person (or a
script, with ``--json``) would. Only one test trains (a grid of two one-epoch
trials); the others run against a trainer that starts no job.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from conveyor.services import cli
from conveyor.services.trainer import sweep_cli as trainer_cli
from conveyor.services.trainer import sweep_output as cli_output
from conveyor.services.trainer.sweep_output import SweepView
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.registry import create_model
from tests.support.trainer import Running, running_trainer
from tests.trainer.test_cli import CANCER, conveyor, free_port, usage_error

TRAINING_TIMEOUT_S = 240
LEARNING_RATE = "hyperparameters.learning_rate"


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer and the registry by themselves (as in ``test_cli.py``)."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")
    for name in ("CONVEYOR_TOKEN_FILE", "CONVEYOR_TOKEN", "CONVEYOR_TRAINER_ADDR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def paused(tmp_path: Path) -> AsyncIterator[Running]:
    """A trainer that queues jobs and starts none, without a registry."""
    async with running_trainer(tmp_path, with_registry=False, max_running_jobs=0) as running:
        yield running


async def get_sweep(served: Running, name: str) -> pb.SweepJob:
    reply = await served.trainer.GetSweepJob(rpc.GetSweepJobRequest(name=name), timeout=30)
    return reply.sweep_job


def parameter(**fields: Any) -> pb.ParameterSpec:
    return json_format.ParseDict({"path": LEARNING_RATE, **fields}, pb.ParameterSpec())


# -- DOMAIN syntax and flags -------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("1e-4..1e-1", {"double_range": {"min": 1e-4, "max": 0.1}}),
        ("log:1e-4..1e-1", {"double_range": {"min": 1e-4, "max": 0.1, "log_scale": True}}),
        ("0..0.5", {"double_range": {"min": 0, "max": 0.5}}),
        ("log:1..100", {"double_range": {"min": 1, "max": 100, "log_scale": True}}),
        ("16..64:16", {"integer_range": {"min": 16, "max": 64, "step": 16}}),
        ("1..5", {"integer_range": {"min": 1, "max": 5, "step": 1}}),
        ("-3..-1", {"integer_range": {"min": -3, "max": -1, "step": 1}}),
        ("sgd,adam", {"categorical": {"values": ["sgd", "adam"]}}),
        ("0.1, 2,true", {"categorical": {"values": [0.1, 2, True]}}),
        ("x,[32],{}", {"categorical": {"values": ["x", [32], {}]}}),
        ("adam", {"categorical": {"values": ["adam"]}}),
        ("[[32,16],[64]]", {"categorical": {"values": [[32, 16], [64]]}}),
        ("[32,16]", {"categorical": {"values": [32, 16]}}),
        ('["a..b", null]', {"categorical": {"values": ["a..b", None]}}),
    ],
)
def test_a_domain_is_the_parameter_it_writes(domain: str, expected: dict[str, Any]) -> None:
    assert trainer_cli.sweep_parameter(f"{LEARNING_RATE}={domain}") == parameter(**expected)


async def test_bad_domains_and_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for domain, message in (
        ("16..64:x", "a range with a step is whole numbers LOW..HIGH:STEP, e.g. 16..64:16"),
        ("0.5..2:1", "a range with a step is whole numbers LOW..HIGH:STEP"),
        ("log:1..9:2", "a range with a step is whole numbers LOW..HIGH:STEP"),
        ("1..5:0", "the STEP of LOW..HIGH:STEP must be at least 1"),
        ("small..big", "a range is two numbers LOW..HIGH, e.g. 1e-4..1e-1"),
        ("1..inf", "a range is two numbers LOW..HIGH"),
        ("log:sgd", "log: takes a real range, e.g. log:1e-4..1e-1"),
        ("sgd,,adam", "a list of values is A,B,C with none empty"),
        ("[32,16", "a DOMAIN starting with [ is a JSON list of values, e.g. [[32,16],[64]]"),
        ("[]", "a DOMAIN starting with [ is a JSON list of values"),
        ("x,[32,16]", "commas split A,B,C: write values that are lists as one JSON list"),
    ):
        err = await usage_error(capsys, "train", "digits", "--sweep", f"{LEARNING_RATE}={domain}")
        assert f"argument --sweep: {message}" in err, err
        assert f", got '{LEARNING_RATE}={domain}'" in err
    for text in ("learning_rate", f"{LEARNING_RATE}=", "=1..2"):
        err = await usage_error(capsys, "train", "digits", "--sweep", text)
        assert f"argument --sweep: expected PATH=DOMAIN (e.g. {LEARNING_RATE}=log:" in err
        assert f"got '{text}'" in err
    assert "invalid choice: 'bayes'" in await usage_error(
        capsys, "train", "digits", "--sweep", f"{LEARNING_RATE}=1,2", "--search", "bayes"
    )
    assert "expected a whole number from 1 to 1,000, got '0'" in await usage_error(
        capsys, "train", "digits", "--sweep", f"{LEARNING_RATE}=1,2", "--trials", "0"
    )
    assert "argument --sweep-seed: expected a whole number from 0 to " in await usage_error(
        capsys, "train", "digits", "--sweep", f"{LEARNING_RATE}=1,2", "--sweep-seed", "-1"
    )
    assert "the following arguments are required: sweep" in await usage_error(
        capsys, "sweeps", "show"
    )

    # Flags that parse but cannot go together: refused before any call.
    sweep = ("--sweep", f"{LEARNING_RATE}=1e-3,1e-2")
    for argv, message in (
        (("--trials", "3"), "--trials shapes a sweep: add --sweep PATH=DOMAIN"),
        (("--sweep-id", "x"), "--sweep-id shapes a sweep: add --sweep PATH=DOMAIN"),
        (("--objective", "f1"), "--objective shapes a sweep: add --sweep PATH=DOMAIN"),
        (
            (*sweep, "--job-id", "x"),
            "--job-id names one training job; a sweep names its trials after itself: "
            "use --sweep-id",
        ),
        ((*sweep, "--sweep-seed", "3"), "--sweep-seed seeds random search: add --search random"),
        (
            (*sweep, "--search", "random", "--grid-points", "5"),
            "--grid-points spaces a grid; random search draws from the whole range",
        ),
        ((*sweep, "--patience", "2"), "--patience needs --early-stopping-metric"),
    ):
        result = await conveyor(capsys, "train", "digits", *argv)
        assert (result.code, result.out) == (2, ""), argv
        assert result.err == f"conveyor train: error: {message}\n"
    usage = await conveyor(capsys, "sweeps")
    assert usage.code == 2
    assert "cancel" in usage.err


def test_flags_make_the_sweep_they_name() -> None:
    parser = cli._parser()
    args = parser.parse_args(
        [
            "train",
            *CANCER,
            "--epochs",
            "2",
            "--early-stopping-metric",
            "f1",
            "--register-model",
            "cancer",
            "--sweep",
            f"{LEARNING_RATE}=log:1e-4..1e-2",
            "--sweep",
            "hyperparameters.optimizer=sgd,adam",
            "--sweep",
            "architecture.args.hidden_sizes=[[32,16],[64]]",
            "--grid-points",
            "4",
            "--parallel",
            "2",
            "--objective-goal",
            "maximize",
        ]
    )
    spec = trainer_cli.sweep_spec(args)
    expected = pb.SweepJobSpec(
        base_spec=trainer_cli.training_spec(args),
        algorithm=pb.SEARCH_ALGORITHM_GRID,
        max_trials=16,  # the whole grid: 4 points, 2 optimizers, 2 sizes
        max_parallel_trials=2,
        objective_metric="f1",  # the early-stopping metric
        objective_goal=pb.METRIC_GOAL_MAXIMIZE,
    )
    for given in (
        {
            "path": LEARNING_RATE,
            "double_range": {"min": 1e-4, "max": 1e-2, "log_scale": True, "grid_points": 4},
        },
        {"path": "hyperparameters.optimizer", "categorical": {"values": ["sgd", "adam"]}},
        {"path": "architecture.args.hidden_sizes", "categorical": {"values": [[32, 16], [64]]}},
    ):
        json_format.ParseDict(given, expected.parameters.add())
    assert spec == expected
    assert spec.base_spec.registration.model == "models/cancer"

    # Random search draws 10 trials unless told; the objective defaults to accuracy.
    args = parser.parse_args(
        ["train", "digits", "--sweep", f"{LEARNING_RATE}=1e-4..1e-2", "--search", "random"]
    )
    spec = trainer_cli.sweep_spec(args)
    assert (spec.algorithm, spec.max_trials, spec.objective_metric, spec.seed) == (
        pb.SEARCH_ALGORITHM_RANDOM,
        10,
        "accuracy",
        0,
    )
    assert spec.parameters[0].double_range.grid_points == 0  # a grid's only
    # A grid beyond the trainer's limit runs its first 1,000 combinations.
    args = parser.parse_args(
        ["train", "digits", "--sweep", "hyperparameters.batch_size=1..2000", "--trials", "7"]
    )
    assert trainer_cli.sweep_spec(args).max_trials == 7
    args = parser.parse_args(["train", "digits", "--sweep", "hyperparameters.batch_size=1..2000"])
    spec = trainer_cli.sweep_spec(args)
    assert (spec.max_trials, cli_output.grid_size(spec.parameters)) == (1000, 2000)
    assert cli_output.planned_trials(spec) == 1000


# -- a sweep end to end -------------------------------------------------------------------


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_a_sweep_trains_its_trials_and_registers_the_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_trainer(tmp_path, max_running_jobs=1) as served:
        assert served.registry is not None
        await create_model(served.registry, "cancer")
        result = await conveyor(
            capsys,
            "train",
            *CANCER,
            "--epochs",
            "1",
            "--sweep",
            f"{LEARNING_RATE}=1e-4,1e-2",
            "--register-model",
            "cancer",
            "--sweep-id",
            "lr",
            "--label",
            "purpose=test",
            served=served,
        )
        assert result.code == 0, result.err
        final = await get_sweep(served, "sweepJobs/lr")
        assert final.state == pb.JOB_STATE_SUCCEEDED
        assert final.model_version == "models/cancer/versions/1"
        objectives = [f"{trial.objective_value:.4f}" for trial in final.trials]
        best = [trial.training_job for trial in final.trials].index(final.best_trial)

        # Progress on stderr: the sweep's states and a line per trial change.
        lines = result.err.splitlines()
        # Queued first unless its first trial started before the watch did.
        assert lines[0].startswith(("sweepJobs/lr: queued (", "sweepJobs/lr: running ("))
        assert lines[0].endswith(" (grid search, 2 trials, 1 at a time)")
        assert lines[-1] == "sweepJobs/lr: succeeded"
        trial_lines = [line for line in lines if line.startswith("trial ")]
        assert trial_lines == sorted(trial_lines, key=lambda line: line.split()[1])
        assert [line for line in trial_lines if " SUCCEEDED " in line] == [
            f"trial 1/2 SUCCEEDED  {LEARNING_RATE}=0.0001  val accuracy {objectives[0]}",
            f"trial 2/2 SUCCEEDED  {LEARNING_RATE}=0.01  val accuracy {objectives[1]}",
        ]
        assert len(trial_lines) == len(set(trial_lines))  # no change printed twice

        # The outcome on stdout: the trials, the best marked, the version.
        out = result.out.splitlines()
        assert out[0].startswith("sweepJobs/lr succeeded: 2 of 2 trials succeeded in ")
        assert out[0].endswith(
            " (grid search, 2 trials, 1 at a time; objective: validation accuracy (maximize))"
        )
        assert out[1].split() == ["TRIAL", "LEARNING_RATE", "STATE", "VAL", "ACCURACY"]
        rows = [
            ["lr-trial-1", "0.0001", "succeeded", objectives[0]],
            ["lr-trial-2", "0.01", "succeeded", objectives[1]],
        ]
        rows[best].insert(0, "*")
        assert [line.split() for line in out[2:4]] == rows
        assert out[4:] == [
            "",
            f"best: trainingJobs/lr-trial-{best + 1} (val accuracy {objectives[best]}; "
            f"{LEARNING_RATE}={('0.0001', '0.01')[best]})",
            "registered: models/cancer/versions/1",
        ]

        # The ended sweep listed, shown and watched; cancelling it is refused.
        listed = await conveyor(capsys, "sweeps", "list", served=served)
        assert listed.code == 0, listed.err
        table = [line.split() for line in listed.out.splitlines()]
        assert table[0] == [
            "SWEEP",
            "STATE",
            "TRIALS",
            "BEST",
            "BEST",
            "TRIAL",
            "MODEL",
            "VERSION",
            "CREATED",
        ]
        assert table[1][:6] == [
            "lr",
            "succeeded",
            "2/2",
            f"accuracy={objectives[best]}",
            f"lr-trial-{best + 1}",
            "models/cancer/versions/1",
        ]
        shown = await conveyor(capsys, "sweeps", "show", "sweepJobs/lr", served=served)
        assert shown.code == 0, shown.err
        fields = dict(line.split(":  ", 1) for line in shown.out.splitlines() if ":  " in line)
        fields = {label.rstrip(":").strip(): value.strip() for label, value in fields.items()}
        assert fields["state"] == "SUCCEEDED"
        assert fields["search"] == "grid search, 2 trials, 1 at a time"
        assert fields["objective"] == "validation accuracy (maximize)"
        assert fields["parameters"] == f"{LEARNING_RATE} in {{0.0001, 0.01}}"
        assert fields["trials"] == "2 of 2 ended, 2 started"
        assert fields["dataset"].startswith("datasets/breast-cancer")
        assert fields["register in"] == "models/cancer"
        assert fields["labels"] == "purpose=test"
        assert fields["best trial"].startswith(f"trainingJobs/lr-trial-{best + 1} (val accuracy")
        assert fields["registered"] == "models/cancer/versions/1"
        assert shown.out.splitlines()[-2].split()[:1] == ["*" if best == 0 else "lr-trial-1"]
        watched = await conveyor(capsys, "sweeps", "watch", "lr", "--json", served=served)
        assert (watched.code, watched.err) == (0, "")  # an ended sweep's watch is its snapshot
        assert watched.json()["sweep_job"]["model_version"] == "models/cancer/versions/1"
        ended = await conveyor(capsys, "sweeps", "cancel", "lr", served=served)
        assert ended.code == 1
        assert ended.err.startswith("conveyor: FAILED_PRECONDITION: sweepJobs/lr already ")
        assert ended.err.splitlines()[-1] == (
            "hint: the sweep has already ended: `conveyor sweeps show lr` says how"
        )


# -- a sweep that does not train ---------------------------------------------------------


async def test_validate_only_no_watch_list_show_watch_and_cancel(
    paused: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = (
        *CANCER,
        "--epochs",
        "1",
        "--sweep",
        f"{LEARNING_RATE}=log:1e-4..1e-2",
        "--sweep",
        "hyperparameters.batch_size=16..32:16",
    )
    checked = await conveyor(capsys, "train", *grid, "--validate-only", served=paused)
    assert checked.code == 0, checked.err
    assert checked.out.startswith("valid: sweepJobs/sweep-")
    assert checked.out.endswith(" would run 6 trials; nothing was created\n")
    huge = await conveyor(
        capsys,
        "train",
        *CANCER,
        "--sweep",
        "hyperparameters.batch_size=1..5000",
        "--validate-only",
        served=paused,
    )
    assert huge.code == 0, huge.err
    assert huge.out.endswith(" would run 1000 trials; nothing was created\n")
    assert huge.err == (
        "conveyor: the grid has 5,000 combinations; the sweep runs the first 1,000 "
        "(coarsen the grid, or use --search random)\n"
    )
    empty = await conveyor(capsys, "sweeps", "list", served=paused)
    assert (empty.code, empty.out, empty.err) == (0, "", "no sweeps\n")

    queued = await conveyor(
        capsys, "train", *grid, "--sweep-id", "grid", "--no-watch", served=paused
    )
    assert (queued.code, queued.out) == (0, "sweepJobs/grid\n"), queued.err
    assert "follow it with `conveyor sweeps watch grid`" in queued.err
    drawn = await conveyor(
        capsys,
        "train",
        *CANCER,
        "--sweep",
        "hyperparameters.dropout=0..0.5",
        "--search",
        "random",
        "--trials",
        "2",
        "--sweep-seed",
        "5",
        "--parallel",
        "2",
        "--objective",
        "loss",
        "--no-watch",
        "--json",
        served=paused,
    )
    assert drawn.code == 0, drawn.err
    random = drawn.json()["sweep_job"]
    assert random["state"] == "JOB_STATE_QUEUED"
    assert {key: random["spec"][key] for key in ("algorithm", "max_trials", "seed")} == {
        "algorithm": "SEARCH_ALGORITHM_RANDOM",
        "max_trials": 2,
        "seed": "5",
    }
    listed = await conveyor(capsys, "sweeps", "list", "--json", served=paused)
    assert [s["name"] for s in listed.json()["sweep_jobs"]] == [random["name"], "sweepJobs/grid"]
    table = await conveyor(capsys, "sweeps", "list", "--limit", "1", served=paused)
    rows = [line.split() for line in table.out.splitlines()]
    assert len(rows) == 2
    assert rows[1][0] == random["name"].removeprefix("sweepJobs/")
    assert rows[1][1] in ("queued", "running")
    assert rows[1][2:5] == ["0/2", "-", "-"]
    assert table.err == "(more: raise --limit above 1)\n"
    nothing = await conveyor(capsys, "sweeps", "list", "--state", "succeeded", served=paused)
    assert (nothing.out, nothing.err) == ("", "no sweeps match\n")

    shown = await conveyor(capsys, "sweeps", "show", "grid", served=paused)
    assert shown.code == 0, shown.err
    fields = dict(line.split(":", 1) for line in shown.out.splitlines() if ":" in line)
    assert fields["name"].strip() == "sweepJobs/grid"
    assert fields["search"].strip() == "grid search, 6 trials, 1 at a time"
    assert fields["parameters"].strip() == (
        f"{LEARNING_RATE} in log 0.0001..0.01 (3 points); "
        "hyperparameters.batch_size in 16..32 step 16"
    )
    assert fields["register in"].strip() == "- (not registered)"

    # Ctrl-C stops following; the sweep keeps running.
    def interrupt(view: SweepView, event: rpc.WatchSweepJobResponse) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(SweepView, "show", interrupt)
        stopped = await conveyor(capsys, "sweeps", "watch", "grid", served=paused)
    assert stopped.code == 130
    assert "stopped watching sweepJobs/grid; it keeps running." in stopped.err
    assert "follow it again: conveyor sweeps watch grid" in stopped.err
    assert "cancel it:       conveyor sweeps cancel grid" in stopped.err
    assert not (await get_sweep(paused, "sweepJobs/grid")).cancel_requested

    cancelled = await conveyor(capsys, "sweeps", "cancel", "grid", served=paused)
    assert cancelled.code == 0, cancelled.err
    assert cancelled.out.startswith("sweepJobs/grid: cancel")
    watched = await conveyor(capsys, "sweeps", "watch", "grid", served=paused)
    assert watched.code == 1
    assert watched.out.startswith("sweepJobs/grid cancelled: 0 of ")
    assert watched.err.splitlines()[-1] == (
        "conveyor: sweepJobs/grid was cancelled after 0 of 6 trials; nothing was registered"
    )
    again = await conveyor(capsys, "sweeps", "cancel", "grid", "--json", served=paused)
    assert again.json()["sweep_job"]["state"] == "JOB_STATE_CANCELLED"


async def test_the_trainer_refusals_name_the_sweep_flags(
    paused: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    async def refused(*argv: str) -> list[str]:
        result = await conveyor(capsys, "train", *CANCER, *argv, served=paused)
        assert (result.code, result.out) == (1, ""), result.err
        assert "Traceback" not in result.err
        return result.err.splitlines()

    # A learning rate of 20 is refused, naming the trial that has it.
    err = await refused("--sweep", f"{LEARNING_RATE}=0.001,20")
    assert err[0].startswith("conveyor: INVALID_ARGUMENT: invalid sweep job")
    assert any("sweep_job.spec.parameters: trial 2 {" in line for line in err), err
    assert "20" in next(line for line in err if "trial 2 {" in line)
    assert err[-1] == "hint: fix --sweep and run the command again"
    for argv, flags in (
        (("--sweep", "data.split_seed=1,2"), "--sweep"),
        (("--sweep", f"{LEARNING_RATE}=1e-4..1e-2", "--grid-points", "1"), "--grid-points"),
        (("--sweep", f"{LEARNING_RATE}=1,2", "--objective", "speed"), "--objective"),
        (("--sweep", f"{LEARNING_RATE}=1,2", "--epochs", "0"), "--epochs"),
        (("--sweep", f"{LEARNING_RATE}=1,2", "--sweep-id", "Bad_Id"), "--sweep-id"),
    ):
        assert (await refused(*argv))[-1] == f"hint: fix {flags} and run the command again", argv

    first = await conveyor(
        capsys,
        "train",
        *CANCER,
        "--sweep",
        f"{LEARNING_RATE}=1e-3",
        "--sweep-id",
        "taken",
        "--no-watch",
        served=paused,
    )
    assert first.code == 0, first.err
    err = await refused("--sweep", f"{LEARNING_RATE}=1e-3", "--sweep-id", "taken")
    assert err[0].startswith("conveyor: ALREADY_EXISTS: ")
    assert err[-1] == (
        "hint: the sweep id is taken: choose another --sweep-id, or see `conveyor sweeps show ID`"
    )
    unknown = await conveyor(
        capsys, "train", "no-such-data", "--sweep", f"{LEARNING_RATE}=1e-3", served=paused
    )
    assert unknown.code == 1
    assert unknown.err.startswith("conveyor: NOT_FOUND: ")
    assert "hint: check the dataset (built-in: breast-cancer, digits, synthetic" in unknown.err
    missing = await conveyor(capsys, "sweeps", "show", "nope", served=paused)
    assert missing.code == 1
    assert missing.err.startswith("conveyor: NOT_FOUND: ")
    assert "sweepJobs/nope" in missing.err
    assert missing.err.splitlines()[-1] == (
        "hint: check the name: `conveyor sweeps list` shows the sweeps"
    )
    bad_filter = await conveyor(capsys, "sweeps", "list", "--filter", "colour=red", served=paused)
    assert bad_filter.code == 1
    assert bad_filter.err.startswith("conveyor: INVALID_ARGUMENT: ")
    port = free_port()
    away = await conveyor(
        capsys, "sweeps", "list", "--trainer", f"127.0.0.1:{port}", "--timeout", "5"
    )
    assert away.code == 1
    assert away.err.startswith("conveyor: UNAVAILABLE: ")
    assert f"hint: is a trainer running at 127.0.0.1:{port}? " in away.err


# -- presentation ------------------------------------------------------------------------


def a_sweep(state: pb.JobState.ValueType = pb.JOB_STATE_RUNNING) -> pb.SweepJob:
    sweep = pb.SweepJob(name="sweepJobs/s", state=state)
    sweep.spec.algorithm = pb.SEARCH_ALGORITHM_GRID
    sweep.spec.max_trials = 10
    sweep.spec.objective_metric = "f1"
    sweep.spec.parameters.append(parameter(categorical={"values": [1e-3, 1e-2]}))
    sizes = {"path": "architecture.args.hidden_sizes", "categorical": {"values": [[32, 16]]}}
    sweep.spec.parameters.append(json_format.ParseDict(sizes, pb.ParameterSpec()))
    return sweep


def a_trial(
    number: int, state: pb.JobState.ValueType, objective: float | None = None
) -> pb.SweepTrial:
    trial = pb.SweepTrial(training_job=f"trainingJobs/s-trial-{number}", state=state)
    trial.parameters.update({LEARNING_RATE: (1e-3, 1e-2)[number - 1]})
    trial.parameters.update({"architecture.args.hidden_sizes": [32, 16]})
    if objective is not None:
        trial.objective_value = objective
    return trial


def trial_event(trial: pb.SweepTrial) -> rpc.WatchSweepJobResponse:
    return rpc.WatchSweepJobResponse(type=pb.SWEEP_JOB_EVENT_TYPE_TRIAL_UPDATED, trial=trial)


def test_the_sweep_view_prints_each_change_once() -> None:
    stream = io.StringIO()
    view = SweepView(stream)
    snapshot = a_sweep()
    snapshot.trials.append(a_trial(1, pb.JOB_STATE_RUNNING))
    view.show(rpc.WatchSweepJobResponse(type=pb.SWEEP_JOB_EVENT_TYPE_SNAPSHOT, sweep_job=snapshot))
    view.show(trial_event(a_trial(1, pb.JOB_STATE_RUNNING)))  # seen in the snapshot
    view.show(trial_event(a_trial(1, pb.JOB_STATE_SUCCEEDED, 0.875)))
    view.show(trial_event(a_trial(2, pb.JOB_STATE_QUEUED)))
    # A resumed watch starts from a snapshot again: only what changed is printed.
    resumed = a_sweep()
    resumed.trials.extend([a_trial(1, pb.JOB_STATE_SUCCEEDED, 0.875)])
    resumed.trials.extend([a_trial(2, pb.JOB_STATE_FAILED)])
    view.show(rpc.WatchSweepJobResponse(type=pb.SWEEP_JOB_EVENT_TYPE_SNAPSHOT, sweep_job=resumed))
    resumed.state = pb.JOB_STATE_SUCCEEDED
    view.show(
        rpc.WatchSweepJobResponse(type=pb.SWEEP_JOB_EVENT_TYPE_STATE_CHANGED, sweep_job=resumed)
    )
    sizes = "architecture.args.hidden_sizes=[32,16]"
    assert stream.getvalue().splitlines() == [
        "sweepJobs/s: running (grid search, 2 trials, 1 at a time)",
        f"trial 1/2 RUNNING  {LEARNING_RATE}=0.001  {sizes}",
        f"trial 1/2 SUCCEEDED  {LEARNING_RATE}=0.001  {sizes}  val f1 0.8750",
        f"trial 2/2 QUEUED  {LEARNING_RATE}=0.01  {sizes}",
        f"trial 2/2 FAILED  {LEARNING_RATE}=0.01  {sizes}  "
        "(`conveyor jobs show s-trial-2` says why)",
        "sweepJobs/s: succeeded",
    ]


def test_an_ended_sweep_prints_its_trials_and_why_it_failed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sweep = a_sweep(pb.JOB_STATE_FAILED)
    sweep.trials.extend([a_trial(1, pb.JOB_STATE_FAILED), a_trial(2, pb.JOB_STATE_CANCELLED)])
    sweep.error.code = 9
    sweep.error.reason = "NO_TRIAL_SUCCEEDED"
    sweep.error.message = "none of the 2 trials succeeded with a 'f1' validation metric"
    assert trainer_cli.finish_sweep(sweep, as_json=False) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "sweepJobs/s failed: 0 of 2 trials succeeded (grid search, 2 trials, 1 at a time; "
        "objective: validation f1 (maximize))",
        "TRIAL      LEARNING_RATE  HIDDEN_SIZES  STATE      VAL F1",
        "s-trial-1  0.001          [32,16]       failed     -",
        "s-trial-2  0.01           [32,16]       cancelled  -",
    ]
    assert captured.err.splitlines() == [
        "conveyor: sweepJobs/s failed: FAILED_PRECONDITION: none of the 2 trials succeeded "
        "with a 'f1' validation metric [NO_TRIAL_SUCCEEDED]",
        "hint: `conveyor sweeps show s` lists its trials; `conveyor jobs show TRIAL` says why "
        "one failed",
    ]

    sweep = a_sweep(pb.JOB_STATE_CANCELLED)
    sweep.spec.objective_metric = "loss"
    sweep.trials.extend([a_trial(1, pb.JOB_STATE_SUCCEEDED, 0.25)])
    sweep.best_trial = sweep.trials[0].training_job
    assert trainer_cli.finish_sweep(sweep, as_json=False) == 1
    captured = capsys.readouterr()
    assert "objective: validation loss (minimize)" in captured.out
    row = ["*", "s-trial-1", "0.001", "[32,16]", "succeeded", "0.2500"]
    assert captured.out.splitlines()[2].split() == row
    assert captured.err == (
        "conveyor: sweepJobs/s was cancelled after 1 of 2 trials; nothing was registered\n"
    )


def test_one_trial_and_one_epoch_are_singular(capsys: pytest.CaptureFixture[str]) -> None:
    sweep = a_sweep(pb.JOB_STATE_SUCCEEDED)
    del sweep.spec.parameters[1:]
    sweep.spec.max_trials = 1
    sweep.spec.base_spec.hyperparameters.epochs = 1
    sweep.trials.append(a_trial(1, pb.JOB_STATE_SUCCEEDED, 0.5))
    sweep.best_trial = sweep.trials[0].training_job
    fields = dict(cli_output.sweep_fields(sweep))
    assert fields["search"] == "grid search, 1 trial, 1 at a time"
    assert fields["hyperparameters"].startswith("1 epoch, ")
    assert trainer_cli.finish_sweep(sweep, as_json=False) == 0
    assert capsys.readouterr().out.startswith(
        "sweepJobs/s succeeded: 1 of 1 trial succeeded (grid search, 1 trial, 1 at a time; "
    )
    sweep.state = pb.JOB_STATE_CANCELLED
    sweep.trials[0].state = pb.JOB_STATE_CANCELLED
    assert trainer_cli.finish_sweep(sweep, as_json=False) == 1
    assert capsys.readouterr().err == (
        "conveyor: sweepJobs/s was cancelled after 0 of 1 trial; nothing was registered\n"
    )
