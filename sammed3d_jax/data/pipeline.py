"""Grain training pipeline over a prepared store (``data/prepare.py``): crops, flips, normalisation, batches.

Owns ``build_train_iterator`` (this process's share of the global training stream, checkpointable),
``holdout_batches`` (fixed validation batches), the case-level holdout split and ``CropSampler`` (the per-record
random transform). numpy + grain; must not import jax, flax, training/ or the model.

Topology-free by construction. The global stream is element 0, 1, 2, ...: ``EpochShuffle(records, seed)
.random_map(CropSampler, seed=seed)`` (shuffled epochs, one generator per element), so element ``e`` depends
only on ``(seed, e)``. Global batch ``j``
is elements ``j*B .. j*B+B-1``; a process passes the global ``rows`` it feeds, and ``GlobalRows`` maps its local
index to element ``j*B + rows[k]`` without touching other processes' elements. The concatenation of every
process's batch ``j`` is the same global batch for any process count, device count or ``worker_count``, and the
iterator state (the global batch index plus a settings fingerprint) restores under any of them. Batching is by
index, before ``to_iter_dataset``, so ``mp_prefetch`` workers (which take every N-th item) cannot regroup samples.

Per training sample (upstream's training pipeline, its quirks optional where noted), split between host and
accelerator:

1. Host (``sampler.CropSampler``): crop-or-pad window of ``crop_size`` centred on the target's bounding box
   (torchio's rule; the box comes from the index). If the crop holds ``<= min_crop_foreground`` (1000) target
   voxels, upstream returns a different random sample; here the other record is drawn from this element's own
   ``np.random.Generator`` (grain ``random_map``), so the result is deterministic. Records whose whole target has
   ``<= min_crop_foreground`` voxels can never pass and are dropped up front. Then the flips: each axis of
   ``flip_axes`` with p = 0.5. Optionally (``target_offset`` > 0; not upstream) the crop is then shifted off-centre
   by a seeded draw that keeps the target's bounding box inside it (``sampler.offset_range``).
2. Host (``sampler.WindowReader``): the raw window of every row is copied into one batch buffer, zero padding.
3. Accelerator (``augment.finish_batch``, first thing in the jitted step): CT clip to [-1000, 1000] where
   ``ct_clip`` (``"modality"``: CT records, as upstream's ``/ct_`` path rule; ``"always"``, ``"never"``),
   z-normalisation over ``x > 0`` with unbiased std on the crop (``"per_volume"``, the default, or
   ``"batch_pooled"`` over the global batch, as upstream training does, or ``"none"``), then the flips.

A record that cannot be read (missing/truncated array, wrong shape, NaN/inf in the crop, a crop that cannot be
z-normalised) is skipped (``on_bad_record="skip"``: logged once, replaced by a redraw, counted in the element's
``bad_skipped``) or raises (``"raise"``). Batches (n = ``len(rows)``): ``image`` float32 [n,S,S,S,1] (the raw
window), ``label`` uint8 [n,S,S,S] in {0,1}, ``flip`` bool [n,3], ``ct_clip`` bool [n], ``element`` int64 [n]
(global element index, to derive per-sample keys), ``offset`` int32 [n,3] (the crop's shift from the centred one,
voxels), ``record`` int32 [n] (index into the prepared index),
``redraws`` / ``bad_skipped`` int32 [n] (draws this sample replaced, for logging).

Validation: ``holdout_fraction`` keeps a deterministic share of cases (by a hash of the dataset and case names,
never by path or position) out of the training stream; ``subset="holdout"`` streams them instead, and
``holdout_batches`` gives each eligible holdout target once, centred, unflipped, as fixed batches.
"""

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from sammed3d_jax.data import cache, transforms
from sammed3d_jax.data import store as store_lib
from sammed3d_jax.data.offsets import offset_problems
from sammed3d_jax.data.sampler import OK, CropSampler, EpochShuffle, WindowReader, clips

log = logging.getLogger(__name__)

NORMALIZATIONS = ("per_volume", "batch_pooled", "none")
CT_CLIP_MODES = ("modality", "always", "never")
BAD_RECORD_MODES = ("skip", "raise")
SUBSETS = ("train", "holdout")


