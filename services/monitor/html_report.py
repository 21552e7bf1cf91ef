"""A drift report as one self-contained HTML page (``conveyor drift --html``).

The page holds what the command prints (the summary and the features' table,
from :mod:`conveyor.services.monitor.cli`, so both say the same), drifted rows
highlighted, and per feature a histogram of the reference against the window:
numerical features as the share of values in each of the reference's quantile
bins (the outer bins are open-ended, so bins are drawn side by side at equal
width, their inner edges as ticks), categorical ones (and the predicted class)
as the share of each category. Pictures are PNGs drawn by matplotlib's Agg
canvas on a bare :class:`~matplotlib.figure.Figure` (no pyplot: no global
backend, no figure registry to close), embedded as ``data:`` URIs; the CSS is
inline, so the file needs nothing else. Every text from the report (feature
and category names are user input) is escaped with :func:`html.escape`, and
matplotlib is told not to read ``$…$`` in them as mathematics.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Final

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.cli import (
    COLUMNS,
    TESTS,
    feature_cells,
    report_entries,
    report_fields,
    verdict,
)

FIGURE_INCHES: Final = (4.0, 2.5)
DPI: Final = 80
"""320 x 200 pixels a picture, each drawn in about 0.1 s: 30 features take seconds."""
MAX_BARS: Final = 15
"""Categories beyond this many are pooled into one bar (the smallest ones)."""
MAX_LABEL: Final = 14
"""Characters of a category or edge label under a bar; longer ones are cut."""
REFERENCE_COLOUR: Final = "#9aa9bd"
CURRENT_COLOUR: Final = "#1f77b4"
DRIFT_COLOUR: Final = "#d62728"
_DRIFT_CLASS: Final = ' class="drift"'
STYLE: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; }
dd { margin: 0; }
.verdict { font-weight: 600; padding: 0.4em 0.8em; display: inline-block; }
.verdict.drift { background: #fde8e8; color: #a61b1b; }
.verdict.ok { background: #e6f4ea; color: #1e6b34; }
.warning { background: #fff4d6; padding: 0.4em 0.8em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child, td:nth-child(2), td:nth-child(3) { text-align: left; }
tr.drift td { background: #fde8e8; }
tr.drift td:last-child { color: #a61b1b; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.4em; }
figure.drift { border-color: #d62728; }
figcaption { font-size: 0.9em; }
"""


def render_html(report: pb.DriftReport) -> str:
    """The whole page of ``report``: ask for it with ``include_distributions``,
    or it has the summary and table but no pictures."""
    insufficient = report.insufficient_data
    entries = report_entries(report)
    title = f"Drift of {report.model_version}, {_window_name(report.window)}"
    page = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{_text(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_text(title)}</h1>",
        _verdict_block(report),
        "<dl>",
        *(
            f"<dt>{_text(label)}</dt><dd>{_text(value)}</dd>"
            for label, value in report_fields(report)
        ),
        "</dl>",
    ]
    if entries:
        page.append("<table>")
        page.append("<tr>" + "".join(f"<th>{_text(h)}</th>" for h in COLUMNS) + "</tr>")
        for label, drift in entries:
            drifted = verdict(drift, insufficient=insufficient) == "DRIFT"
            cells = feature_cells(label, drift, insufficient=insufficient)
            row = "".join(f"<td>{_text(cell)}</td>" for cell in cells)
            page.append(f"<tr{_DRIFT_CLASS if drifted else ''}>{row}</tr>")
        page.append("</table>")
    pictures = [
        _figure(label, drift, insufficient=insufficient)
        for label, drift in entries
        if _has_distribution(drift.distribution)
    ]
    if pictures:
        page.extend(["<h2>Distributions: reference against the window</h2>", '<div class="plots">'])
        page.extend(pictures)
        page.append("</div>")
    page.extend(["</body>", "</html>", ""])
    return "\n".join(page)


