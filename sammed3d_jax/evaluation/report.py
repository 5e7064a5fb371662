"""Files and views of an evaluation: the per-target CSV, JSON-safe summaries, a Markdown table, the Dice/NSD-vs-clicks
PNG.

Reads only the rows and the ``summary.json`` dict made by ``evaluation/runner.py``. Plots through matplotlib's object
API on an Agg canvas (no pyplot global state). Must not import jax, the model or data/.
"""

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROW_HEAD = ["dataset", "case", "target", "label_value", "status", "gt_voxels"]
ROW_TAIL = ["n_clicks", "positive_clicks", "first_label", "encode_s", "click_s", "target_s", "case_s", "error", "image",
            "label"]


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> None:
    """One row per (case, target), metrics between the identifiers and the timings; failed rows leave them empty."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_HEAD + list(metric_names) + ROW_TAIL, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def json_safe(value: Any) -> Any:
    """Nested dicts/lists with numpy scalars made plain and non-finite floats made None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


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
        f"{c['scored']} targets scored, {c['failed']} failed, {c['cases']} cases; grid: "
        f"{summary['options']['metric_grid']}, clicks: {summary['options']['click_mode']}; time per case "
        + (f"{per_case:.2f} s" if per_case is not None else "–") + ", per click "
        + (f"{1000 * per_click:.1f} ms" if per_click is not None else "–")
        + (f", compile {t['compile_s']:.1f} s" if t.get("compile_s") is not None else ""))
    for f in summary.get("failed", []):
        lines.append(f"FAILED {f['dataset']}/{f['case']} {f['target']!r}: {f['error']}")
    return "\n".join(lines)


def plot_dice_vs_clicks(summary: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Two panels, Dice and NSD vs number of clicks: per target mean ± std (band), overall dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = _counts(summary)
    fig = Figure(figsize=(8.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    series = list(summary["per_target"].items()) + [("overall", summary["overall"])]
    for ax, metric, title in zip(fig.subplots(1, 2), ("dice", "nsd"), ("Dice", "NSD (1 mm)"), strict=True):
        for name, m in series:
            stats = [m.get(f"{metric}_{c}") or {} for c in counts]
            mean = [s.get("mean") if s.get("mean") is not None else math.nan for s in stats]
            std = [s.get("std") if s.get("std") is not None else 0.0 for s in stats]
            if name == "overall":
                ax.plot(counts, mean, "k--o", lw=1.5, ms=3, label="overall")
                continue
            (line,) = ax.plot(counts, mean, "-o", lw=1.2, ms=3, label=name)
            ax.fill_between(counts, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("clicks")
        ax.set_title(title)
        ax.set_ylim(0.0, 1.0)
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
