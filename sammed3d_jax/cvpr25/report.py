"""The files of a challenge evaluation: ``metrics.csv`` (the official columns), ``summary.json`` and the plot.

``metrics.csv`` has one row per successfully evaluated case, in the official column order (``metrics.CSV_COLUMNS``);
it is rewritten after every case, so an interrupted run keeps the cases done. ``summary.json`` holds the mean, std
and n of every numeric column, the failed cases with their reasons, per-case notes, the compile time, the settings
and the checkpoint's provenance. ``dsc_nsd_vs_step.png`` plots DSC and NSD against the step (1 = box, 2-6 = clicks):
the mean over cases with a ±1 std band and each case as a thin line.

Owns: ``write_metrics_csv``, ``read_metrics_csv``, ``summarize``, ``plot_steps``, ``format_summary``. Plots through
``writers.plot_panels``. Must not import jax or the model.
"""

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from sammed3d_jax.cvpr25.metrics import CSV_COLUMNS, STEPS
from sammed3d_jax.writers import Panel, Series, json_safe, plot_panels

CSV_NAME, SUMMARY_NAME, PLOT_NAME = "metrics.csv", "summary.json", "dsc_nsd_vs_step.png"


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes the rows (official columns, full float precision) to a temporary file, renamed into place."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row[k]) for k in CSV_COLUMNS})
    p = epath.Path(path)
    tmp = p.parent / f".{p.name}.partial"
    tmp.write_text(buf.getvalue())
    tmp.replace(p)


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads ``metrics.csv`` back (numbers as float, ``num_class``/``runtime_upperbound`` as int)."""
    rows = []
    for row in csv.DictReader(io.StringIO(epath.Path(path).read_text())):
        out: dict[str, Any] = {"CaseName": row["CaseName"]}
        for k in CSV_COLUMNS[1:]:
            out[k] = int(row[k]) if k in ("num_class", "runtime_upperbound") else float(row[k])
        rows.append(out)
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], failures: Sequence[Mapping[str, Any]], *, notes: Mapping[str, list],
              compile_s: float | None, settings: Mapping[str, Any], checkpoint: Mapping[str, Any] | None) -> dict:
    """The ``summary.json`` dict: per numeric column ``{"mean", "std", "n"}`` over cases, plus failures and context."""
    columns = {}
    for k in CSV_COLUMNS[1:]:
        values = np.asarray([float(r[k]) for r in rows], np.float64)
        columns[k] = {"mean": float(values.mean()) if values.size else None,
                      "std": float(values.std()) if values.size else None, "n": int(values.size)}
    over_time = [r["CaseName"] for r in rows if r["TotalRunningTime"] > r["runtime_upperbound"]]
    return json_safe({
        "cases": {"evaluated": len(rows), "failed": len(failures)},
        "metrics": columns,
        "failures": list(failures),
        "over_runtime_upperbound": over_time,
        "notes": {k: v for k, v in notes.items() if v},
        "compile_s": compile_s,
        "settings": dict(settings),
        "checkpoint": checkpoint,
    })


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    epath.Path(path).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")


def plot_steps(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """DSC and NSD against the step: mean ± std over cases and one thin line per case."""
    steps = np.arange(1, STEPS + 1)
    panels = []
    for metric, title in (("DSC", "DSC"), ("NSD", "NSD (2 mm)")):
        values = np.asarray([[r[f"{metric}_{s}"] for s in steps] for r in rows], np.float64).reshape(-1, STEPS)
        x = steps.tolist()
        series = [Series("_case", x, v.tolist(), style="-", color="0.6", width=0.6, alpha=0.6) for v in values]
        if len(values):
            series.append(Series(f"mean of {len(values)} cases", x, values.mean(0).tolist(),
                                 band=values.std(0).tolist(), color="C0", width=1.8))
        panels.append(Panel(title, series, xlabel="step (box, then clicks)", ylim=(0.0, 1.0), xticks=x,
                            xticklabels=["box"] + [f"+{s - 1}" for s in x[1:]]))
    plot_panels(panels, path, legend_fontsize=7)


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for the terminal: the official headline numbers and the counts."""
    m = summary["metrics"]

    def cell(k, digits=4):
        s = m[k]
        if s["mean"] is None:
            return f"{k} –"
        return f"{k} {s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    c = summary["cases"]
    lines = [", ".join(cell(k) for k in ("DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final")),
             "DSC per step: " + " ".join("–" if m[f"DSC_{s}"]["mean"] is None else f"{m[f'DSC_{s}']['mean']:.3f}"
                                        for s in range(1, STEPS + 1)),
             f"{c['evaluated']} cases evaluated, {c['failed']} failed; run time per case "
             + ("–" if m["TotalRunningTime"]["mean"] is None else f"{m['TotalRunningTime']['mean']:.2f} s")
             + ("" if summary.get("compile_s") is None else f", compile {summary['compile_s']:.1f} s (once)")]
    lines += [f"FAILED {f['case']}: {f['error']}" for f in summary["failures"]]
    if summary["over_runtime_upperbound"]:
        lines.append(f"over the 90 s/class limit: {', '.join(summary['over_runtime_upperbound'])}")
    return "\n".join(lines)

