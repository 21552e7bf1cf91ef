"""What the fixes proposed in bench/README.md (Monitor) could gain, measured on
prototypes: none of this is the service's code, and nothing here changes it.

* ``sqlite``: plain ``sqlite3`` inserts into the monitor's migrated schema
  (all its indexes) as the table grows, with random request ids (as
  ``uuid4().hex``, what the service sees) against increasing ones, and one row
  per call holding the call's records packed (a block layout), with the time
  to read the features of every block back;
* ``prepare``: :func:`ingest.prepare` plus turning its rows into tuples, against
  a vectorised prototype producing the same tuples (numerical features only,
  no personal data: the benchmark's schema);
* ``stats``: :func:`drift.drift_report` on 1,000,000 x 30 strided columns
  (what the service passes) against a prototype: one transpose to contiguous
  columns, one ``isfinite`` check and a sort per column, the reference sorted
  once ahead (as a profile could keep it), KS p-values from the asymptotic
  Kolmogorov distribution, on 1 and 2 threads;
* ``window``: the drift part of evaluating one closed 1,000-row window against
  a 100,000-row reference, as the service does it and with the reference's
  sorted columns kept ahead.

CPU times are the thread's (``time.thread_time``), less sensitive to other
work on a shared machine than wall time; wall times are given where I/O
matters. Run from the repository root::

    .venv/bin/python bench/monitor/fix_estimates.py --json bench/monitor/results-fixes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as scipy_stats

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import config as configs
from conveyor.services.monitor import drift, reports
from conveyor.services.monitor import schema as monitor_schema
from conveyor.services.monitor import statistics as monitor_statistics
from conveyor.services.monitor.ingest import SubjectHasher, VersionProfile, prepare
from conveyor.services.monitor.migrate import upgrade_to_head
from conveyor.services.monitor.profiles import fit_reference_scorer
from conveyor.services.monitor.references import FeatureSchema, check_values
from conveyor.services.monitor.store import WindowRows
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import machine_info  # noqa: E402
from bench.monitor.bench_monitor import (  # noqa: E402
    BenchData,
    build_payloads,
    probabilities,
    source_state,
)

COLUMNS = [column.name for column in monitor_schema.predictions.columns]
INSERT = f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="sqlite,prepare,stats,window")
    parser.add_argument("--table-rows", type=int, default=300_000, help="rows per SQLite run")
    parser.add_argument("--rows", type=int, default=1_000_000, help="window rows of `stats`")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results: dict[str, Any] = {}
    machine = machine_info(Path(tempfile.gettempdir()))
    if "sqlite" in parts:
        results["sqlite"] = bench_sqlite(args.table_rows)
    if "prepare" in parts:
        results["prepare"] = bench_prepare()
    if "stats" in parts:
        results["stats"] = bench_stats(args.rows, args.runs)
    if "window" in parts:
        results["window"] = bench_window(args.runs)
    machine["load_average_after"] = os.getloadavg()
    report = {"machine": machine, "settings": {**vars(args), **source_state()}, "results": results}
    report["settings"]["json"] = str(args.json) if args.json else None
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- SQLite -----------------------------------------------------------------------------


def migrated(path: Path) -> sqlite3.Connection:
    engine = create_engine(sqlite_url(path), pool_size=1)
    upgrade_to_head(engine)
    engine.dispose()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def bench_sqlite(table_rows: int) -> dict[str, Any]:
    """Per-row insert cost in the last tenth of ``table_rows`` rows."""
    found: dict[str, Any] = {}
    features = np.random.default_rng(0).normal(size=(1000, 30)).tobytes()
    with tempfile.TemporaryDirectory() as directory:
        for batch in (256, 1000):
            for ids in ("random", "increasing"):
                connection = migrated(Path(directory) / f"{ids}-{batch}.db")
                cpu: list[float] = []
                wall: list[float] = []
                now = time.time_ns() // 1000
                for call in range(table_rows // batch):
                    if ids == "random":
                        text = os.urandom(16 * batch).hex()
                        keys = [text[32 * i : 32 * i + 32] for i in range(batch)]
                    else:
                        keys = [f"{call * batch + i:032d}" for i in range(batch)]
                    rows = [
                        (
                            "models/m",
                            keys[i],
                            "models/m/versions/1",
                            now + call,  # one time per call, as the service stamps it
                            call * batch // 1000,
                            0,
                            5000,
                            False,
                            features[240 * i : 240 * i + 240],
                            "[]",
                            b"\0" * 16,
                            None,
                            0.5,
                            False,
                            None,
                            None,
                            now,
                        )
                        for i in range(batch)
                    ]
                    start_cpu, start_wall = time.thread_time(), time.perf_counter()
                    connection.execute("BEGIN IMMEDIATE")
                    connection.executemany(INSERT, rows)
                    connection.execute("COMMIT")
                    cpu.append(1e6 * (time.thread_time() - start_cpu) / batch)
                    wall.append(1e6 * (time.perf_counter() - start_wall) / batch)
                connection.close()
                tenth = max(1, len(cpu) // 10)
                key = f"per_row_{ids}_ids_batch{batch}"
                found[key] = {
                    "cpu_us_first_tenth": statistics.median(cpu[:tenth]),
                    "cpu_us_last_tenth": statistics.median(cpu[-tenth:]),
                    "wall_us_last_tenth": statistics.median(wall[-tenth:]),
                }
                log(f"sqlite {key}: {found[key]}")
        found["block_layout_batch256"] = bench_blocks(Path(directory) / "blocks.db", table_rows)
        log(f"sqlite blocks: {found['block_layout_batch256']}")
    return found


def bench_blocks(path: Path, table_rows: int, batch: int = 256) -> dict[str, float]:
    """One row per call: the call's ids, features, outputs and per-record columns packed."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(
        "CREATE TABLE blocks (seq INTEGER PRIMARY KEY, model_version TEXT, window_index INT, "
        "time_us INT, n INT, request_ids BLOB, numerical BLOB, outputs BLOB, status BLOB, "
        "latency BLOB, times BLOB, outlier BLOB, score BLOB)"
    )
    connection.execute("CREATE INDEX blocks_by_window ON blocks (model_version, window_index)")
    features = np.random.default_rng(0).normal(size=(batch, 30)).tobytes()
    cpu = []
    for call in range(table_rows // batch):
        ids = os.urandom(16 * batch).hex().encode()
        start = time.thread_time()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT INTO blocks (model_version, window_index, time_us, n, request_ids, "
            "numerical, outputs, status, latency, times, outlier, score) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                "models/m/versions/1",
                0,
                call,
                batch,
                ids,
                features,
                b"\0" * 16 * batch,
                b"\0" * 4 * batch,
                b"\0" * 8 * batch,
                b"\0" * 8 * batch,
                b"\0" * batch,
                b"\0" * 8 * batch,
            ),
        )
        connection.execute("COMMIT")
        cpu.append(1e6 * (time.thread_time() - start) / batch)
    start = time.perf_counter()
    blobs = connection.execute(
        "SELECT numerical FROM blocks WHERE model_version = ? AND window_index = 0",
        ("models/m/versions/1",),
    ).fetchall()
    matrix = np.frombuffer(b"".join(b for (b,) in blobs), dtype=np.float64).reshape(-1, 30)
    read_s = time.perf_counter() - start
    connection.close()
    return {
        "write_cpu_us_per_record": statistics.median(cpu),
        "read_rows": int(matrix.shape[0]),
        "read_features_s": read_s,
    }


