"""MetricWriter: CLU's ``write_scalars(step, dict)`` interface without the dependency.

Writes one JSON object per call to ``<workdir>/metrics.jsonl`` (NaN/inf become ``null``, arrays become lists), echoes
a short line to stdout (or through a callback, e.g. ``tqdm.write``), and plots the curves to a PNG with matplotlib's
Agg backend. Only the primary process (``jax.process_index() == 0``) writes; the others are silent no-ops.
Must not import model/, training/ or data/.
"""

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def _clean(value: Any) -> Any:
    """JSON-safe value: numpy/jax scalars -> float/int, arrays -> lists, non-finite floats -> None."""
    arr = np.asarray(value)
    if arr.ndim:
        return [_clean(v) for v in arr.tolist()]
    item = arr.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


class MetricWriter:
    """Appends scalar metrics to a JSON-lines file and prints them; process 0 only.

    Args:
      workdir: directory of ``metrics.jsonl``.
      is_primary: whether this process writes (pass ``jax.process_index() == 0``).
      echo: prints a line (default ``print``); None silences stdout.
      filename: name of the JSON-lines file.
    """

    def __init__(self, workdir: str | os.PathLike, is_primary: bool = True,
                 echo: Callable[[str], None] | None = print, filename: str = "metrics.jsonl"):
        self.path = os.path.join(os.fspath(workdir), filename)
        self.is_primary = is_primary
        self.echo = echo
        if is_primary:
            os.makedirs(os.fspath(workdir), exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records ``scalars`` (numbers or small arrays) at ``step``."""
        if not self.is_primary:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.echo is not None:
            parts = [f"{k}={_fmt(v)}" for k, v in record.items() if k != "step" and not isinstance(v, list)]
            self.echo(f"[step {record['step']}] " + " ".join(parts))

    def read(self) -> list[dict[str, Any]]:
        """All records written so far (empty if none)."""
        return read_metrics(self.path)

    def plot(self, png_path: str | os.PathLike, keys: Sequence[str] = ("loss", "dice_first", "dice_last", "lr",
                                                                       "grad_norm")) -> None:
        """Plots ``keys`` against step into ``png_path`` (one panel each; keys never logged are left out)."""
        if self.is_primary:
            plot_curves(self.read(), png_path, keys)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metrics JSON-lines file; a missing file gives an empty list, a bad line an error naming the file."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON line ({e})") from e
    return records


def plot_curves(records: Sequence[Mapping[str, Any]], png_path: str | os.PathLike,
                keys: Sequence[str] = ("loss", "dice_first", "dice_last", "lr", "grad_norm")) -> None:
    """Saves a PNG with one panel per metric key (x = step). Dice keys share one panel.

    Args:
      records: metric records with a ``step`` key.
      png_path: output file.
      keys: scalar metrics to draw; missing ones are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")  # Headless: never open a window, whatever the environment says.
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    dice_keys = [k for k in present if k.startswith("dice")]
    panels: list[list[str]] = [[k] for k in present if not k.startswith("dice")]
    if dice_keys:
        panels.insert(1 if panels else 0, dice_keys)
    if not panels:
        panels = [[]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key in panel:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=key)
        ax.set_xlabel("step")
        ax.set_title(", ".join(panel) if panel else "no metrics yet")
        values = [r[panel[0]] for r in records if r.get(panel[0]) is not None] if panel in (["lr"], ["grad_norm"]) \
            else []
        if values and all(isinstance(v, (int, float)) and v > 0 for v in values):
            ax.set_yscale("log")
        if len(panel) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
