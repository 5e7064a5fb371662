"""Grain training pipeline over a prepared store (``data/prepare.py``): crops, flips, normalisation, batches.

Owns ``build_train_dataset`` (the ``grain.MapDataset`` of batches), ``build_train_iterator`` (a checkpointable
iterator over it) and ``CropSampler`` (the per-record random transform). numpy + grain; must not import jax,
flax, training/ or the model (sharding arguments are plain ints: pass ``jax.process_index()`` and
``jax.process_count()``).

Chain (flax examples' Grain pattern, all index-based): ``MapDataset.source(records).seed(seed)`` ->
``shuffle`` -> ``repeat(num_epochs)`` -> ``random_map(CropSampler)`` -> ``[shard_index::shard_count]`` ->
``batch(drop_remainder=True)`` [-> batch-pooled normalisation] -> ``to_iter_dataset`` -> ``mp_prefetch``.
Unlike the flax examples we batch the MapDataset, before ``to_iter_dataset``: ``mp_prefetch`` hands worker k the
elements k, k + N, ..., so batching inside the workers would group different samples for different N; batching
by index keeps batch j the same for every ``worker_count``.

Per training sample (upstream's training pipeline, its quirks optional where noted):

1. Crop-or-pad to ``crop_size`` centred on the target's bounding box (torchio's rule; the box comes from the
   index, equal to ``transforms.crop_or_pad_box``), zero padding for image and label.
2. If the crop holds ``<= min_crop_foreground`` (1000) target voxels, upstream returns a different random sample;
   here the other record is drawn from this element's own ``np.random.Generator`` (grain ``random_map``), so
   the result is deterministic. Records whose whole target has ``<= min_crop_foreground`` voxels can never pass
   and are dropped up front (same distribution, fewer draws).
3. CT clip to [-1000, 1000] (``ct_clip="modality"``: records whose modality is CT, as upstream's ``/ct_`` path
   rule in training; ``"always"``, ``"never"``).
4. Z-normalisation over ``x > 0`` with unbiased std, statistics on the crop. ``normalization="per_volume"``
   (default: a sample does not depend on its batch neighbours, and it matches inference) or ``"batch_pooled"``
   (upstream training: one mean/std over the whole batch) or ``"none"``.
5. Random flip of each axis with p = 0.5, image and label together.

A record that cannot be read (missing/truncated ``.npy``, wrong shape, NaN/inf in the crop, zero-variance crop)
is skipped (``on_bad_record="skip"``: logged, replaced by a redraw, counted in the element's ``bad_skipped``) or
raises (``"raise"``). Batches: ``image`` float32 [b,S,S,S,1], ``label`` uint8 [b,S,S,S] in {0,1}, ``record``
int32 [b] (index into the prepared index), ``redraws`` / ``bad_skipped`` int32 [b] (how many draws this sample
replaced, for logging).

Every element depends only on (seed, global element index), so batches are identical for any ``worker_count``
and a restored iterator continues exactly (``TrainIterator``'s state is the number of batches consumed plus a
fingerprint of the pipeline settings, so it also restores under a different ``worker_count``).
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any

import grain
import numpy as np
from jaxtyping import Float, UInt8

from sammed3d_jax.data import cache, transforms

log = logging.getLogger(__name__)

NORMALIZATIONS = ("per_volume", "batch_pooled", "none")
CT_CLIP_MODES = ("modality", "always", "never")
BAD_RECORD_MODES = ("skip", "raise")


@dataclasses.dataclass(frozen=True)
class CropSampler(grain.transforms.RandomMap):
    """Turns a record index into one training sample (see the module docstring for the steps).

    Attributes:
        prepared_dir: the prepared store.
        records: the eligible records (index order of the draws).
        record_ids: position of each eligible record in the prepared index (reported as ``record``).
        crop_size: S, the cubic crop edge.
        normalization, ct_clip, on_bad_record: options as in ``build_train_dataset``.
        min_crop_foreground: a crop must hold more target voxels than this.
        flip_axes: spatial axes flipped with probability 0.5 each.
        max_draws: give up (RuntimeError) after this many unusable draws for one element.
    """

    prepared_dir: str
    records: tuple[cache.PreparedRecord, ...]
    record_ids: tuple[int, ...]
    crop_size: int
    normalization: str = "per_volume"
    ct_clip: str = "modality"
    on_bad_record: str = "skip"
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND
    flip_axes: tuple[int, ...] = (0, 1, 2)
    max_draws: int = 100

    def crop(self, record: cache.PreparedRecord) -> tuple[Float[np.ndarray, "s s s"], UInt8[np.ndarray, "s s s"]]:
        """Crop-or-pad of one record's image and label around its target box (raises ValueError if unusable)."""
        image = cache.open_array(self.prepared_dir, record.image)
        label = cache.open_array(self.prepared_dir, record.label)
        for name, array, dtype in (("image", image, np.float32), ("label", label, np.uint8)):
            if array.shape != record.shape or array.dtype != dtype:
                raise ValueError(
                    f"{record.id}: {name} array is {array.dtype}{list(array.shape)}, index says {np.dtype(dtype)}{list(record.shape)}"
                )
        window = crop_window(record, self.crop_size)
        image_crop = transforms.apply_crop_or_pad(image, window)
        if not np.isfinite(image_crop).all():
            raise ValueError(f"{record.id}: non-finite voxels in the image crop")
        return image_crop, transforms.apply_crop_or_pad(label, window)

    def _intensity(self, record: cache.PreparedRecord, image: np.ndarray) -> np.ndarray:
        if self.ct_clip == "always" or (self.ct_clip == "modality" and record.modality.upper() == "CT"):
            image = transforms.clip_intensity(image)
        if self.normalization == "per_volume":
            image = transforms.z_normalize(image, name=record.id)
        return image

    def random_map(self, element: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index = int(element)
        redraws = bad = 0
        for _ in range(self.max_draws):
            record = self.records[index]
            try:
                image, label = self.crop(record)
                usable = transforms.has_enough_foreground(label, self.min_crop_foreground)
                if usable:
                    image = self._intensity(record, image)
            except (ValueError, OSError) as err:
                if self.on_bad_record == "raise":
                    raise RuntimeError(f"bad prepared record {record.id} in {self.prepared_dir}: {err}") from err
                log.warning("skipping bad prepared record %s: %s", record.id, err)
                bad += 1
                index = int(rng.integers(len(self.records)))
                continue
            if usable:
                break
            redraws += 1
            index = int(rng.integers(len(self.records)))
        else:
            raise RuntimeError(
                f"no usable sample after {self.max_draws} draws from {self.prepared_dir} "
                f"({redraws} crops with <= {self.min_crop_foreground} target voxels, {bad} bad records)"
            )
        image, label = transforms.random_flip(rng, image, label, axes=self.flip_axes)
        return {
            "image": image[..., None],
            "label": label,
            "record": np.array(self.record_ids[index], np.int32),
            "redraws": np.array(redraws, np.int32),
            "bad_skipped": np.array(bad, np.int32),
        }


def crop_window(record: cache.PreparedRecord, crop_size: int) -> transforms.CropPad:
    """``transforms.crop_or_pad_box(label, (S,)*3)`` computed from the stored bounding box (no label scan).

    torchio's centre rule reduces to ``start = floor((bb_min + bb_max) / 2 - S / 2)`` per axis (see
    ``transforms.crop_or_pad_box``); a test pins the equality.
    """
    start = tuple(math.floor((lo + hi) / 2 - crop_size / 2) for lo, hi in record.bbox)
    return transforms.CropPad(tuple(record.shape), start, (crop_size,) * 3)


def _pool_normalize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Upstream training: one mean/std over the x > 0 voxels of the whole batch.
    images = transforms.z_normalize(batch["image"][..., 0], batch_pooled=True, name="batch")
    return {**batch, "image": images[..., None]}


def _fingerprint(prepared_dir, records, options) -> dict[str, Any]:
    ids = hashlib.sha1("\n".join(r.id for r in records).encode()).hexdigest()[:16]
    return {"records": len(records), "record_ids_sha1": ids, **options}


def build_train_dataset(
    prepared_dir: str | os.PathLike,
    *,
    crop_size: int = 128,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    normalization: str = "per_volume",
    ct_clip: str = "modality",
    on_bad_record: str = "skip",
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND,
    flip_axes: tuple[int, ...] = (0, 1, 2),
) -> tuple[grain.MapDataset, dict[str, Any]]:
    """The training batches as a ``grain.MapDataset`` (index-addressable, deterministic).

    Args:
        prepared_dir: folder written by ``python -m sammed3d_jax.data.prepare``.
        crop_size: cubic crop edge S in voxels (128 upstream).
        batch_size: per-process batch size (global batch / shard_count).
        seed: pipeline seed (shuffle order and per-element augmentation).
        shard_index, shard_count: this process's share: global element ``i`` goes to process ``i % shard_count``
            (``jax.process_index()``, ``jax.process_count()``); the global stream does not depend on them.
        num_epochs: passes over the records; None repeats forever.
        normalization: "per_volume" (default), "batch_pooled" (upstream training) or "none".
        ct_clip: "modality" (default: clip CT records to [-1000, 1000]), "always" or "never".
        on_bad_record: "skip" (default: log, count, redraw) or "raise".
        min_crop_foreground: upstream's 1000-voxel rule; 0 only rejects empty crops.
        flip_axes: axes flipped at random (p = 0.5 each); () disables flips.

    Returns:
        ``(batches, fingerprint)``; the fingerprint (settings + record list hash) guards iterator restores.

    Raises:
        ValueError: bad option, missing/invalid index, or no record with enough target voxels.
    """
    for name, value, allowed in (("normalization", normalization, NORMALIZATIONS), ("ct_clip", ct_clip, CT_CLIP_MODES),
                                 ("on_bad_record", on_bad_record, BAD_RECORD_MODES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if crop_size < 1 or batch_size < 1:
        raise ValueError(f"crop_size and batch_size must be positive, got {crop_size}, {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if not set(flip_axes) <= {0, 1, 2}:
        raise ValueError(f"flip_axes must be spatial axes 0, 1, 2, got {flip_axes}")
    _, all_records = cache.read_index(prepared_dir)
    eligible = [(i, r) for i, r in enumerate(all_records) if r.foreground_voxels > min_crop_foreground]
    dropped = len(all_records) - len(eligible)
    if dropped:
        log.info("%d of %d prepared targets have <= %d voxels and are never sampled", dropped, len(all_records),
                 min_crop_foreground)
    if not eligible:
        raise ValueError(
            f"{prepared_dir}: none of the {len(all_records)} prepared targets has more than "
            f"{min_crop_foreground} voxels (lower min_crop_foreground for tiny data)"
        )
    sampler = CropSampler(
        prepared_dir=str(prepared_dir),
        records=tuple(r for _, r in eligible),
        record_ids=tuple(i for i, _ in eligible),
        crop_size=int(crop_size),
        normalization=normalization,
        ct_clip=ct_clip,
        on_bad_record=on_bad_record,
        min_crop_foreground=int(min_crop_foreground),
        flip_axes=tuple(int(a) for a in flip_axes),
    )
    ds = grain.MapDataset.range(len(eligible)).seed(int(seed)).shuffle().repeat(num_epochs)
    # random_map before the shard slice: the augmentation of global element i is the same on every process
    # layout, and two processes never share an element's random stream.
    ds = ds.random_map(sampler)
    ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    if normalization == "batch_pooled":
        ds = ds.map(_pool_normalize)
    options = dict(crop_size=crop_size, batch_size=batch_size, seed=seed, shard_index=shard_index,
                   shard_count=shard_count, num_epochs=num_epochs, normalization=normalization, ct_clip=ct_clip,
                   min_crop_foreground=min_crop_foreground, flip_axes=list(flip_axes))
    return ds, _fingerprint(prepared_dir, sampler.records, options)


class TrainIterator(grain.DatasetIterator):
    """Iterator over ``build_train_dataset`` batches whose state is ``{"next_batch": k, "fingerprint": ...}``.

    The underlying Grain iterator (thread prefetch, or ``mp_prefetch`` over ``worker_count`` processes) is
    rebuilt from batch ``k`` on ``set_state``, so a restore is exact and independent of ``worker_count``.
    It is a ``grain.DatasetIterator``, so ``grain.checkpoint.CheckpointSave/Restore`` (Orbax) handle it.
    """

    def __init__(self, batches: grain.MapDataset, fingerprint: dict[str, Any], *, worker_count: int = 0,
                 worker_buffer_size: int = 2, read_threads: int = 1, prefetch_batches: int = 2):
        super().__init__()
        if worker_count < 0 or read_threads < 1 or prefetch_batches < 1 or worker_buffer_size < 1:
            raise ValueError("worker_count must be >= 0; read_threads, prefetch_batches, worker_buffer_size >= 1")
        self._batches = batches
        self._fingerprint = json.loads(json.dumps(fingerprint))
        self._worker_count = worker_count
        self._worker_buffer_size = worker_buffer_size
        self._read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
        self._next_batch = 0
        self._iterator = None

    def _start(self):
        if self._iterator is None:
            ds = self._batches[self._next_batch:].to_iter_dataset(self._read_options)
            if self._worker_count > 0:
                _absl_flags_parsed()
                ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=self._worker_count, per_worker_buffer_size=self._worker_buffer_size))
            self._iterator = iter(ds)
        return self._iterator

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._start())
        self._next_batch += 1
        return batch

    def start_prefetch(self) -> None:
        self._start()

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next_batch, "fingerprint": self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        fingerprint = state.get("fingerprint")
        if fingerprint != self._fingerprint:
            diff = sorted(k for k in set(self._fingerprint) | set(fingerprint or {})
                          if (fingerprint or {}).get(k) != self._fingerprint.get(k))
            raise ValueError(f"iterator state is from a different pipeline (differs in {diff})")
        self.close()
        self._next_batch = int(state["next_batch"])

    def close(self) -> None:
        if self._iterator is not None:
            if hasattr(self._iterator, "close"):
                self._iterator.close()
            self._iterator = None


def _absl_flags_parsed() -> None:
    # Grain's multiprocess prefetch reads absl flags; outside an absl.app program they are unparsed and the read
    # raises UnparsedFlagAccessError (google/grain#1355). Marking them parsed keeps every flag at its default.
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_train_iterator(prepared_dir: str | os.PathLike, *, worker_count: int = 0, worker_buffer_size: int = 2,
                         read_threads: int = 1, prefetch_batches: int = 2, **kwargs) -> TrainIterator:
    """``build_train_dataset(prepared_dir, **kwargs)`` wrapped in a checkpointable ``TrainIterator``.

    Args:
        prepared_dir: the prepared store.
        worker_count: 0 = read in this process (``read_threads`` threads); N > 0 = ``mp_prefetch`` with N worker
            processes. The batches are identical either way.
        worker_buffer_size: batches buffered per worker process.
        read_threads, prefetch_batches: threads and buffered batches of ``to_iter_dataset`` (per process).
        **kwargs: the keyword arguments of ``build_train_dataset`` (crop_size, batch_size, seed, ...).
    """
    batches, fingerprint = build_train_dataset(prepared_dir, **kwargs)
    return TrainIterator(batches, fingerprint, worker_count=worker_count, worker_buffer_size=worker_buffer_size,
                         read_threads=read_threads, prefetch_batches=prefetch_batches)

