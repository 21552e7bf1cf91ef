"""The inference benchmark's summary, its targets and its Markdown tables."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Protocol

from perf import Measurement

JUDGED_LEVELS = (8, 16)
"""Concurrency levels the MLP throughput targets are judged at."""
RESNET_LEVEL = 16
"""Concurrency level the ResNet-18 targets are judged at (batching needs company)."""


class _Batching(Protocol):
    max_batch_size: int


def summarise(measurements: list[Measurement]) -> dict[str, Any]:
    """``{model: {target: {concurrency: {...}}}}``, medians over rounds."""
    grouped: dict[tuple[str, str, int], list[Measurement]] = defaultdict(list)
    for m in measurements:
        grouped[(m.model, m.target, m.concurrency)].append(m)
    summary: dict[str, Any] = {}
    for (model, target, level), runs in grouped.items():
        good = [m for m in runs if not m.error]
        cell: dict[str, Any] = {
            "runs": len(runs),
            "errors": [m.error for m in runs if m.error],
            "failed_attempts": [e for m in runs for e in m.failed_attempts],
        }
        if good:
            rate = statistics.median(m.infer_per_s for m in good)
            cpu = sum(m.server_cpu_s for m in good) / sum(m.infer_per_s * m.wall_s for m in good)
            cell.update(
                infer_per_s=round(rate, 1),
                p50_ms=round(statistics.median(m.p50_ms for m in good), 3),
                p99_ms=round(statistics.median(m.p99_ms for m in good), 3),
                # Server CPU over the whole perf_analyzer run (warm-up included)
                # divided by an estimate of the requests it served.
                server_cpu_ms_per_infer=round(1000 * cpu, 3),
            )
            stats = [m.server_stats for m in good if m.server_stats]
            if stats:
                keys = sorted(set().union(*stats))
                cell["server_stats"] = {
                    k: round(statistics.median(s[k] for s in stats if k in s), 2) for k in keys
                }
        summary.setdefault(model, {}).setdefault(target, {})[str(level)] = cell
    return summary


def targets(
    summary: dict[str, Any],
    inprocess_rows: list[dict[str, Any]],
    batching: dict[str, list[Any]],
) -> list[dict[str, Any]]:
    """The issue's targets, one line per (target, Conveyor variant, level), for
    the models measured."""
    mlp, resnet = summary.get("mlp", {}), summary.get("resnet18", {})
    conveyor = sorted(
        t
        for t in {**mlp, **resnet}
        if t.startswith("conveyor-p") and "/" not in t and not t.endswith("-stream")
    )
    lines: list[dict[str, Any]] = []
    if mlp:
        bare = mlp.get("bare")
        for name, suffix, needed in (
            ("MLP unary >= 0.85x bare unary", "", 0.85),
            ("MLP ModelStreamInfer >= 1.5x bare unary", "-stream", 1.5),
        ):
            for target in conveyor:
                for level in JUDGED_LEVELS:
                    rate = _rate(mlp.get(target + suffix), level)
                    lines.append(
                        _ratio(name, target + suffix, level, rate, _rate(bare, level), needed)
                    )
        reference = _mlp_inprocess_p99(inprocess_rows)
        for target in conveyor:
            lines.append(_latency_line(target, mlp.get(target, {}).get("1", {}), reference))
    if resnet:
        ceiling = _resnet_ceiling(inprocess_rows, batching)
        kserve = max(_rate(resnet.get(k), RESNET_LEVEL) or 0.0 for k in ("kserve", "kserve-quiet"))
        for name, base, needed in (
            ("ResNet-18 >= 0.8x in-process ceiling", ceiling, 0.8),
            ("ResNet-18 >= 2.5x KServe (its faster logging setting)", kserve or None, 2.5),
        ):
            for target in conveyor:
                rate = _rate(resnet.get(target), RESNET_LEVEL)
                lines.append(_ratio(name, target, RESNET_LEVEL, rate, base, needed))
    return lines


def ratios(summary: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Throughput ratios per model and concurrency: each Conveyor target and
    KServe against the bare unary ceiling, Conveyor against KServe's faster
    logging setting, KServe's default logging against its quiet one."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, table in summary.items():
        levels = sorted({int(c) for cells in table.values() for c in cells})
        rows: dict[str, dict[str, float]] = {}
        for level in levels:
            bare = _rate(table.get("bare"), level)
            kserve = max(_rate(table.get(k), level) or 0.0 for k in ("kserve", "kserve-quiet"))
            for target in sorted(table, key=_order):
                if target != "bare":
                    _put(rows, f"{target} / bare", _rate(table[target], level), bare, level)
            for target in sorted(table, key=_order):
                if target.startswith("conveyor"):
                    rate = _rate(table[target], level)
                    _put(rows, f"{target} / kserve (faster)", rate, kserve, level)
            _put(
                rows,
                "kserve / kserve-quiet",
                _rate(table.get("kserve"), level),
                _rate(table.get("kserve-quiet"), level),
                level,
            )
        out[model] = rows
    return out


def _put(
    rows: dict[str, dict[str, float]],
    name: str,
    value: float | None,
    base: float | None,
    level: int,
) -> None:
    if value is not None and base:
        rows.setdefault(name, {})[str(level)] = round(value / base, 3)


def _latency_line(target: str, cell: dict[str, Any], reference: float | None) -> dict[str, Any]:
    p99 = cell.get("p99_ms")
    over = None if p99 is None or reference is None else round(p99 - reference, 3)
    return {
        "target": "MLP p99 at c=1 within 1 ms of in-process",
        "server": target,
        "concurrency": 1,
        "value": over,
        "unit": "ms over the in-process p99",
        "detail": f"p99 {p99} ms vs in-process p99 {reference} ms",
        "threshold": 1.0,
        "met": None if over is None else over <= 1.0,
    }


def _rate(table: dict[str, Any] | None, level: int) -> float | None:
    value = (table or {}).get(str(level), {}).get("infer_per_s")
    return float(value) if value is not None else None


def _ratio(
    name: str, server: str, level: int, value: float | None, base: float | None, threshold: float
) -> dict[str, Any]:
    ratio = None if value is None or not base else value / base
    return {
        "target": name,
        "server": server,
        "concurrency": level,
        "value": None if ratio is None else round(ratio, 3),
        "unit": "ratio",
        "detail": f"{value} / {None if base is None else round(base, 1)} infer/s",
        "threshold": threshold,
        "met": None if ratio is None else ratio >= threshold,
    }


def _resnet_ceiling(rows: list[dict[str, Any]], batching: dict[str, list[Any]]) -> float | None:
    """The best in-process ResNet-18 throughput at a batch Conveyor may form."""
    limit = batching["resnet18"][0].max_batch_size if batching.get("resnet18") else 1
    rates = [r["infer_per_s"] for r in rows if r["model"] == "resnet18" and r["batch"] <= limit]
    return max(rates) if rates else None


def _mlp_inprocess_p99(rows: list[dict[str, Any]]) -> float | None:
    """The in-process MLP's batch-1 p99 (the better thread setting and run)."""
    values = [r["p99_ms"] for r in rows if r["model"] == "mlp" and r["batch"] == 1]
    return min(values) if values else None