def histogram_png(label: str, drift: pb.FeatureDrift, *, insufficient: bool = False) -> bytes:
    """The reference's and the window's shares per bin or category, side by side."""
    names, reference, current, numerical = _bars(drift.distribution)
    flagged = verdict(drift, insufficient=insufficient) == "DRIFT"
    # Fixed margins: a layout engine would lay the figure out twice per picture.
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    figure.subplots_adjust(left=0.13, right=0.98, top=0.9, bottom=0.27)
    FigureCanvasAgg(figure)  # the figure draws on Agg; nothing global is switched
    axes = figure.add_subplot()
    width = 0.4
    positions = range(len(reference))
    axes.bar([i - width / 2 for i in positions], reference, width, color=REFERENCE_COLOUR)
    axes.bar(
        [i + width / 2 for i in positions],
        current,
        width,
        color=DRIFT_COLOUR if flagged else CURRENT_COLOUR,
    )
    axes.legend(["reference", "window"], fontsize=6, frameon=False)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axes.tick_params(labelsize=6)
    if numerical:
        # Ticks between the bars, at the inner edges (the outer ones are infinite).
        axes.set_xticks([i + 0.5 for i in range(len(names))], names, parse_math=False)
        axes.set_xlabel("bins at the reference's quantiles", fontsize=6)
    else:
        axes.set_xticks(list(positions), names, parse_math=False)
    for tick in axes.get_xticklabels():
        tick.set_rotation(45 if len(names) > 4 else 0)
        tick.set_horizontalalignment("right" if len(names) > 4 else "center")
    test = TESTS.get(drift.test, "-")
    axes.set_title(f"{_cut(label, 40)}: {test}", fontsize=8, parse_math=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(label: str, drift: pb.FeatureDrift, *, insufficient: bool) -> str:
    picture = base64.b64encode(histogram_png(label, drift, insufficient=insufficient))
    shown = verdict(drift, insufficient=insufficient)
    alt = f"{label}: shares of the reference and the window per bin or category"
    return (
        f"<figure{_DRIFT_CLASS if shown == 'DRIFT' else ''}>"
        f'<img src="data:image/png;base64,{picture.decode("ascii")}" alt="{_text(alt)}" '
        f'width="{FIGURE_INCHES[0] * DPI:.0f}" height="{FIGURE_INCHES[1] * DPI:.0f}">'
        f"<figcaption>{_text(label)}: {_text(shown)}</figcaption></figure>"
    )


def _bars(
    distribution: pb.DistributionComparison,
) -> tuple[list[str], list[float], list[float], bool]:
    """Labels, reference shares and window shares of the bars, and whether the
    labels are the inner bin edges (one fewer than the bars) of a numerical
    feature rather than one category per bar."""
    reference = _shares(distribution.reference_counts)
    current = _shares(distribution.current_counts)
    if not distribution.categories:
        inner = list(distribution.bin_edges)[1:-1]
        if len(inner) != len(reference) - 1:
            inner = []  # not what the contract promises: draw the bars unlabelled
        return [_cut(f"{edge:.3g}", MAX_LABEL) for edge in inner], reference, current, True
    names = [_cut(name, MAX_LABEL) for name in distribution.categories]
    if len(names) > MAX_BARS:
        by_size = sorted(range(len(names)), key=lambda i: max(reference[i], current[i]))
        pooled = set(by_size[: len(names) - MAX_BARS + 1])
        kept = [i for i in range(len(names)) if i not in pooled]
        names = [names[i] for i in kept] + [f"{len(pooled)} others"]
        reference = [reference[i] for i in kept] + [sum(reference[i] for i in pooled)]
        current = [current[i] for i in kept] + [sum(current[i] for i in pooled)]
    return names, reference, current, False


def _shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [count / total if total else 0.0 for count in counts]


def _has_distribution(distribution: pb.DistributionComparison) -> bool:
    return bool(distribution.reference_counts) or bool(distribution.current_counts)


def _verdict_block(report: pb.DriftReport) -> str:
    dataset = report.dataset
    if report.insufficient_data:
        return '<p class="warning">Too few rows in the window for a verdict: statistics only.</p>'
    drifted = "drift" if dataset.drifted else "ok"
    words = "Dataset drift" if dataset.drifted else "No dataset drift"
    counted = f"{dataset.drifted_features} of {dataset.tested_features} features drifted"
    return f'<p class="verdict {drifted}">{words}: {_text(counted)}</p>'


def _window_name(window: pb.Window) -> str:
    return f"window {window.index}" if window.HasField("index") else "a time range"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(value: str) -> str:
    return html.escape(value, quote=True)
