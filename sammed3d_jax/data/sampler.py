"""Per-element random decisions and the batch window reader of the training pipeline (host side only).

Owns ``EpochShuffle`` (the record order: a fresh permutation per epoch), ``CropSampler`` (a Grain ``RandomMap``:
record index -> which record, how many redraws, which flips, which crop offset) and ``WindowReader`` (a Grain
``Map`` over a batch of decisions: reads each crop window into one preallocated batch buffer), plus ``crop_window``
and ``offset_range``. numpy + grain; must not import jax, flax, training/ or the model.

The host does only what needs the store: the redraw rule and the window copy. What a sample's record is and how
it is flipped are drawn from the element's own ``np.random.Generator`` exactly as when the host did every step
(the draws of the redraw loop, then one ``rng.random(len(flip_axes))`` for the flips), so the final samples are
the same; clip, normalisation and flips are applied on the accelerator (``data/augment.py``).

Whether a draw of record r is usable depends only on r's centred crop, so it is decided once per process and
remembered (``_status``): the first draw of a record reads its window and checks it (target voxels in the crop
``> min_crop_foreground``; readable; finite; for ``per_volume`` normalisation, more than one voxel ``> 0`` after the
CT clip with a non-zero standard deviation), later draws of it read nothing. The outcome is the one the host-side
pipeline reached on every draw; a bad record is logged once and counted in ``bad_skipped`` at every draw.

Off-centre crops (``target_offset`` > 0, off by default): after the flips, one ``rng.random(3)`` draw per element
shifts the crop by a whole number of voxels per axis, uniform within ``target_offset`` times the free room on each
side (``offset_range``: the target's bounding box stays inside the crop; an axis on which the target does not fit
stays centred; a window store's shift also stays inside its stored window). The target voxels in the crop are the
same as in the centred crop, so the memoised check still holds for them; a shifted image window that cannot be
z-normalised (``per_volume``) falls back to the centred one (``WindowReader``). With ``target_offset_prob`` < 1, one
more ``rng.random()`` after that draw keeps the crop centred with probability ``1 - target_offset_prob`` (the shifted
crops are then the ones drawn with it at 1). ``offset_mode="target_voxel"`` centres the crop on one of the target's
voxels instead (``u[0]`` picks one of up to ``TARGET_VOXELS`` of them, kept when the record is first checked), the
shift clamped to the same range, so the crops resemble ``predict``'s windows, centred on a click in the target. With
``target_offset`` 0 nothing is drawn and the crops are the centred ones, bit for bit.
"""

import dataclasses
import logging
import sys
import threading
from typing import Any

import grain
import numpy as np

from sammed3d_jax.data import cache, transforms
from sammed3d_jax.data import store as store_lib

log = logging.getLogger(__name__)

OK, SMALL, BAD = "ok", "small", "bad"
TARGET_VOXELS = 64  # target voxels kept per record as crop centres for ``offset_mode="target_voxel"``


class EpochShuffle(grain.MapDataset):
    """Endless record order: element ``i`` is ``perm_e[i % n]`` with ``e = i // n`` and ``perm_e`` a permutation of
    ``range(n)`` drawn from ``np.random.default_rng([seed, SHUFFLE_STREAM, e])``, computed once per epoch.

    Grain's ``MapDataset.shuffle`` computes each index with a cycle-walking Feistel permutation whose cost grows
    as the dataset shrinks: 7.8 ms per index at 18 records, 0.3 ms at 1,000, 8 us at 10^6 (this 2-core machine,
    under load), more than the window copy itself on small datasets. One O(n) permutation per epoch costs
    microseconds per element at any size and is as deterministic (every process and worker derives it alike).
    """

    SHUFFLE_STREAM = 0x5EED

    def __init__(self, num_records: int, seed: int):
        super().__init__([])
        if num_records < 1:
            raise ValueError(f"EpochShuffle needs at least one record, got {num_records}")
        self._n, self._seed = int(num_records), int(seed)
        self._epochs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"n": self._n, "seed": self._seed}

    def __setstate__(self, state):
        self.__init__(state["n"], state["seed"])

    def __len__(self) -> int:
        return sys.maxsize

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._epochs.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, self.SHUFFLE_STREAM, epoch]).permutation(self._n)
                if len(self._epochs) >= 4:  # prefetching reads at most the next epoch ahead
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = perm
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), self._n)
        return int(self.permutation(epoch)[position])

    def __str__(self) -> str:
        return f"EpochShuffle(num_records={self._n})"


