"""What a training run reports about its own speed: step-time breakdown, throughput per device, MFU, profiles.

:class:`StepTimer` splits each logging interval into time spent waiting for the data pipeline (``data_wait_s``) and
the rest (dispatch plus device compute, ``compute_s``), per step, and turns it into ``samples_per_s``,
``samples_per_s_per_device`` and ``mfu``: the FLOPs of one compiled step on one device (XLA's cost analysis of the
partitioned program) per second, over the device's peak from :data:`PEAK_TFLOPS` (dense bf16 tensor-core numbers
from the vendors' data sheets; ``config.observe.peak_tflops`` overrides it, e.g. for a device not in the table; a
float32 run is measured against the same bf16 peak). XLA's cost analysis counts a loop body once, so the click scan
contributes one click: with many clicks ``mfu`` is a lower bound (for ``vit_b_ori`` the encoder dominates; about
1.28x more work at 11 clicks than at 1). :class:`ProfileWindow` records a profiler trace of steps N..M.
Must not import data/, the model or ml_collections.
"""

import logging
import time

import jax

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device, matched as substrings of ``jax.Device.device_kind`` (first match wins).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0), ("TPU v2", 45.0),
)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device of ``device_kind`` (None when unknown, e.g. CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


class StepTimer:
    """Accumulates per-step timings between two logging points.

    Args:
      global_batch: samples per step.
      devices: devices of the job.
      flops_per_device_step: FLOPs of one step on one device (None: no MFU).
      peak: peak FLOP/s of one device (None: no MFU).
    """

    def __init__(self, global_batch: int, devices: int, flops_per_device_step: float | None,
                 peak: float | None):
        self.global_batch = global_batch
        self.devices = devices
        self.flops = flops_per_device_step
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        """Starts a new interval now."""
        self._start = time.perf_counter()
        self._wait = 0.0
        self._steps = 0

    def waited(self, seconds: float) -> None:
        """Adds time spent blocked on the data pipeline."""
        self._wait += seconds

    def step_done(self) -> None:
        """Counts one step in the interval."""
        self._steps += 1

    def summary(self) -> dict[str, float]:
        """Per-step means over the interval (empty when no step was timed); call after blocking on its results."""
        if not self._steps:
            return {}
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        step_s = elapsed / self._steps
        out = {"step_s": step_s, "data_wait_s": self._wait / self._steps,
               "compute_s": max(elapsed - self._wait, 0.0) / self._steps,
               "samples_per_s": self.global_batch / step_s,
               "samples_per_s_per_device": self.global_batch / step_s / self.devices}
        if self.flops and self.peak:
            out["mfu"] = self.flops / step_s / self.peak
        return out


class ProfileWindow:
    """A ``jax.profiler`` trace of steps ``first..last`` (inclusive) into ``logdir`` (TensorBoard's profile plugin).

    Args:
      steps: ``(first, last)``, or ``()`` for none.
      logdir: the trace folder (local or ``gs://``).
    """

    def __init__(self, steps: tuple[int, ...], logdir: str):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.logdir = logdir
        self.active = False

    def before_step(self, step: int) -> None:
        """Starts the trace before step ``first``."""
        if step == self.first and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        """Stops the trace after step ``last`` (once its results are ready)."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.stop()
            log.info("profiler trace of steps %d..%d written to %s", self.first, self.last, self.logdir)

    def stop(self) -> None:
        """Ends an open trace (also when the run stops inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
