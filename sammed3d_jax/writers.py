"""What the package writes for people to read: metrics as JSON lines, strict JSON values, and PNG line plots.

- ``MetricWriter``: CLU's ``write_scalars(step, dict)`` interface without the dependency. One JSON object per call
  to ``<workdir>/metrics.jsonl``, a short line echoed to stdout (or through a callback, e.g. ``tqdm.write``), curves
  plotted to a PNG. Only the primary process (``jax.process_index() == 0``) writes; the others are silent no-ops.
- ``json_safe``: the one cleaner for strict JSON (numpy/jax scalars and arrays made plain, NaN/inf -> ``null``), used
  for metrics and for evaluation summaries.
- ``plot_panels``: the one plotter (training curves, evaluation Dice/NSD vs clicks, the challenge's DSC/NSD vs step):
  matplotlib's object API on an Agg canvas, no pyplot global state, written through ``etils.epath``.

Metrics also go, on request, to TensorBoard event files (``tb_events``). Every path goes through ``etils.epath``
(``gs://`` workdirs work). Must not import model/, training/ or data/.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from sammed3d_jax import tb_events


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts: mappings (keys as strings), lists and tuples, numpy/jax arrays
    (as nested lists) and scalars made plain Python, non-finite floats made None. Other objects are returned as
    they are (``json.dumps`` names them if it cannot write them)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        return value
    if arr.ndim:
        return [json_safe(v) for v in arr.tolist()]
    return json_safe(arr.item())


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
        record = {"step": int(step), **{k: json_safe(v) for k, v in scalars.items()}}
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
        if self.is_primary:
            plot_curves(self.read(), png_path, keys)


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


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of a panel: ``y`` against ``x``, optionally with a shaded ``y ± band``; ``style``, ``color``, ``width``
    and ``alpha`` are matplotlib's (``color`` None: the next colour of the cycle). A label starting with ``_`` stays
    out of the legend."""

    label: str
    x: Sequence[float | int]
    y: Sequence[float | int]
    band: Sequence[float | int] | None = None
    style: str = "-o"
    color: str | None = None
    width: float = 1.2
    alpha: float = 1.0


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes: its series, title and x label; ``ylim``, ``xticks`` (with ``xticklabels``) and ``log_y`` when
    wanted."""

    title: str
    series: Sequence[Series]
    xlabel: str = "step"
    ylim: tuple[float, float] | None = None
    xticks: Sequence[float | int] | None = None
    log_y: bool = False
    xticklabels: Sequence[str] | None = None


def plot_panels(panels: Sequence[Panel], path: str | os.PathLike, *, panel_size: tuple[float, float] = (4.0, 3.2),
                legend_fontsize: float | int | None = None) -> None:
    """Saves the panels side by side as a PNG (parent folders created).

    Args:
      panels: what to draw, left to right; a panel with more than one series gets a legend.
      path: the PNG file.
      panel_size: inches per panel.
      legend_fontsize: legend text size (matplotlib's default when None).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(panels) or [Panel("nothing to plot yet", [])]
    fig = Figure(figsize=(panel_size[0] * len(panels), panel_size[1]), dpi=100)
    FigureCanvasAgg(fig)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for series in panel.series:
            colour = {} if series.color is None else {"color": series.color}  # None: the style's or the cycle's.
            (line,) = ax.plot(series.x, series.y, series.style, lw=series.width, ms=3, label=series.label,
                              alpha=series.alpha, **colour)
            if series.band is not None:
                lo = [a - b for a, b in zip(series.y, series.band, strict=True)]
                hi = [a + b for a, b in zip(series.y, series.band, strict=True)]
                ax.fill_between(series.x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if panel.xticks is not None:
            ax.set_xticks(list(panel.xticks), None if panel.xticklabels is None else list(panel.xticklabels))
        if panel.log_y:
            ax.set_yscale("log")
        if len(panel.series) > 1 and any(not x.label.startswith("_") for x in panel.series):
            ax.legend(fontsize=legend_fontsize, loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        fig.savefig(f, format="png")


def plot_curves(records: Sequence[Mapping[str, Any]], png_path: str | os.PathLike,
                keys: Sequence[str] = ("loss", "dice_first", "dice_last", "lr", "grad_norm")) -> None:
    """Saves a PNG with one panel per metric key against step; the Dice keys share one panel.

    Args:
      records: metric records with a ``step`` key.
      png_path: output file.
      keys: scalar metrics to draw; missing ones are skipped. ``lr`` and ``grad_norm`` use a log scale when
        every value is positive.
    """

    def series(key: str) -> Series:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return Series(key, [p[0] for p in pts], [p[1] for p in pts], style="-")

    present = [series(k) for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    dice = [s for s in present if s.label.startswith("dice")]
    panels = [Panel(s.label, [s], log_y=s.label in ("lr", "grad_norm") and all(v > 0 for v in s.y))
              for s in present if not s.label.startswith("dice")]
    if dice:
        panels.insert(1 if panels else 0, Panel(", ".join(s.label for s in dice), dice))
    plot_panels(panels, png_path)