def crop_window(record: cache.PreparedRecord, crop_size: int) -> transforms.CropPad:
    """The training crop of ``record``: ``transforms.crop_or_pad_box(label, (S,)*3)`` from the stored box."""
    return transforms.box_crop_window(record.bbox, record.shape, crop_size)


def offset_range(record: cache.PreparedRecord, crop_size: int, window_size: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The inclusive range ``(lo [3], hi [3])`` of crop shifts (voxels, added to the centred crop's start) that keep
    the record's target bounding box inside the crop; ``lo <= 0 <= hi``.

    An axis on which the target is longer than the crop has range ``[0, 0]`` (the crop stays centred there, so the
    target voxels in the crop never change). ``window_size``: the stored window edge of a window store (the shifted
    crop must stay inside ``record.window_start + [0, window_size)``); None for whole-volume stores.
    """
    start = crop_window(record, crop_size).start
    lo, hi = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for axis, ((first, stop), c) in enumerate(zip(record.bbox, start)):
        a, b = stop - crop_size - c, first - c
        if window_size is not None:
            ws = record.window_start[axis]
            a, b = max(a, ws - c), min(b, ws + window_size - crop_size - c)
        if a <= 0 <= b:
            lo[axis], hi[axis] = a, b
    return lo, hi


def draw_offset(u: np.ndarray, lo: np.ndarray, hi: np.ndarray, fraction: float) -> np.ndarray:
    """The shift for uniform draws ``u`` in [0, 1) per axis: a uniform integer in ``[ceil(f*lo), floor(f*hi)]``."""
    a = np.ceil(fraction * lo).astype(np.int64)
    b = np.floor(fraction * hi).astype(np.int64)
    return np.minimum(a + np.floor(u * (b - a + 1)).astype(np.int64), b).astype(np.int32)


def clamp_offset(shift: np.ndarray, lo: np.ndarray, hi: np.ndarray, fraction: float) -> np.ndarray:
    """``shift`` clamped to ``[ceil(f*lo), floor(f*hi)]`` per axis (the range ``draw_offset`` draws from)."""
    return np.clip(shift, np.ceil(fraction * lo), np.floor(fraction * hi)).astype(np.int32)


def target_voxels(label: np.ndarray, crop_size: int, count: int = TARGET_VOXELS) -> np.ndarray:
    """Up to ``count`` target voxels of the centred crop's ``label`` (evenly spaced in array order), as the shifts
    (int32 [n, 3]) that centre the crop on each of them."""
    found = np.argwhere(label > 0)
    picked = found[np.unique(np.linspace(0, len(found) - 1, min(count, len(found))).astype(np.int64))]
    return (picked - crop_size // 2).astype(np.int32)


def image_problem(image: np.ndarray, ct_clipped: bool, normalization: str) -> str:
    """Why an image crop cannot be used ("" when it can): non-finite voxels, or (``per_volume``) what
    :func:`normalisation_problem` finds."""
    if not np.isfinite(image).all():
        return "non-finite voxels in the image crop"
    return normalisation_problem(image, ct_clipped) if normalization == "per_volume" else ""


def normalisation_problem(image: np.ndarray, ct_clipped: bool) -> str:
    """Why a finite crop cannot be z-normalised per volume ("" when it can): fewer than two voxels > 0 after the CT
    clip, or all of them equal (the unbiased std over them would be 0)."""
    # The host rule was "unbiased std over x > 0 (after the CT clip) is > 0", which for finite float32 values means
    # at least two voxels > 0 that are not all equal; the clip only lowers values above its upper bound (negative
    # ones never count).
    positive = image > 0
    count = int(np.count_nonzero(positive))
    lo = float(np.min(image, where=positive, initial=np.inf))
    hi = float(np.max(image, where=positive, initial=-np.inf))
    if ct_clipped:
        lo, hi = min(lo, transforms.CT_CLIP_HU[1]), min(hi, transforms.CT_CLIP_HU[1])
    if count < 2 or not hi > lo:
        return f"cannot z-normalise the crop ({count} voxels > 0, all equal)"
    return ""


def clips(record: cache.PreparedRecord, ct_clip: str) -> bool:
    """Whether ``record`` is CT-clipped under the ``ct_clip`` mode ("modality", "always", "never")."""
    return ct_clip == "always" or (ct_clip == "modality" and record.modality.upper() == "CT")


@dataclasses.dataclass(frozen=True)
class CropSampler(grain.transforms.RandomMap):
    """Turns a record index into one sample's decisions (see the module docstring).

    Attributes:
        store: the opened prepared store (``data/store.py``).
        records: the eligible records (index order of the draws).
        record_ids: position of each eligible record in the prepared index (reported as ``record``).
        crop_size: S, the cubic crop edge.
        normalization, ct_clip, on_bad_record: options as in ``pipeline.build_train_iterator``.
        min_crop_foreground: a crop must hold more target voxels than this.
        flip_axes: spatial axes flipped with probability 0.5 each.
        target_offset: in [0, 1]: the crop is shifted by up to this fraction of the free room around the target
            (``offset_range``), drawn after the flips; 0 (default) = the centred crop, nothing drawn.
        target_offset_prob: in [0, 1]: the share of crops that are shifted (the others stay centred); 1 (default)
            draws nothing more, so the crops are those of a run without this option.
        offset_mode: ``"uniform"`` (default): the shift is uniform within ``target_offset`` times the free room;
            ``"target_voxel"``: the crop is centred on one of the target's voxels (``target_voxels``), the shift
            then clamped to that same range, as ``predict`` centres its window on a click.
        max_draws: give up (RuntimeError) after this many unusable draws for one element.
    """

    store: Any
    records: tuple[cache.PreparedRecord, ...]
    record_ids: tuple[int, ...]
    crop_size: int
    normalization: str = "per_volume"
    ct_clip: str = "modality"
    on_bad_record: str = "skip"
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND
    flip_axes: tuple[int, ...] = (0, 1, 2)
    target_offset: float = 0.0
    target_offset_prob: float = 1.0
    offset_mode: str = "uniform"
    max_draws: int = 100

    def __post_init__(self):
        object.__setattr__(self, "_memo", {})
        object.__setattr__(self, "_centres", {})
        object.__setattr__(self, "_memo_lock", threading.Lock())

    def __getstate__(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self.__post_init__()

    def offset_fingerprint(self) -> dict[str, Any]:
        """The off-centre options for the data fingerprint; only those set, so runs without them keep theirs."""
        if not self.target_offset:
            return {}
        return {"target_offset": float(self.target_offset),
                **({"target_offset_prob": float(self.target_offset_prob)} if self.target_offset_prob < 1.0 else {}),
                **({"offset_mode": self.offset_mode} if self.offset_mode != "uniform" else {})}

    def _check(self, record: cache.PreparedRecord) -> tuple[str, str]:
        window = crop_window(record, self.crop_size)
        shape = (self.crop_size,) * 3
        image, label = np.empty(shape, np.float32), np.empty(shape, np.uint8)
        try:
            self.store.read_window(record, window, image, label)
        except (ValueError, OSError) as err:
            return BAD, str(err)
        problem = image_problem(image, False, "none")  # Non-finite voxels: bad whatever the target holds.
        if problem:
            return BAD, problem
        if not transforms.has_enough_foreground(label, self.min_crop_foreground):
            return SMALL, ""
        if self.normalization == "per_volume":
            problem = normalisation_problem(image, clips(record, self.ct_clip))
            if problem:
                return BAD, problem
        if self.target_offset > 0 and self.offset_mode == "target_voxel":
            self._centres[record.id] = target_voxels(label, self.crop_size)
        return OK, ""

    def status(self, index: int) -> str:
        """OK, SMALL (too little target in the crop) or BAD for eligible record ``index`` (memoised)."""
        found = self._memo.get(index)
        if found is None:
            record = self.records[index]
            found, reason = self._check(record)
            if found == BAD:
                if self.on_bad_record == "raise":
                    raise RuntimeError(f"bad prepared record {record.id} in {self.store.root}: {reason}")
                log.warning("skipping bad prepared record %s (%s): %s", record.id, self.store.root, reason)
            with self._memo_lock:
                self._memo[index] = found
        return found

    def random_map(self, element: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index = int(element)
        redraws = bad = 0
        for _ in range(self.max_draws):
            status = self.status(index)
            if status == OK:
                break
            if status == BAD:
                bad += 1
            else:
                redraws += 1
            index = int(rng.integers(len(self.records)))
        else:
            raise RuntimeError(
                f"no usable sample after {self.max_draws} draws from {self.store.root} "
                f"({redraws} crops with <= {self.min_crop_foreground} target voxels, {bad} bad records)"
            )
        flip = np.zeros(3, bool)
        for axis, u in zip(self.flip_axes, rng.random(len(self.flip_axes))):
            flip[axis] = u < 0.5
        offset = np.zeros(3, np.int32)
        if self.target_offset > 0:
            lo, hi = offset_range(self.records[index], self.crop_size, getattr(self.store, "window_size", None))
            u = rng.random(3)
            if self.target_offset_prob >= 1.0 or rng.random() < self.target_offset_prob:
                if self.offset_mode == "target_voxel":
                    centres = self._centres[self.records[index].id]
                    offset = clamp_offset(centres[min(int(u[0] * len(centres)), len(centres) - 1)], lo, hi,
                                          self.target_offset)
                else:
                    offset = draw_offset(u, lo, hi, self.target_offset)
        return {
            "slot": np.array(index, np.int64),
            "record": np.array(self.record_ids[index], np.int32),
            "redraws": np.array(redraws, np.int32),
            "bad_skipped": np.array(bad, np.int32),
            "flip": flip,
            "offset": offset,
            "ct_clip": np.array(clips(self.records[index], self.ct_clip)),
        }


@dataclasses.dataclass(frozen=True)
class WindowReader(grain.transforms.Map):
    """Batch of decisions -> the same batch with ``image`` float32 [n,S,S,S,1] and ``label`` uint8 [n,S,S,S].

    Each window is copied once from the store into the batch buffer (zero where it leaves the volume); the raw
    window, unclipped, unnormalised and unflipped. A ``slot`` of -1 marks a padding row (zeros). Buffers come
    from a ``store.BufferPool``, reused once the consumer has dropped an earlier batch. A row with a nonzero
    ``offset`` (int32 [n,3], optional) reads the shifted window; if that image cannot be used (``image_problem``
    under ``normalization``), the centred one is read instead and the row's ``offset`` is set to 0.
    """

    store: Any
    records: tuple[cache.PreparedRecord, ...]
    crop_size: int
    normalization: str = "per_volume"
    buffers: store_lib.BufferPool = dataclasses.field(default_factory=store_lib.BufferPool, compare=False)

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slots = batch.pop("slot")
        offsets = batch.get("offset")
        if offsets is not None:
            offsets = batch["offset"] = np.array(offsets, np.int32)
        n, s = len(slots), self.crop_size
        image = self.buffers.take((n, s, s, s, 1), np.float32)
        label = self.buffers.take((n, s, s, s), np.uint8)
        for i, slot in enumerate(slots.tolist()):
            if slot < 0:
                image[i] = 0
                label[i] = 0
                continue
            record = self.records[slot]
            window = crop_window(record, s)
            if offsets is not None and offsets[i].any():
                shifted = dataclasses.replace(window, start=tuple(int(a + d) for a, d in zip(window.start, offsets[i])))
                self.store.read_window(record, shifted, image[i, ..., 0], label[i])
                problem = image_problem(image[i, ..., 0], bool(batch["ct_clip"][i]), self.normalization)
                if not problem:
                    continue
                log.info("%s: the offset crop %s is unusable (%s); using the centred crop", record.id,
                         offsets[i].tolist(), problem)
                offsets[i] = 0
            self.store.read_window(record, window, image[i, ..., 0], label[i])
        return {**batch, "image": image, "label": label}