# -- Markdown --------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    levels = results["settings"]["concurrency"]
    out = [
        "### perf_analyzer, batch-1 requests: infer/s (p50 / p99 ms)",
        "",
        "| model | server | " + " | ".join(f"c={c}" for c in levels) + " |",
        "|---|---|" + "---:|" * len(levels),
    ]
    for model, table in results["summary"].items():
        for target in sorted(table, key=_order):
            cells = []
            for level in levels:
                cell = table[target].get(str(level), {})
                if "infer_per_s" in cell:
                    cells.append(
                        f"{cell['infer_per_s']:,.0f} ({cell['p50_ms']:.2f} / {cell['p99_ms']:.2f})"
                    )
                else:
                    cells.append("error" if cell.get("errors") else "")
            out.append(f"| {model} | {target} | " + " | ".join(cells) + " |")
    out += [
        "",
        "### In-process ONNX Runtime (infer/s; p50 / p99 ms per call)",
        "",
        "| model | batch | threads | infer/s before | infer/s after | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = results.get("inprocess", [])
    for key in dict.fromkeys((r["model"], r["batch"], r["threads"]) for r in rows):
        pair = [r for r in rows if (r["model"], r["batch"], r["threads"]) == key]
        rates = {r["when"]: f"{r['infer_per_s']:,.0f}" for r in pair}
        p50 = min(r["p50_ms"] for r in pair)
        p99 = min(r["p99_ms"] for r in pair)
        out.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {rates.get('before', '')} | "
            f"{rates.get('after', '')} | {p50:.3f} | {p99:.3f} |"
        )
    for model, rows in results.get("ratios", {}).items():
        out += [
            "",
            f"### Throughput ratios, {model}",
            "",
            "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |",
            "|---|" + "---:|" * len(levels),
        ]
        for name, cells in rows.items():
            values = [f"{cells[str(c)]:.2f}" if str(c) in cells else "" for c in levels]
            out.append(f"| {name} | " + " | ".join(values) + " |")
    out += [
        "",
        "### Targets",
        "",
        "| target | server | c | value | needed | met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for line in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[line["met"]]
        value = "" if line["value"] is None else f"{line['value']}"
        out.append(
            f"| {line['target']} | {line['server']} | {line['concurrency']} | "
            f"{value} | {line['threshold']} | {met} |"
        )
    return "\n".join(out)


def _order(target: str) -> tuple[int, str]:
    for rank, prefix in enumerate(("conveyor", "kserve", "bare")):
        if target.startswith(prefix):
            return rank, target
    return 9, target