# -- prepare --------------------------------------------------------------------------------


def vectorised_prepare(
    profile: VersionProfile, records: list[pb.PredictionRecord], now_us: int
) -> list[tuple[Any, ...]]:
    """The rows ``prepare`` stores, as tuples in the table's column order, for
    the common case (successful records of a numerical-only schema, no
    personal data); anything else would fall back to ``prepare``."""
    n = len(records)
    width = len(profile.schema.numerical)
    outputs_width = profile.output_columns or 0
    ids, flat, flat_outputs, latencies, times, shadows = [], [], [], [], [], []
    for record in records:
        ids.append(record.request_id)
        flat.extend(record.features.numerical)
        flat_outputs.extend(record.outputs)
        latency, stamp = record.latency, record.time
        latencies.append(latency.seconds * 1_000_000 + latency.nanos // 1000)
        set_time = stamp.seconds or stamp.nanos
        times.append(stamp.seconds * 1_000_000 + stamp.nanos // 1000 if set_time else now_us)
        shadows.append(record.shadow)
    if len(flat) != n * width or len(flat_outputs) != n * outputs_width:
        raise ValueError("widths differ: the detailed checks of prepare name the records")
    numerical = np.asarray(flat).reshape(n, width)
    outputs = np.asarray(flat_outputs).reshape(n, outputs_width)
    if not np.isfinite(outputs).all() or check_values(
        profile.schema, numerical, np.empty((n, 0), dtype=object), prefix="records"
    ):
        raise ValueError("invalid values: the detailed checks of prepare name them")
    assert profile.scorer is not None
    scored = profile.scorer.score(numerical, np.empty((n, 0), dtype=np.str_))
    features, outs = numerical.tobytes(), outputs.tobytes()
    step, out_step = 8 * width, 8 * outputs_width
    scores, outliers = scored.scores.tolist(), scored.outliers.tolist()
    model, version = profile.model, profile.model_version
    return [
        (
            model,
            ids[i],
            version,
            times[i],
            0,
            0,
            latencies[i],
            shadows[i],
            features[i * step : (i + 1) * step],
            "[]",
            outs[i * out_step : (i + 1) * out_step],
            None,
            scores[i],
            outliers[i],
            None,
            None,
            now_us,
        )
        for i in range(n)
    ]


def bench_prepare() -> dict[str, Any]:
    data = BenchData(30, 20_000)
    hasher = SubjectHasher(b"k" * 32)
    schema = FeatureSchema(tuple(data.schema()))
    resolved = configs.resolve(pb.MonitoringConfig())
    reference = data.reference_data()
    profile = VersionProfile(
        "models/m/versions/1",
        "models/m",
        schema,
        resolved,
        pb.Reference(),
        reference,
        fit_reference_scorer(schema, reference, resolved, hasher),
        2,
        {},
    )
    found: dict[str, Any] = {}
    for batch in (256, 1000):
        payloads = build_payloads("models/m/versions/1", data.window(batch * 40), batch, "x")
        current: list[float] = []
        fast: list[float] = []
        for payload in payloads:
            records = list(rpc.BatchLogPredictionsRequest.FromString(payload).records)
            start = time.thread_time()
            prepared, _ = prepare(
                profile, list(enumerate(records)), hasher=hasher, now_us=1, max_violations=20
            )
            rows = [tuple(row[name] for name in COLUMNS) for row in prepared.rows]
            current.append(1e6 * (time.thread_time() - start) / batch)
            start = time.thread_time()
            prototype = vectorised_prepare(profile, records, 1)
            fast.append(1e6 * (time.thread_time() - start) / batch)
            if prototype != rows:
                raise RuntimeError("the prototype's rows differ from prepare's")
        found[f"batch{batch}"] = {
            "prepare_and_tuples_cpu_us_per_record": statistics.median(current),
            "vectorised_cpu_us_per_record": statistics.median(fast),
        }
        log(f"prepare, batch {batch}: {found[f'batch{batch}']}")
    return found


# -- statistics -------------------------------------------------------------------------------


def timed(function: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sorted_finite(column: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``drift._values``' result with one pass when every value is finite."""
    if np.isfinite(column).all():
        return np.sort(column)
    if np.isinf(column).any():
        raise ValueError("infinite values")
    return np.sort(column[~np.isnan(column)])


def ks_asymptotic(
    reference: npt.NDArray[np.float64], current: npt.NDArray[np.float64]
) -> tuple[float, float]:
    """``kolmogorov_smirnov_sorted``'s statistic with the p-value of the limiting
    Kolmogorov distribution instead of ``kstwo.sf`` (see the README's notes)."""
    small, large = (reference, current) if reference.size <= current.size else (current, reference)
    values, counts = np.unique(small, return_counts=True)
    small_cdf = np.cumsum(counts) / small.size
    large_cdf = np.searchsorted(large, values, side="right") / large.size
    before = np.searchsorted(large, values, side="left") / large.size
    differences = np.concatenate(
        (small_cdf - large_cdf, small_cdf[:-1] - before[1:], [-before[0], 0.0])
    )
    statistic = float(max(differences.max(), -differences.min()))
    rows = np.round(large.size * small.size / (large.size + small.size))
    return statistic, float(scipy_stats.kstwobign.sf(statistic * np.sqrt(rows)))


def bench_stats(rows: int, runs: int) -> dict[str, Any]:
    data = BenchData(30, 100_000)
    matrix = data.window(rows)
    schema = data.drift_schema()
    reference = list(data.reference.T)
    sorted_reference = [np.sort(column) for column in data.reference.T]
    found: dict[str, Any] = {}
    for name, test in (
        ("auto", drift.DriftTest.UNSPECIFIED),
        ("ks", drift.DriftTest.KOLMOGOROV_SMIRNOV),
    ):
        config = drift.DriftConfig(numerical_test=drift.DriftTestSpec(test))
        found[f"{name}_service_s"] = timed(
            lambda config=config: drift.drift_report(schema, reference, list(matrix.T), config),
            runs,
        )

        def one(i: int, columns: list[npt.NDArray[np.float64]], name: str = name) -> object:
            values = sorted_finite(columns[i])
            if name == "auto":
                return monitor_statistics.wasserstein_sorted(sorted_reference[i], values)
            return ks_asymptotic(sorted_reference[i], values)

        def prototype(threads: int, one: Callable[..., object] = one) -> None:
            columns = list(np.ascontiguousarray(matrix.T))
            if threads == 1:
                for i in range(len(columns)):
                    one(i, columns)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(lambda i: one(i, columns), range(len(columns))))

        for threads in (1, 2):
            found[f"{name}_prototype_{threads}_threads_s"] = timed(
                lambda threads=threads, prototype=prototype: prototype(threads), runs
            )
        log(f"stats {name}: { {k: round(v, 2) for k, v in found.items() if k.startswith(name)} }")
    return found


# -- evaluating a closed window -------------------------------------------------------------


def bench_window(runs: int) -> dict[str, Any]:
    data = BenchData(30, 100_000)
    reference = data.reference_data()
    schema = FeatureSchema(tuple(data.schema()))
    resolved = configs.resolve(pb.MonitoringConfig())
    profile = VersionProfile(
        "models/m/versions/1",
        "models/m",
        schema,
        resolved,
        pb.Reference(name="r", row_count=reference.rows, output_type=pb.OUTPUT_TYPE_PROBABILITIES),
        reference,
        None,
        2,
        {},
    )
    n = 1000
    matrix = data.window(n)
    rows = WindowRows(
        matrix,
        np.empty((n, 0), dtype=np.str_),
        probabilities(matrix),
        np.full(n, -1),
        np.zeros(n, dtype=np.int32),
        np.full(n, 0.005),
        np.zeros(n, dtype=np.bool_),
        np.arange(n),
    )
    window = pb.Window(index=0, row_count=n, closed=True)
    sorted_reference = [np.sort(column) for column in reference.numerical.T]

    def cpu(function: Callable[[], object]) -> float:
        times = []
        for _ in range(max(runs, 5)):
            start = time.thread_time()
            function()
            times.append(time.thread_time() - start)
        return statistics.median(times)

    def cached() -> None:
        for i, column in enumerate(matrix.T):
            values = sorted_finite(np.ascontiguousarray(column))
            monitor_statistics.wasserstein_sorted(sorted_reference[i], values)

    found = {
        "reports_drift_report_cpu_s": cpu(
            lambda: reports.drift_report(
                profile,
                profile.reference,
                reference,
                window,
                rows,
                distributions=False,  # type: ignore[arg-type]
            )
        ),
        "prediction_drift_cpu_s": cpu(
            lambda: reports._prediction_drift(profile, reference, rows, distributions=False)
        ),
        "reference_sort_cpu_s": cpu(lambda: [np.sort(c) for c in reference.numerical.T]),
        "features_with_sorted_reference_kept_cpu_s": cpu(cached),
    }
    log(f"window: {found}")
    return found


if __name__ == "__main__":
    raise SystemExit(main())