def case_fraction(record: cache.PreparedRecord) -> float:
    """A number in [0, 1) fixed by the case's dataset-relative identity (dataset name, case name).

    Every target of a case gets the same number, and it does not depend on paths, record positions or seeds, so
    the holdout split (``fraction < holdout_fraction``) is stable when the store is moved or cases are added.
    """
    digest = hashlib.sha256(f"{record.dataset}/{record.case}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def select_subset(records, holdout_fraction: float, subset: str) -> list[tuple[int, cache.PreparedRecord]]:
    """``(index position, record)`` pairs of the ``"train"`` or ``"holdout"`` cases (see ``case_fraction``)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    holdout = subset == "holdout"
    return [(i, r) for i, r in enumerate(records) if (case_fraction(r) < holdout_fraction) == holdout]


def _check_rows(global_batch_size: int, rows: Sequence[int]) -> tuple[int, ...]:
    rows = tuple(int(r) for r in rows)
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if not rows or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= global_batch_size:
        raise ValueError(f"rows must be sorted distinct indices in [0, {global_batch_size}), got {list(rows)}")
    return rows


class GlobalRows(grain.MapDataset):
    """This process's rows of a global stream: local index ``k`` is element ``j * B + rows[k % n]``, ``j = k // n``.

    Wraps the global per-element dataset without computing other processes' elements; each element gains
    ``"element"`` (int64), its global index.
    """

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, rows: Sequence[int]):
        super().__init__(parent)
        self._batch = int(global_batch_size)
        self._rows = _check_rows(global_batch_size, rows)

    def __len__(self) -> int:
        return (len(self._parent) // self._batch) * len(self._rows)

    def element_index(self, index: int) -> int:
        batch, row = divmod(int(index), len(self._rows))
        return batch * self._batch + self._rows[row]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        element = self.element_index(index)
        return {**self._parent[element], "element": np.array(element, np.int64)}

    def __str__(self) -> str:
        return f"GlobalRows(global_batch_size={self._batch}, rows={list(self._rows)})"


def _open(source, crop_size: int):
    store = store_lib.open_store(source)
    if hasattr(store, "check_crop_size"):
        store.check_crop_size(int(crop_size))
    return store


def _eligible(store, min_crop_foreground, holdout_fraction, subset):
    all_records = store.records
    chosen = select_subset(all_records, holdout_fraction, subset)
    eligible = [(i, r) for i, r in chosen if r.foreground_voxels > min_crop_foreground]
    dropped = len(chosen) - len(eligible)
    if dropped:
        log.info("%d of %d prepared %s targets have <= %d voxels and are never sampled", dropped, len(chosen),
                 subset, min_crop_foreground)
    if not eligible:
        raise ValueError(
            f"{store.root}: none of the {len(chosen)} prepared {subset} targets (of {len(all_records)}) has more "
            f"than {min_crop_foreground} voxels (lower min_crop_foreground for tiny data, or change holdout_fraction)"
        )
    return eligible


def _check_options(normalization, ct_clip, on_bad_record, crop_size, flip_axes, target_offset=0.0,
                   target_offset_prob=1.0, offset_mode="uniform") -> None:
    for name, value, allowed in (("normalization", normalization, NORMALIZATIONS), ("ct_clip", ct_clip, CT_CLIP_MODES),
                                 ("on_bad_record", on_bad_record, BAD_RECORD_MODES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if not set(flip_axes) <= {0, 1, 2}:
        raise ValueError(f"flip_axes must be spatial axes 0, 1, 2, got {flip_axes}")
    problems = offset_problems(target_offset, target_offset_prob, offset_mode)
    if problems:
        raise ValueError(" ".join(problems[0]))


def build_train_dataset(
    prepared_dir: str | os.PathLike,
    *,
    global_batch_size: int,
    rows: Sequence[int],
    seed: int,
    crop_size: int = 128,
    normalization: str = "per_volume",
    ct_clip: str = "modality",
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND,
    flip_axes: Sequence[int] = (0, 1, 2),
    holdout_fraction: float = 0.0,
    subset: str = "train",
    on_bad_record: str = "skip",
    target_offset: float = 0.0,
    target_offset_prob: float = 1.0,
    offset_mode: str = "uniform",
) -> tuple[grain.MapDataset, dict[str, Any]]:
    """This process's training batches as a ``grain.MapDataset`` (index-addressable, deterministic, endless).

    The global stream is element 0, 1, 2, ... (shuffled epochs over the eligible records); element ``e`` depends
    only on ``(seed, e)``. Global batch ``j`` is elements ``j*B .. j*B+B-1``; this dataset's batch ``j`` holds the
    global rows ``rows`` of it, in that order, so the concatenation over processes is the global batch whatever
    the process count. Arguments as in ``build_train_iterator``.

    Returns:
        ``(batches, fingerprint)``; the fingerprint (settings + record list hash, no topology) guards restores.

    Raises:
        ValueError: bad option, missing/invalid index, or no record with enough target voxels.
    """
    rows = _check_rows(global_batch_size, rows)
    flip_axes = tuple(int(a) for a in flip_axes)
    _check_options(normalization, ct_clip, on_bad_record, crop_size, flip_axes, target_offset, target_offset_prob,
                   offset_mode)
    store = _open(prepared_dir, crop_size)
    eligible = _eligible(store, min_crop_foreground, holdout_fraction, subset)
    records = tuple(r for _, r in eligible)
    sampler = CropSampler(
        store=store, records=records, record_ids=tuple(i for i, _ in eligible), crop_size=int(crop_size),
        normalization=normalization, ct_clip=ct_clip, on_bad_record=on_bad_record,
        min_crop_foreground=int(min_crop_foreground), flip_axes=flip_axes, target_offset=float(target_offset),
        target_offset_prob=float(target_offset_prob), offset_mode=offset_mode,
    )
    # random_map before the row selection: element e's sample is the same on every process layout, and two
    # processes never share an element's random stream.
    elements = EpochShuffle(len(records), int(seed)).random_map(sampler, seed=int(seed))
    ds = GlobalRows(elements, global_batch_size, rows).batch(len(rows), drop_remainder=True)
    ds = ds.map(WindowReader(store=store, records=records, crop_size=int(crop_size), normalization=normalization))
    ids = hashlib.sha1("\n".join(r.id for r in sampler.records).encode()).hexdigest()[:16]
    fingerprint = dict(records=len(sampler.records), record_ids_sha1=ids, seed=int(seed),
                       global_batch_size=int(global_batch_size), crop_size=int(crop_size),
                       normalization=normalization, ct_clip=ct_clip, min_crop_foreground=int(min_crop_foreground),
                       flip_axes=list(flip_axes), holdout_fraction=float(holdout_fraction), subset=subset)
    fingerprint.update(sampler.offset_fingerprint())
    return ds, fingerprint


class TrainIterator(grain.DatasetIterator):
    """Iterator over ``build_train_dataset`` batches whose state is ``{"next_batch": j, "fingerprint": {...}}``.

    The state is plain JSON and holds no topology: ``next_batch`` is the global batch index and the fingerprint
    holds only pipeline settings, so a state saved with one set of ``rows`` (process layout) restores with any
    other. The underlying Grain iterator (thread prefetch, or ``mp_prefetch`` over ``worker_count`` processes)
    is rebuilt from batch ``j`` on ``set_state``, so a restore is exact and independent of ``worker_count``.
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
        # Grain can use at most prefetch_buffer_size threads (and warns otherwise).
        self._read_options = grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=max(prefetch_batches, read_threads))
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

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next_batch, "fingerprint": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        fingerprint = state.get("fingerprint") or {}
        if fingerprint != self._fingerprint:
            diff = [f"{k}: saved {fingerprint.get(k)!r}, now {self._fingerprint.get(k)!r}"
                    for k in sorted(set(self._fingerprint) | set(fingerprint))
                    if fingerprint.get(k) != self._fingerprint.get(k)]
            raise ValueError(f"iterator state is from a different pipeline ({'; '.join(diff)})")
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


