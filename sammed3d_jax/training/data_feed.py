"""Feeding the train step: this process's rows of every global batch, and the topology-free data position.

The rows a process feeds come from the batch sharding (``parallel.process_rows``), and the data pipeline yields
exactly those rows of global batch ``j`` (elements ``j*B + row``), so the global batch is the same on any number of
processes and devices. The position saved in checkpoints is ``{"next_batch", "global_batch_size", "fingerprint"}``:
no process count, no rows, so a run resumes on another topology and continues the same global stream. Each sample
carries its global ``element`` index, from which the step derives its click keys. Must not import the model or
ml_collections (the loop passes plain values).
"""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sammed3d_jax import parallel

# Host batch keys the step reads; the pipeline's bookkeeping keys (record, redraws, ...) stay on the host.
STEP_KEYS = ("image", "label", "element", "flip", "ct_clip")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """What the pipeline needs besides the source and the topology (``config.data`` and friends, as plain values)."""

    seed: int
    crop_size: int
    normalization: str = "per_volume"
    ct_clip: str = "modality"
    min_crop_foreground: int = 1000
    flip_axes: tuple[int, ...] = (0, 1, 2)
    holdout_fraction: float = 0.0
    worker_count: int = 0
    read_threads: int = 1
    prefetch_batches: int = 2
    target_offset: float = 0.0
    target_offset_prob: float = 1.0
    offset_mode: str = "uniform"


def to_step_input(host: dict[str, np.ndarray], stop: bool) -> dict[str, np.ndarray]:
    """The arrays of a host batch that go to the device, plus the per-row ``stop`` flag of this process."""
    batch = {k: np.asarray(host[k]) for k in STEP_KEYS if k in host}
    element = batch["element"]
    if element.size and int(element.max()) >= 2 ** 31:
        raise ValueError("the data stream passed 2**31 samples; per-sample click keys take int32 element indices")
    batch["element"] = element.astype(np.int32)
    batch["stop"] = np.full(element.shape, int(stop), np.int32)
    return batch


class DataFeed:
    """This process's share of the training stream, placed as the step's globally sharded input.

    Args:
      source: the prepared store.
      settings: pipeline settings.
      mesh: the device mesh (its batch sharding decides the rows this process reads).
      global_batch: samples per step over all processes.
    """

    def __init__(self, source: str, settings: DataSettings, mesh: Mesh, global_batch: int):
        from sammed3d_jax.data import pipeline  # Grain and the store readers load only when a run starts.

        self.mesh = mesh
        self.global_batch = global_batch
        self.rows = parallel.process_rows(mesh, global_batch)
        s = settings
        self.iterator = pipeline.build_train_iterator(
            source, global_batch_size=global_batch, rows=self.rows, seed=s.seed, crop_size=s.crop_size,
            normalization=s.normalization, ct_clip=s.ct_clip, min_crop_foreground=s.min_crop_foreground,
            flip_axes=tuple(s.flip_axes), holdout_fraction=s.holdout_fraction, subset="train",
            worker_count=s.worker_count, read_threads=s.read_threads, prefetch_batches=s.prefetch_batches,
            target_offset=s.target_offset, target_offset_prob=s.target_offset_prob,
            offset_mode=s.offset_mode)

    def position(self) -> dict[str, Any]:
        """The data position to store in a checkpoint (global, topology-free)."""
        state = self.iterator.get_state()
        return {"next_batch": int(state["next_batch"]), "global_batch_size": self.global_batch,
                "fingerprint": state["fingerprint"]}

    def restore(self, position: dict[str, Any], step: int) -> None:
        """Moves to a stored position (written on any topology).

        Args:
          position: from :meth:`position`; empty for checkpoints written without one (then batch ``step``).
          step: the restored train step.
        """
        if not position:
            position = {"next_batch": step, "global_batch_size": self.global_batch,
                        "fingerprint": self.iterator.get_state()["fingerprint"]}
        if int(position.get("global_batch_size", self.global_batch)) != self.global_batch:
            raise ValueError(f"the checkpoint's data position is for global batch {position['global_batch_size']}, "
                             f"this run has --config.batch_size={self.global_batch}; the sample stream would change")
        self.iterator.set_state({"next_batch": int(position["next_batch"]), "fingerprint": position["fingerprint"]})

    def next(self, stop: bool) -> tuple[dict[str, jax.Array], float]:
        """The next global batch as sharded arrays, and the seconds spent waiting for the host pipeline."""
        t0 = time.perf_counter()
        host = next(self.iterator)
        waited = time.perf_counter() - t0
        return parallel.shard_host_batch(to_step_input(host, stop), self.mesh, self.global_batch), waited

    def close(self) -> None:
        """Stops the pipeline's threads and worker processes."""
        self.iterator.close()


def holdout_input(source: str, settings: DataSettings, mesh: Mesh, global_batch: int, max_batches: int
                  ) -> list[dict[str, jax.Array]]:
    """The validation batches of held-out cases, placed on the mesh once (each with ``valid`` per row)."""
    from sammed3d_jax.data import pipeline

    rows: Sequence[int] = parallel.process_rows(mesh, global_batch)
    s = settings
    batches = pipeline.holdout_batches(
        source, global_batch_size=global_batch, rows=rows, holdout_fraction=s.holdout_fraction,
        crop_size=s.crop_size, max_batches=max_batches or None, normalization=s.normalization, ct_clip=s.ct_clip,
        min_crop_foreground=s.min_crop_foreground)
    out = []
    for host in batches:
        batch = to_step_input(host, stop=False)
        batch.pop("stop")
        batch["valid"] = np.asarray(host["valid"], bool)
        out.append(parallel.shard_host_batch(batch, mesh, global_batch))
    return out
