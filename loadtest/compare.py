"""Two or more run JSONs side by side: one Markdown table of every point of every run, the
cluster's figures, and one set of plots (`compare_*.png`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.plots import write_plots
from loadtest.report import cluster_table, read_json, summary_table


def run_names(paths: Sequence[Path], reports: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's name, made unique with its file's stem when two runs share one."""
    names = [r["name"] for r in reports]
    return [f"{n} ({p.stem})" if names.count(n) > 1 else n
            for n, p in zip(names, paths, strict=True)]


def compare(paths: Sequence[Path], out_dir: Path) -> tuple[Path, list[Path]]:
    """Writes `compare.md` and the plots into `out_dir`; returns their paths."""
    if len(paths) < 2:
        raise ValueError("compare: give two or more run JSON files")
    reports = [read_json(p) for p in paths]
    names = run_names(paths, reports)
    runs = {name: report["points"] for name, report in zip(names, reports, strict=True)}
    rows = [(f"{name}: {point['label']}", point)
            for name, points in runs.items() for point in points]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out_dir, prefix="compare_")
    lines = ["# Load test comparison", "",
             "| run | file | target | workload | SLO TTFT ms | SLO TPOT ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, path, report in zip(names, paths, reports, strict=True):
        goodput = report["points"][0]["summary"]["goodput"] if report["points"] else {}
        slos = [f"{v * 1000:g}" if v is not None else "–"
                for v in (goodput.get("slo_ttft_s"), goodput.get("slo_tpot_s"))]
        lines.append(f"| {name} | `{path}` | `{report['target']}` | "
                     f"`{report['config'].get('workload')}` | {slos[0]} | {slos[1]} |")
    lines += ["", "Latencies in ms.", "", summary_table(rows), ""]
    table = cluster_table(rows)
    if table:
        lines += [table, ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    markdown = out_dir / "compare.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown, plots
