"""Framework-neutral pieces of the PyTorch-vs-JAX comparison (``benchmarks/compare_pytorch.py``).

Imports numpy and the standard library only, never torch or jax, so CI tests these pieces without the ``compare``
extra. What lives here:

* :func:`perturb_state_dict`: seeded weights with no zero tensor. Upstream zero-initialises ``pos_embed``, the
  rel-pos tables and every norm bias, which would hide errors in the stages that use them.
* Upstream's interactive training loop (spec §4.2), written once over a small table of operations
  (:class:`ClickOps`): the encoder runs once, the decoder once per click with the previous low-res logits fed back,
  a prompt-less pass at a random step in 2..8 and at the last step, and DiceCE summed over the clicks. The PyTorch
  side plugs in torch operations; the tests plug in ours and check the loop against ``training.step``.
* :func:`dice_ce_reference`: MONAI's ``DiceCELoss(sigmoid=True, squared_pred=True)`` in float64 numpy.
* Timing helpers, the Markdown table, the encode-ratio line and :class:`RssSampler` (peak resident memory of a
  call on CPU).
"""

import dataclasses
import math
import os
import statistics
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# Upstream training thresholds the full-resolution LOGITS at 0.5 to find the error region (quirk 8).
CLICK_LOGIT_THRESHOLD = 0.5
# Upstream's ``np.random.randint(2, 9)``: the prompt-less step is drawn in this inclusive range.
INSERT_RANGE = (2, 8)
DICE_SMOOTH = 1e-5


# Weights ------------------------------------------------------------------------------------------------------------
def perturb_state_dict(state_dict: Mapping[str, Any], seed: int, scale: float = 0.02) -> dict[str, np.ndarray]:
    """``state_dict`` plus ``scale`` x N(0, 1) noise on every entry, as float32 numpy arrays.

    Each entry draws from its own generator seeded by ``(seed, crc32(name))``, so the result depends on the seed and
    the names only, not on the order of the entries or on which framework made the original values.

    Args:
      state_dict: name -> array-like (numpy arrays, or anything ``np.asarray`` takes, e.g. CPU tensors).
      seed: non-negative integer seed.
      scale: standard deviation of the noise.

    Returns:
      A new dict, same names and order, float32 arrays.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = {}
    for name, value in state_dict.items():
        x = np.asarray(value, dtype=np.float32)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[name] = x + np.float32(scale) * rng.standard_normal(x.shape, dtype=np.float32)
    return out


def zero_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the entries whose every element is zero."""
    return [name for name, value in state_dict.items() if not np.any(np.asarray(value))]


# The interactive training loop ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClickOps:
    """The operations of one framework that upstream's training interaction needs.

    Attributes:
      encode: ``image -> embedding``.
      decode: ``(embedding, points | None, labels | None, low_res_logits) -> low_res_logits``; ``None`` points make
        the prompt-less pass (upstream's ``points=None``: the fed-back mask is the only prompt).
      upsample: ``low_res_logits -> full-resolution logits`` in the layout ``loss`` and ``next_click`` take.
      loss: ``(full_logits, gt) -> scalar`` DiceCE of one click.
      next_click: ``(step, gt, full_logits | None) -> (points [b, 1, 3], labels [b, 1])``: the click fed at
        ``step``, drawn from the error of ``full_logits > CLICK_LOGIT_THRESHOLD`` (``None``: nothing predicted yet).
      zero_logits: ``embedding -> zero low-res logits``, the first mask prompt.
    """

    encode: Callable[[Any], Any]
    decode: Callable[[Any, Any, Any, Any], Any]
    upsample: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    next_click: Callable[[int, Any, Any], tuple[Any, Any]]
    zero_logits: Callable[[Any], Any]


def draw_insert(rng: np.random.Generator, insert_range: tuple[int, int] = INSERT_RANGE) -> int:
    """The step made prompt-less at random (upstream's ``np.random.randint(2, 9)``)."""
    lo, hi = insert_range
    return int(rng.integers(lo, hi + 1))


