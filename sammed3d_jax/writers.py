"""MetricWriter: CLU's ``write_scalars(step, dict)`` interface without the dependency.

Writes one JSON object per call to ``<workdir>/metrics.jsonl`` (NaN/inf become ``null``, arrays become lists) and,
on request, the same scalars as TensorBoard events (``tb_events``), echoes a short line to stdout (or through a
callback, e.g. ``tqdm.write``), and plots the curves to a PNG with matplotlib's Agg backend. Every path goes through
``etils.epath`` (``gs://`` workdirs work). Only the primary process (``jax.process_index() == 0``) writes; the others
are silent no-ops. Must not import model/, training/ or data/.
"""

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from sammed3d_jax import tb_events


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
    """Records scalar metrics as JSON lines (and TensorBoard events) and prints them; process 0 only.

    Object stores cannot append, so records go through ``tb_events.AppendableFile``: appended locally, the whole
    object rewritten on ``gs://``-style paths (metrics files stay small: about 1 kB per record).

    Args:
      workdir: directory of ``metrics.jsonl`` (local or a URL).
      is_primary: whether this process writes (pass ``jax.process_index() == 0``).
      echo: prints a line (default ``print``); None silences stdout.
      filename: name of the JSON-lines file.
      tensorboard: also write TensorBoard event files into ``<workdir>/tensorboard``.
      start_step: the step a resumed run continues after (its event file starts there).
    """

    def __init__(self, workdir: str | os.PathLike, is_primary: bool = True,
                 echo: Callable[[str], None] | None = print, filename: str = "metrics.jsonl",
                 tensorboard: bool = False, start_step: int = 0):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / filename
        self.is_primary = is_primary
        self.echo = echo
        self._file = self._events = None
        if is_primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = tb_events.AppendableFile(self.path)
            if tensorboard:
                self._events = tb_events.EventFileWriter(self.workdir / "tensorboard", start_step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records ``scalars`` (numbers or small arrays) at ``step``."""
        if not self.is_primary:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
        self._file.append((json.dumps(record) + "\n").encode())
        self._file.flush()
        if self._events is not None:
            self._events.scalars(step, _tensorboard_values(record))
            self._events.flush()
        if self.echo is not None:
            parts = [f"{k}={_fmt(v)}" for k, v in record.items() if k != "step" and not isinstance(v, list)]
            self.echo(f"[step {record['step']}] " + " ".join(parts))

    def truncate(self, last_step: int) -> None:
        """Drops records past ``last_step`` (written by a killed run after its last checkpoint)."""
        if not self.is_primary:
            return
        records = self.read()
        if any(r["step"] > last_step for r in records):
            kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] <= last_step)
            self.path.write_text(kept)
            self._file = tb_events.AppendableFile(self.path)

    def read(self) -> list[dict[str, Any]]:
        """All records written so far (empty if none)."""
        return read_metrics(self.path)

    def plot(self, png_path: str | os.PathLike, keys: Sequence[str] = ("loss", "dice_first", "dice_last", "lr",
                                                                       "grad_norm")) -> None:
        """Plots ``keys`` against step into ``png_path`` (one panel each; keys never logged are left out)."""
        if not self.is_primary:
            return
        target = epath.Path(png_path)
        if "://" not in os.fspath(target):
            plot_curves(self.read(), os.fspath(target), keys)
            return
        with tempfile.TemporaryDirectory() as tmp:  # Matplotlib writes local files; copy the PNG to the store.
            local = os.path.join(tmp, "curves.png")
            plot_curves(self.read(), local, keys)
            target.write_bytes(pathlib.Path(local).read_bytes())


def _tensorboard_values(record: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers of a record; lists become ``name/i`` tags (e.g. Dice per click)."""
    out = {}
    for key, value in record.items():
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and key != "step":
                out[key if i is None else f"{key}/{i}"] = float(v)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metrics JSON-lines file; a missing file gives an empty list, a bad line an error naming the file."""
    path = epath.Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
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
