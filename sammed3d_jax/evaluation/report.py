"""Views of an evaluation: the per-target CSV, a Markdown table with the failed and skipped cases, the Dice/NSD-vs-clicks
PNG.

Reads only the rows and the ``summary.json`` dict made by ``evaluation/runner.py``; plots with ``writers.plot_panels``
(the package's one plotter). Must not import jax, the model or data/.
"""

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from sammed3d_jax.writers import Panel, Series, plot_panels

ROW_HEAD = ["dataset", "case", "target", "label_value", "status", "gt_voxels"]
ROW_TAIL = ["n_clicks", "positive_clicks", "first_label", "encode_s", "click_s", "target_s", "case_s", "error", "image",
            "label"]


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> None:
    """One row per (case, target), metrics between the identifiers and the timings; failed rows leave them empty."""
    with epath.Path(path).open("w") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_HEAD + list(metric_names) + ROW_TAIL, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _counts(summary: Mapping[str, Any]) -> list[int]:
    return [int(c) for c in summary["options"]["click_counts"]]


def _fmt(stats: Mapping[str, Any] | None, percent: bool = True) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    mean, std = stats["mean"], stats.get("std")
    scale = 100.0 if percent else 1.0
    return f"{scale * mean:.1f} ± {scale * std:.1f}" if std is not None else f"{scale * mean:.1f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown table: per target (and overall) n, Dice % after each click count, Dice AUC, NSD % at the last count."""
    counts = _counts(summary)
    last = counts[-1]
    head = ["target", "n"] + [f"Dice@{c}" for c in counts] + ["Dice AUC", f"NSD@{last}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    rows = list(summary["per_target"].items()) + [("**overall**", summary["overall"])]
    for name, m in rows:
        n = m[f"dice_{counts[0]}"]["n"] if f"dice_{counts[0]}" in m else 0
        cells = [name, str(n)] + [_fmt(m.get(f"dice_{c}")) for c in counts]
        cells += [_fmt(m.get("dice_auc")), _fmt(m.get(f"nsd_{last}"))]
        lines.append("| " + " | ".join(cells) + " |")
    c, t = summary["counts"], summary["timing"]
    per_case = t["case_s"].get("mean")
    per_click = t["click_s"].get("mean")
    lines.append("")
    lines.append(
        f"{c['scored']} targets scored, {c['failed']} failed, {c.get('skipped', 0)} skipped, {c['cases']} cases; grid: "
        f"{summary['options']['metric_grid']}, clicks: {summary['options']['click_mode']}; time per case "
        + (f"{per_case:.2f} s" if per_case is not None else "–") + ", per click "
        + (f"{1000 * per_click:.1f} ms" if per_click is not None else "–")
        + (f", compile {t['compile_s']:.1f} s" if t.get("compile_s") is not None else ""))
    for f in summary.get("failed", []):
        lines.append(f"FAILED {f['dataset']}/{f['case']} {f['target']!r}: {f['error']}")
    for s in summary.get("skipped", []):
        lines.append(f"SKIPPED {s['file']}: {s['problem']}")
    return "\n".join(lines)


def plot_dice_vs_clicks(summary: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Two panels, Dice and NSD vs number of clicks: per target mean ± std (band), overall dashed."""
    counts = _counts(summary)

    def curve(name: str, stats: Mapping[str, Any], metric: str) -> Series:
        cells = [stats.get(f"{metric}_{c}") or {} for c in counts]
        mean = [s["mean"] if s.get("mean") is not None else math.nan for s in cells]
        if name == "overall":
            return Series("overall", counts, mean, style="k--o")
        return Series(name, counts, mean, band=[s["std"] if s.get("std") is not None else 0.0 for s in cells])

    groups = list(summary["per_target"].items()) + [("overall", summary["overall"])]
    panels = [Panel(title, [curve(n, m, metric) for n, m in groups], xlabel="clicks", ylim=(0.0, 1.0), xticks=counts)
              for metric, title in (("dice", "Dice"), ("nsd", f"NSD ({summary['options']['nsd_tolerance_mm']:g} mm)"))]
    plot_panels(panels, path, legend_fontsize=7)