def prompt_less_steps(num_clicks: int, insert_at: int) -> tuple[bool, ...]:
    """Per step, whether the decoder pass gets no points: the step ``insert_at`` and the last step (upstream).

    With one click the only step is the last one, so it is prompt-less, as in upstream's loop and ours.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    return tuple(s == insert_at or s == num_clicks - 1 for s in range(num_clicks))


def interaction(ops: ClickOps, image: Any, gt: Any, prompt_less: Sequence[bool]) -> tuple[Any, list[Any], Any]:
    """Upstream's simulated interaction of one training step, on any framework's operations.

    Step ``s`` feeds the newest click only (upstream's default, no ``--multi_click``) or no points at all where
    ``prompt_less[s]``, and always the previous low-res logits, not detached (gradients flow through the whole chain).
    A click is drawn for every step, prompt-less ones included, as upstream consumes its RNG every step.

    Args:
      ops: the framework's operations.
      image: the batch of volumes, in the framework's layout.
      gt: the binary targets, in the layout ``ops.loss`` takes.
      prompt_less: one flag per step (see :func:`prompt_less_steps`).

    Returns:
      ``(total_loss, per_click_losses, final_full_logits)``; the total is the sum, not the mean (upstream).
    """
    if not prompt_less:
        raise ValueError("need at least one step")
    emb = ops.encode(image)
    low = ops.zero_logits(emb)
    points, labels = ops.next_click(0, gt, None)
    losses, full = [], None
    for s, no_points in enumerate(prompt_less):
        low = ops.decode(emb, None, None, low) if no_points else ops.decode(emb, points, labels, low)
        full = ops.upsample(low)
        losses.append(ops.loss(full, gt))
        if s + 1 < len(prompt_less):
            points, labels = ops.next_click(s + 1, gt, full)
    total = losses[0]
    for value in losses[1:]:
        total = total + value
    return total, losses, full


def dice_ce_reference(logits: np.ndarray, gt: np.ndarray, use_bce: bool = True) -> float:
    """MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` (>= 1.3) in float64 numpy, batch on axis 0.

    Dice per sample ``1 - (2 Σ p g + 1e-5) / (Σ p² + Σ g² + 1e-5)`` averaged over the batch, plus the voxel-mean
    BCE on logits over the whole batch when ``use_bce``.
    """
    x = np.asarray(logits, np.float64)
    g = (np.asarray(gt) > 0).astype(np.float64)
    if x.shape != g.shape:
        raise ValueError(f"logits {x.shape} and gt {g.shape} differ in shape")
    p = 1.0 / (1.0 + np.exp(-x))
    axes = tuple(range(1, x.ndim))
    dice = 1.0 - (2.0 * np.sum(p * g, axis=axes) + DICE_SMOOTH) / (
        np.sum(p * p, axis=axes) + np.sum(g * g, axis=axes) + DICE_SMOOTH)
    loss = float(np.mean(dice))
    if use_bce:
        loss += float(np.mean(np.maximum(x, 0.0) - x * g + np.log1p(np.exp(-np.abs(x)))))
    return loss


def box_target(batch: int, size: int) -> np.ndarray:
    """``[batch, size, size, size]`` uint8 targets: an off-centre box per sample, shifted by one voxel per sample."""
    gt = np.zeros((batch, size, size, size), np.uint8)
    for i in range(batch):
        a, b = size // 4 + i % 4, size // 2 + size // 8
        gt[i, a:b, size // 3:3 * size // 4, size // 5:size // 2 + i % 3] = 1
    return gt


# Timing -------------------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, repeats: int,
               cpu_times: list[float] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``sync(result)`` must block
    until the call's work is done (asynchronous devices). ``cpu_times`` receives each call's process CPU seconds
    (all threads), a figure less sensitive than wall time to other jobs on a shared CPU."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return times


def measure_cpu(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, repeats: int,
                resident_bytes: int) -> "Measurement":
    """A CPU measurement, the same for both frameworks: median wall and process-CPU seconds per call, and peak memory
    = the resident-set rise during the calls (:class:`RssSampler`) + ``resident_bytes`` already resident before them
    (weights, inputs, gradients, optimizer state)."""
    cpu: list[float] = []
    with RssSampler() as rss:
        times = time_calls(fn, sync, warmup, repeats, cpu_times=cpu)
    return Measurement(seconds=statistics.median(times), cpu_seconds=statistics.median(cpu),
                       peak_mib=(rss.peak_bytes + resident_bytes) / 2 ** 20, times=times)


def malloc_trim() -> bool:
    """Returns the C heap's free memory to the system (glibc ``malloc_trim(0)``); False where unavailable."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class RssSampler:
    """Peak resident set size of this process while the ``with`` block runs, above its value at entry (bytes).

    On entry the C heap's free memory is handed back to the system (:func:`malloc_trim`), so memory that an earlier
    computation freed but kept counts again when the block reuses it. A background thread reads
    ``/proc/self/statm`` every ``interval_s``; a spike shorter than that can be missed, so this is a lower bound of
    the block's working memory. ``peak_bytes`` is NaN where ``/proc`` is unavailable.
    """

    def __init__(self, interval_s: float = 0.005, trim: bool = True):
        self.interval_s, self.trim = interval_s, trim
        self.baseline_bytes = float("nan")
        self.peak_bytes = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _run(self):
        while not self._stop.is_set():
            rss = self.rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        if self.trim:
            malloc_trim()
        start = self.rss_bytes()
        if start is None:
            return self
        self._max = start
        self.baseline_bytes = float(start)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            end = self.rss_bytes() or 0
            self.peak_bytes = float(max(self._max, end) - self.baseline_bytes)
        return False


# Results ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurement:
    """One framework's numbers for one row: median seconds per call, peak memory (MiB), or why there are none."""

    seconds: float | None = None
    cpu_seconds: float | None = None  # process CPU time per call (CPU runs only)
    peak_mib: float | None = None
    compile_s: float | None = None
    program_mib: float | None = None  # XLA's arguments + outputs + temporaries of the program (our side)
    times: list[float] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.seconds is not None and math.isfinite(self.seconds)


@dataclasses.dataclass
class Row:
    """A line of the table: the same task, batch and device for both frameworks.

    Attributes:
      task: ``"encode"``, ``"inference"`` (encode + one click + upsampling + threshold) or ``"train, N click(s)"``.
      batch: volumes per call.
      torch_variant / jax_variant: precision and mode of each side (``"fp32"``, ``"amp-fp16"``, ``"bf16"``,
        ``"fp32+compile"``, ...).
    """

    task: str
    batch: int
    torch_variant: str
    jax_variant: str
    torch: Measurement
    jax: Measurement

    @property
    def ratio(self) -> float | None:
        """PyTorch time over JAX time (> 1: JAX is faster)."""
        if self.torch.ok and self.jax.ok and self.jax.seconds > 0:
            return self.torch.seconds / self.jax.seconds
        return None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def _ms(m: Measurement) -> str:
    if m.ok:
        return _fmt(m.seconds * 1e3, ",.1f")
    return f"failed ({m.note})" if m.note else "—"


def format_table(rows: Sequence[Row]) -> str:
    """The Markdown timing table: per row both frameworks' time, samples/s and peak memory, and the ratio."""
    head = ("| task | batch | PyTorch | JAX | PyTorch ms | JAX ms | PyTorch samples/s | JAX samples/s "
            "| PyTorch peak MiB | JAX peak MiB | PyTorch/JAX time |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        rate = [_fmt(r.batch / m.seconds if m.ok and m.seconds > 0 else None, ",.2f") for m in (r.torch, r.jax)]
        mem = [_fmt(m.peak_mib, ",.0f") for m in (r.torch, r.jax)]
        ratio = _fmt(r.ratio, ".2f")
        lines.append(f"| {r.task} | {r.batch} | {r.torch_variant} | {r.jax_variant} | {_ms(r.torch)} | {_ms(r.jax)} "
                     f"| {rate[0]} | {rate[1]} | {mem[0]} | {mem[1]} | {ratio if ratio == '—' else ratio + 'x'} |")
    return "\n".join(lines)


def _encode_row(rows: Sequence[Row]) -> Row | None:
    cands = [r for r in rows if r.task == "encode" and r.torch_variant == "fp32" and r.jax_variant == "fp32"
             and r.ratio is not None]
    return min(cands, key=lambda r: r.batch) if cands else None


def encode_ratio(rows: Sequence[Row]) -> float | None:
    """PyTorch/JAX time of the float32 encoder at the smallest batch measured (None if not measured)."""
    row = _encode_row(rows)
    return row.ratio if row else None


def ratio_line(rows: Sequence[Row]) -> str:
    """``ratio torch/jax encode: N.NNx`` (float32, smallest batch), or says it was not measured."""
    r = encode_ratio(rows)
    return f"ratio torch/jax encode: {r:.2f}x" if r is not None else "ratio torch/jax encode: not measured"


def cpu_ratio_line(rows: Sequence[Row]) -> str | None:
    """The same ratio in process CPU seconds (CPU runs), or None where not measured."""
    row = _encode_row(rows)
    if row is None or not row.torch.cpu_seconds or not row.jax.cpu_seconds:
        return None
    return f"ratio torch/jax encode, process CPU time: {row.torch.cpu_seconds / row.jax.cpu_seconds:.2f}x"


def rows_to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Plain JSON-ready dicts of the rows (per framework: seconds, samples/s, peak MiB, compile s, all times)."""
    out = []
    for r in rows:
        d = {"task": r.task, "batch": r.batch, "torch_variant": r.torch_variant, "jax_variant": r.jax_variant,
             "ratio_torch_over_jax": r.ratio}
        for side, m in (("torch", r.torch), ("jax", r.jax)):
            d[side] = {"seconds": m.seconds, "cpu_seconds": m.cpu_seconds, "samples_per_s": r.batch / m.seconds if m.ok and m.seconds else None,
                       "peak_mib": m.peak_mib, "compile_s": m.compile_s, "program_mib": m.program_mib,
                       "times": m.times, "note": m.note}
        out.append(d)
    return out
