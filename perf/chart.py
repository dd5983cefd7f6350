"""The benchmark's chart: p99 against offered rate, one panel per model and catalogue.

    python -m perf.chart docs/perf/bench.json docs/perf/bench.png   # redraw from a saved run

perf/bench.py draws it at the end of a run; this redraws it from the JSON of an earlier one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

IN_PROCESS = "in-process libreco"
NAMES = {
    "demo": "3k-item demo catalogue",
    "large": "48k-item catalogue",
    "als": "ALS",
    "deepfm": "DeepFM",
    IN_PROCESS: "in-process libreco (back to back)",
    "fastapi": "FastAPI",
    "fastapi 2 workers": "FastAPI, 2 workers",
    "fastapi default threads": "FastAPI, default threads",
    "uro-recs 1 worker": "uro-recs, 1 worker",
    "uro-recs 2 workers": "uro-recs, 2 workers",
    "uro-recs 1 worker, two-stage": "uro-recs, 1 worker, two-stage (@fm, K=500)",
}
COLORS = {
    IN_PROCESS: "black",
    "fastapi": "C0",
    "fastapi 2 workers": "C1",
    "fastapi default threads": "C4",
    "uro-recs 1 worker": "C2",
    "uro-recs 2 workers": "C3",
    "uro-recs 1 worker, two-stage": "C5",
}
# Where a max-rate label may go, tried in turn: offset from its point (points), alignment.
LABEL_SPOTS = [(12, 0, "left", "center"), (-12, 0, "right", "center")] + [
    (dx * far, dy * far, "left" if dx > 0 else "right", "bottom" if dy > 0 else "top")
    for far in (1, 2)
    for dx, dy in ((9, -9), (-9, 9), (9, 9), (-9, -9))
]
LABEL: dict[str, Any] = {
    "textcoords": "offset points",
    "fontsize": 11,
    "fontweight": "bold",
    "bbox": {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
}
RING: dict[str, Any] = {
    "marker": "o",
    "markersize": 14,
    "markerfacecolor": "none",
    "markeredgewidth": 2,
}


def tick(value: float, _position: object = None) -> str:
    return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"


def chart(report: dict[str, Any], path: Path) -> None:
    """Draw a bench JSON's sweeps into a PNG: a row per catalogue, a column per model; in each
    panel p99 against offered rate per system, the budget, and each system's max rate ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    results, budget = (
        [rounds(r, report["summary"]) for r in report["results"]],
        report["p99_budget_ms"],
    )
    catalogues = list(dict.fromkeys(r["catalogue"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    others = dict.fromkeys(s for r in results for s in r["runs"] if s not in COLORS)
    colors = {**{s: f"C{i + 5}" for i, s in enumerate(others)}, **COLORS}
    with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 12}):
        fig, axes = plt.subplots(
            len(catalogues),
            len(models),
            figsize=(max(6 * len(models), 8), 4 * len(catalogues) + 1),
            dpi=100,
            squeeze=False,
            layout="constrained",
        )
        panels = []  # what the max-rate labels need, placed once the figure is laid out
        for result in results:
            ax = axes[catalogues.index(result["catalogue"])][models.index(result["model"])]
            base = median_round(result["in_process"], "achieved_rate")
            curves = {IN_PROCESS: [(base["achieved_rate"], base["p99_ms"])]}
            best_of = {IN_PROCESS: base["achieved_rate"]}
            for system, runs in result["runs"].items():
                for run in runs:  # the rounds other than the median one: faint, unlabelled
                    if run is not median_round(runs, "max_rate"):
                        ax.plot(*zip(*swept(run), strict=True), color=colors[system], alpha=0.3)
                median = median_round(runs, "max_rate")
                curves[system], best_of[system] = swept(median), median["max_rate"]
            marks = []
            for system, points in curves.items():
                star = system == IN_PROCESS
                ax.plot(
                    *zip(*points, strict=True),
                    color=colors[system],
                    marker="*" if star else "o",
                    markersize=15 if star else 5,
                    label=NAMES.get(system, system),
                )
                best = best_of[system]
                y = next((p99 for rate, p99 in points if rate == best), None)
                if best == 0:  # over budget at every rate tried: "< the lowest"
                    marks.append((system, *points[0], f"< {points[0][0]:,.0f}/s"))
                elif y is not None:
                    marks.append((system, best, y, f"{best:,.0f}/s"))
                    if not star:
                        ax.plot(best, y, color=colors[system], **RING)
            ax.axhline(budget, color="grey", linestyle="--", linewidth=1.2)
            ax.annotate(
                f"{budget:g} ms\nbudget",
                (1, budget),
                xytext=(4, 0),
                va="center",
                xycoords=ax.get_yaxis_transform(),
                textcoords="offset points",
                color="dimgrey",
                fontsize=11,
            )
            rates = [x for points in curves.values() for x, _ in points]
            p99s = [y for points in curves.values() for _, y in points] + [budget]
            ax.set(
                xscale="log",
                yscale="log",
                xlim=(min(rates) / 2.5, max(rates) * 3),
                ylim=(min(p99s) / 1.7, max(p99s) * 1.7),
            )
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(tick))
                axis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xlabel("offered rate (requests/s)")
            ax.set_ylabel("p99 latency (ms)")
            ax.set_title(", ".join(NAMES.get(result[k], result[k]) for k in ("model", "catalogue")))
            curves["budget"] = [
                (ax.get_xlim()[0], budget),
                (ax.get_xlim()[1], budget),
            ]  # keep clear
            panels.append((ax, curves, marks))
        handles, labels = [], []
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
        handles.append(Line2D([], [], color="black", linestyle="none", **RING))
        labels.append(f"max rate with p99 ≤ {budget:g} ms")
        handles.append(Line2D([], [], linestyle="none"))
        labels.append("< r/s: over budget at every rate tried")
        fig.legend(handles, labels, loc="outside upper center", ncol=len(models) + 1, frameon=False)
        # Lay the figure out once and keep it; then put each max-rate label at the first spot
        # where it covers no line, no point and no other label (none free: where it hides least).
        fig.canvas.draw()
        fig.set_layout_engine("none")
        for ax, curves, marks in panels:
            steps = np.linspace(0, 1, 100)[:, None]
            logs = [np.log(np.array(points, dtype=float)) for points in curves.values()]
            sampled = np.vstack(
                [*logs, *(a + (b - a) * steps for log in logs for a, b in itertools.pairwise(log))]
            )
            taken = list(ax.transData.transform(np.exp(sampled)))
            boxes: list[Any] = []
            for system, x, y, label in marks:
                tried: list[Any] = []  # (what the label would hide, spot's rank, label, its box)
                for dx, dy, ha, va in LABEL_SPOTS:
                    text = ax.annotate(
                        label, (x, y), xytext=(dx, dy), ha=ha, va=va, color=colors[system], **LABEL
                    )
                    box = text.get_window_extent().padded(3)
                    hidden = box.count_contains(taken) + 100 * sum(map(box.overlaps, boxes))
                    if ax.bbox.count_contains(box.corners()) < 4:
                        hidden += 10_000  # out of the panel
                    tried.append((hidden, len(tried), text, box))
                    if not hidden:
                        break
                _, _, text, box = min(tried, key=lambda t: t[:2])
                for _, _, other, _ in tried:
                    if other is not text:
                        other.remove()
                boxes.append(box)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def swept(run: dict[str, Any]) -> list[tuple[float, float]]:
    """(offered rate, p99) of a round's sweep; rate 0 is one at a time, not a sweep step."""
    return sorted((s["offered_rate"], s["p99_ms"]) for s in run["steps"] if s["offered_rate"])


def median_round(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round whose `key` is the median (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run[key])[(len(runs) - 1) // 2]


def rounds(result: dict[str, Any], summary: list[dict[str, Any]]) -> dict[str, Any]:
    """A result in the layout of repeated rounds; a single-sweep one (JSON from before
    --repeats) becomes one round of each system."""
    if "runs" in result:
        return result
    max_rates = {
        r["system"]: r["max_rate"]
        for r in summary
        if (r["catalogue"], r["model"]) == (result["catalogue"], result["model"])
    }
    return {
        **result,
        "in_process": [result["in_process"]],
        "runs": {
            system: [{"steps": steps, "max_rate": max_rates[system]}]
            for system, steps in result["systems"].items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="Redraw the benchmark's chart from its JSON.")
    parser.add_argument("json", type=Path, help="a JSON file perf/bench.py wrote")
    parser.add_argument("png", type=Path, help="where to write the chart")
    args = parser.parse_args()
    chart(json.loads(args.json.read_text()), args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