def build_train_iterator(
    source: str | os.PathLike,
    *,
    global_batch_size: int,
    rows: Sequence[int],
    seed: int,
    crop_size: int = 128,
    normalization: str = "per_volume",
    ct_clip: str = "modality",
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND,
    flip_axes: Sequence[int] = (0, 1, 2),
    holdout_fraction: float = 0.0,
    subset: str = "train",
    worker_count: int = 0,
    read_threads: int = 1,
    prefetch_batches: int = 2,
    on_bad_record: str = "skip",
    target_offset: float = 0.0,
    target_offset_prob: float = 1.0,
    offset_mode: str = "uniform",
) -> TrainIterator:
    """This process's share of the global training stream, as a checkpointable ``TrainIterator``.

    Args:
        source: the prepared store (``python -m sammed3d_jax.data.prepare``).
        global_batch_size: B, the batch size summed over all processes.
        rows: sorted global row indices this process feeds (from the batch sharding; e.g. process p of n with
            contiguous rows ``range(p*B//n, (p+1)*B//n)``). All rows = the whole global batch.
        seed: pipeline seed (shuffle order and per-element augmentation).
        crop_size: cubic crop edge S in voxels (128 upstream).
        normalization: "per_volume" (default), "batch_pooled" (upstream training) or "none".
        ct_clip: "modality" (default: clip CT records to [-1000, 1000]), "always" or "never".
        min_crop_foreground: upstream's 1000-voxel rule; 0 only rejects empty crops.
        flip_axes: axes flipped at random (p = 0.5 each); () disables flips.
        holdout_fraction: share of cases (by ``case_fraction``) kept out of training for validation.
        subset: "train" (default) or "holdout": which side of that split to stream.
        worker_count: 0 = read in this process (``read_threads`` threads); N > 0 = ``mp_prefetch`` with N worker
            processes. The batches are identical either way.
        read_threads, prefetch_batches: threads and buffered batches of ``to_iter_dataset`` (per process).
        on_bad_record: "skip" (default: log, count, redraw) or "raise".
        target_offset, target_offset_prob, offset_mode: off-centre crops (not upstream), as ``sampler.CropSampler``
            draws them from the element's own generator (every topology and a resumed run see the same crops);
            ``target_offset`` 0 (default): upstream's centred crop.

    Returns:
        An iterator of raw batch dicts (n = ``len(rows)``): ``image`` float32 [n,S,S,S,1] (the raw window, zero
        padded), ``label`` uint8 [n,S,S,S], ``flip`` bool [n,3], ``ct_clip`` bool [n], ``element`` int64 [n] (global
        element index), ``offset`` int32 [n,3], ``record`` / ``redraws`` / ``bad_skipped`` int32 [n]. Finish them on the devices with
        ``augment.finish_batch(batch, normalization=...)`` (same ``normalization``) inside the jitted step.
    """
    batches, fingerprint = build_train_dataset(
        source, global_batch_size=global_batch_size, rows=rows, seed=seed, crop_size=crop_size,
        normalization=normalization, ct_clip=ct_clip, min_crop_foreground=min_crop_foreground, flip_axes=flip_axes,
        holdout_fraction=holdout_fraction, subset=subset, on_bad_record=on_bad_record, target_offset=target_offset,
        target_offset_prob=target_offset_prob, offset_mode=offset_mode)
    return TrainIterator(batches, fingerprint, worker_count=worker_count, read_threads=read_threads,
                         prefetch_batches=prefetch_batches)


def holdout_batches(
    source: str | os.PathLike,
    *,
    global_batch_size: int,
    rows: Sequence[int],
    holdout_fraction: float,
    crop_size: int = 128,
    max_batches: int | None = None,
    normalization: str = "per_volume",
    ct_clip: str = "modality",
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND,
) -> list[dict[str, np.ndarray]]:
    """Validation batches: every eligible holdout target once, centred crop, no flips, no redraws.

    Holdout element ``e`` is the e-th eligible holdout record in index order; global batch ``j`` holds elements
    ``j*B .. j*B+B-1`` and this process gets rows ``rows`` of each (as in training). Rows past the last target,
    and targets whose crop fails the training checks (unreadable, non-finite, too little target in the crop, not
    normalisable), are all-zero rows with ``valid`` False and ``record`` -1, so every process agrees on the
    layout without reading the others' records and zero rows never enter pooled statistics. The batches are raw
    like training's: finish them with ``augment.finish_batch``.

    Args:
        source, global_batch_size, rows, crop_size, normalization, ct_clip, min_crop_foreground: as in
            ``build_train_iterator`` (``normalization`` only decides which crops count as usable).
        holdout_fraction: must be > 0 (and equal to the training run's, so that these cases were never trained on).
        max_batches: at most this many global batches (None: all).

    Returns:
        Batch dicts as in training plus ``valid`` bool [n].
    """
    rows = _check_rows(global_batch_size, rows)
    _check_options(normalization, ct_clip, "skip", crop_size, ())
    if not holdout_fraction > 0:
        raise ValueError(f"holdout_batches needs holdout_fraction > 0, got {holdout_fraction}")
    store = _open(source, crop_size)
    eligible = _eligible(store, min_crop_foreground, holdout_fraction, "holdout")
    records = tuple(r for _, r in eligible)
    sampler = CropSampler(store=store, records=records, record_ids=tuple(i for i, _ in eligible),
                          crop_size=int(crop_size), normalization=normalization, ct_clip=ct_clip, flip_axes=(),
                          min_crop_foreground=int(min_crop_foreground))
    reader = WindowReader(store=store, records=records, crop_size=int(crop_size))
    n_batches = math.ceil(len(records) / global_batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    out = []
    for j in range(n_batches):
        elements = [j * global_batch_size + r for r in rows]
        valid = [e < len(records) and sampler.status(e) == OK for e in elements]
        slots = [e if v else -1 for e, v in zip(elements, valid)]
        n = len(rows)
        out.append(reader.map({
            "slot": np.array(slots, np.int64), "element": np.array(elements, np.int64),
            "record": np.array([sampler.record_ids[e] if v else -1 for e, v in zip(elements, valid)], np.int32),
            "redraws": np.zeros(n, np.int32), "bad_skipped": np.zeros(n, np.int32), "flip": np.zeros((n, 3), bool),
            "ct_clip": np.array([v and clips(records[e], ct_clip) for e, v in zip(elements, valid)]),
            "valid": np.array(valid)}))
    return out
