"""Upstream SAM-Med3D preprocessing as pure numpy functions (its training and inference pipelines, torchio's rules).

Owns: resampling to a target spacing (torchio ``Resample`` grid rule, SimpleITK interpolation semantics),
crop-or-pad around a target's bounding box (torchio ``CropOrPad(mask_name=...)``),
z-normalisation over ``x > 0`` (torchio ``ZNormalization``), CT clipping, random flips, and the
"crop holds more than 1000 target voxels" rule. Spatial ops take arrays ``[h, w, d, ...]`` in the array
order of ``data/nifti.py`` (any trailing channel axes ride along) and have an inverse.

Order upstream uses at inference: resample on the file's grid, then ``reorient_to_ras``, then crop.
Resampling and reorientation commute except at exact nearest-neighbour ties (a flipped axis turns
round-half-up into round-half-down), so keep that order for label parity. Pasting a ROI prediction back
(upstream's post-step) is one call: ``resample_to_geometry(roi, crop_pad.roi_geometry(ras_geom), original_geom, 0)``.
Upstream training ignores affines: no resampling, no reorientation, arrays in the file's voxel
order; that is the caller's choice of which of these functions to apply, not a flag here.

Must not import: jax, flax, model/, training/.
"""

import dataclasses
import math

import numpy as np
import scipy.ndimage
from jaxtyping import Bool, Float, Integer, Shaped

from sammed3d_jax.data.nifti import Geometry

CT_CLIP_HU = (-1000.0, 1000.0)
MIN_CROP_FOREGROUND = 1000  # upstream redraws a training sample whose crop has <= this many target voxels


# --- Resampling ---


def spacing_grid(geom: Geometry, target_spacing_mm=(1.5, 1.5, 1.5)) -> Geometry:
    """The grid torchio's ``Resample(target_spacing)`` builds for ``geom``.

    Per axis ``new_size = floor(old_size * old_spacing / target)`` (singleton axes stay 1), same direction
    cosines, and the centre of the field of view (midpoint of the first and last voxel centres) kept.
    The floor is taken in float64 exactly as torchio does, so a spacing stored as float32 (0.7 ->
    0.69999999) can lose one voxel there too.

    Raises:
        ValueError: a non-positive target spacing, or an axis that would end up with no voxel.
    """
    target = np.asarray(target_spacing_mm, dtype=np.float64)
    if target.shape != (3,) or not np.all(target > 0):
        raise ValueError(f"target_spacing_mm must be three positive numbers, got {target_spacing_mm!r}")
    old_spacing = np.asarray(geom.spacing_mm)
    old_size = np.asarray(geom.shape)
    new_size = np.floor(old_size * old_spacing / target).astype(np.int64)
    new_size[old_size == 1] = 1
    if np.any(new_size < 1):
        raise ValueError(f"resampling {geom!r} to {tuple(target)} mm leaves an axis with no voxel")
    linear = geom.affine[:3, :3] / old_spacing * target  # column k scaled to the new spacing
    centre = geom.affine[:3, :3] @ ((old_size - 1) / 2) + geom.affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((new_size - 1) / 2)
    return Geometry(affine, tuple(int(s) for s in new_size))


def _axis_taps(coords, n, order):
    """1-D sampling of ``n`` source voxels at continuous indices ``coords``, with ITK's border rules.

    A point is inside when ``-0.5 <= x < n - 0.5`` (ITK's ``IsInsideBuffer``: the buffer reaches half a voxel
    past the outer centres); outside points get the fill value. Inside, linear interpolation clamps to the
    edge voxel in the outer half-voxel (ITK ``LinearInterpolateImageFunction``) and nearest rounds half up
    (``floor(x + 0.5)``, ITK's ``RoundHalfIntegerUp``). Returns (i0, i1, frac, inside): the value is
    ``v[i0] + frac * (v[i1] - v[i0])``.
    """
    inside = (coords >= -0.5) & (coords < n - 0.5)
    if order == 0:
        i0 = np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.intp)
        return i0, i0, None, inside
    base = np.clip(np.floor(coords), 0, n - 1)
    frac = coords - base
    frac = np.where((frac <= 0) | (base + 1 > n - 1), 0.0, frac)
    i0 = base.astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, frac.astype(np.float32), inside


def _resample_separable(array, axis_maps, out_shape, order, fill):
    # axis_maps[a] = (b, scale, offset): source axis a is sampled at scale * q + offset for q along target
    # axis b. One 1-D pass per axis (trilinear = product of linear weights; ITK's inside test is per axis
    # too), shrinking axes first so later passes touch fewer voxels.
    out = array.astype(np.float32, copy=False) if order == 1 else array
    passes = sorted(range(3), key=lambda a: out_shape[axis_maps[a][0]] / array.shape[a])
    for a in passes:
        b, scale, offset = axis_maps[a]
        n, m = out.shape[a], out_shape[b]
        if m == n and scale == 1.0 and offset == 0.0:
            continue
        coords = scale * np.arange(m, dtype=np.float64) + offset
        i0, i1, frac, inside = _axis_taps(coords, n, order)
        if order == 0:
            out = np.take(out, i0, axis=a)
        else:
            # lo + frac * (hi - lo), in place: ITK's own form of the linear step, and the fewest passes.
            lo, hi = np.take(out, i0, axis=a), np.take(out, i1, axis=a)
            hi -= lo
            hi *= frac.reshape((m,) + (1,) * (out.ndim - a - 1))
            lo += hi
            out = lo
        if not inside.all():
            out[(slice(None),) * a + (~inside,)] = fill
    if out is array:
        out = array.copy()  # never hand back the caller's buffer
    source_of_target = [next(a for a in range(3) if axis_maps[a][0] == b) for b in range(3)]
    return np.ascontiguousarray(out.transpose(source_of_target + list(range(3, out.ndim))))


def _resample_general(array, index_map, out_shape, order, fill):
    # Oblique source/target relation: scipy's map_coordinates with mode="nearest" equals ITK's edge clamp
    # within the half-voxel border; points outside get `fill`. Done in slabs to bound the coordinate memory.
    n = np.asarray(array.shape[:3])
    chans = array.reshape(array.shape[:3] + (-1,))
    sources = [chans[..., c].astype(np.float32) if order == 1 else chans[..., c] for c in range(chans.shape[-1])]
    out = np.empty(tuple(out_shape) + (len(sources),), np.float32 if order == 1 else array.dtype)
    slab = max(1, 2_000_000 // max(1, out_shape[1] * out_shape[2]))
    for start in range(0, out_shape[0], slab):
        rows = np.arange(start, min(start + slab, out_shape[0]))
        q = np.stack(np.meshgrid(rows, *map(np.arange, out_shape[1:]), indexing="ij"))
        p = np.tensordot(index_map[:3, :3], q, axes=1) + index_map[:3, 3, None, None, None]
        inside = np.all((p >= -0.5) & (p < (n - 0.5)[:, None, None, None]), axis=0)
        for c, src in enumerate(sources):
            vals = scipy.ndimage.map_coordinates(src, p, order=order, mode="nearest", prefilter=False)
            out[start : start + q.shape[1], ..., c] = np.where(inside, vals, fill)
    return out.reshape(tuple(out_shape) + array.shape[3:])


def _separable_maps(index_map, tol=1e-9):
    lin = index_map[:3, :3]
    cols = [int(np.argmax(np.abs(lin[a]))) for a in range(3)]
    if sorted(cols) != [0, 1, 2]:
        return None
    scale = np.abs(lin).max()
    for a, b in enumerate(cols):
        if np.any(np.abs(np.delete(lin[a], b)) > tol * scale):
            return None
    return [(b, float(lin[a, b]), float(index_map[a, 3])) for a, b in enumerate(cols)]


def resample_to_geometry(
    array: Shaped[np.ndarray, "h w d *c"], geom: Geometry, target_geom: Geometry, order: int = 1, fill=0
) -> Shaped[np.ndarray, "h2 w2 d2 *c"]:
    """Resamples ``array`` (on ``geom``) onto ``target_geom`` with SimpleITK ``ResampleImageFilter`` semantics.

    Args:
        array: ``[h, w, d, ...]`` values on ``geom``'s grid.
        geom: geometry of ``array``.
        target_geom: the output grid (any affine; permuted/flipped/scaled/shifted grids take a fast separable
            path, oblique ones scipy's ``map_coordinates``).
        order: 1 = (tri)linear, float32 output (images); 0 = nearest, dtype kept (labels).
        fill: value of output voxels whose centre falls more than half a voxel outside the source grid
            (ITK's default pixel value, 0).

    Returns:
        ``[*target_geom.shape, ...]``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    if tuple(array.shape[:3]) != geom.shape:
        raise ValueError(f"array shape {array.shape} does not start with the geometry's shape {geom.shape}")
    index_map = np.linalg.solve(geom.affine, target_geom.affine)  # target voxel index -> source index
    # Snap float noise from the inversion (1e-15) so that it cannot flip a nearest-neighbour tie.
    index_map = np.round(index_map * 2.0**30) / 2.0**30
    maps = _separable_maps(index_map)
    if maps is None:
        return _resample_general(array, index_map, target_geom.shape, order, fill)
    return _resample_separable(array, maps, target_geom.shape, order, fill)


def resample_to_spacing(
    array: Shaped[np.ndarray, "h w d *c"], geom: Geometry, target_spacing_mm=(1.5, 1.5, 1.5), order: int = 1
) -> tuple[Shaped[np.ndarray, "h2 w2 d2 *c"], Geometry]:
    """torchio ``Resample(target_spacing)``: images ``order=1`` (linear), labels ``order=0`` (nearest).

    The grid is ``spacing_grid(geom, target_spacing_mm)``. Source positions are computed per axis directly
    in index space, ``x = (n-1)/2 + (j - (m-1)/2) * target/old``, so dyadic ratios (0.75 -> 1.5 mm) hit exact
    nearest-neighbour ties, which round up as ITK does. Border handling as in ``resample_to_geometry``
    (with floor-sized grids every sample lies inside the source anyway).
    Inverse: ``resample_to_geometry(out, new_geom, geom, order)``.

    Returns:
        ``(resampled, new_geometry)``.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    if tuple(array.shape[:3]) != geom.shape:
        raise ValueError(f"array shape {array.shape} does not start with the geometry's shape {geom.shape}")
    new_geom = spacing_grid(geom, target_spacing_mm)
    ratio = np.asarray(target_spacing_mm, dtype=np.float64) / np.asarray(geom.spacing_mm)
    n, m = np.asarray(geom.shape), np.asarray(new_geom.shape)
    maps = [(a, float(ratio[a]), float((n[a] - 1) / 2 - (m[a] - 1) / 2 * ratio[a])) for a in range(3)]
    return _resample_separable(array, maps, new_geom.shape, order, 0), new_geom


# --- Crop or pad ---


@dataclasses.dataclass(frozen=True)
class CropPad:
    """A crop-or-pad window: ROI voxel ``k`` is source voxel ``start + k`` per axis (fill where outside).

    Attributes:
        source_shape: spatial shape of the volume the window was computed on.
        start: source index of ROI voxel 0 per axis; negative means padding before.
        target_shape: ROI shape.
    """

    source_shape: tuple[int, int, int]
    start: tuple[int, int, int]
    target_shape: tuple[int, int, int]

    @property
    def pad_before(self) -> tuple[int, ...]:
        return tuple(max(-s, 0) for s in self.start)

    @property
    def pad_after(self) -> tuple[int, ...]:
        return tuple(max(s + t - n, 0) for s, t, n in zip(self.start, self.target_shape, self.source_shape))

    @property
    def crop_before(self) -> tuple[int, ...]:
        return tuple(max(s, 0) for s in self.start)

    @property
    def crop_after(self) -> tuple[int, ...]:
        return tuple(max(n - s - t, 0) for s, t, n in zip(self.start, self.target_shape, self.source_shape))

    def roi_geometry(self, geom: Geometry) -> Geometry:
        """Geometry of the ROI (torchio keeps world positions: the affine is shifted by ``start``)."""
        if geom.shape != self.source_shape:
            raise ValueError(f"CropPad computed for shape {self.source_shape}, got geometry {geom!r}")
        shift = np.eye(4)
        shift[:3, 3] = self.start
        return Geometry(geom.affine @ shift, self.target_shape)

    def overlap(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """``(source slices, window slices)`` of the part of the window that lies inside the source volume."""
        src, dst = [], []
        for s, t, n in zip(self.start, self.target_shape, self.source_shape):
            lo, hi = max(s, 0), min(s + t, n)
            hi = max(hi, lo)
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, hi - s))
        return tuple(src), tuple(dst)


def _as_shape(target_shape) -> tuple[int, int, int]:
    shape = tuple(int(t) for t in target_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"target_shape must be three positive sizes, got {target_shape!r}")
    return shape


def center_crop_or_pad(source_shape, target_shape=(128, 128, 128)) -> CropPad:
    """torchio ``CropOrPad`` without a mask: crops/pads ``ceil(n/2)`` voxels at the start, ``floor(n/2)`` at the end."""
    source, target = _as_shape(source_shape), _as_shape(target_shape)
    start = tuple(math.ceil((n - t) / 2) if n >= t else -math.ceil((t - n) / 2) for n, t in zip(source, target))
    return CropPad(source, start, target)


def crop_or_pad_box(mask: Shaped[np.ndarray, "h w d"], target_shape=(128, 128, 128)) -> CropPad:
    """torchio ``CropOrPad(target_shape, mask_name=...)``: a window centred on the bounding box of ``mask > 0``.

    Per axis: box ``[bb_min, bb_max)``, centre ``(bb_min + bb_max) / 2``; torchio subtracts 0.5 from the centre
    when "target even" XOR "centre integral", so ``begin = centre - target/2`` is integral, which is
    ``floor(centre - target/2)`` in every case (an odd box extent with an even target puts the extra voxel
    after the box). Pad-then-crop with torchio's ``int()`` bounds is exactly "ROI voxel k = source voxel
    begin + k". An empty mask falls back to ``center_crop_or_pad`` (torchio warns and does the same).
    """
    target = _as_shape(target_shape)
    fg = np.asarray(mask) > 0
    if not fg.any():
        return center_crop_or_pad(fg.shape, target)
    start = []
    for axis, t in enumerate(target):
        hits = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        centre = (int(hits[0]) + int(hits[-1]) + 1) / 2
        start.append(math.floor(centre - t / 2))
    return CropPad(tuple(int(s) for s in fg.shape), tuple(start), target)


def box_crop_window(bbox, source_shape, size: int) -> CropPad:
    """``crop_or_pad_box(mask, (size,) * 3)`` from the mask's bounding box ``[(first, last + 1)] * 3`` alone.

    torchio's centre rule reduces to ``start = floor((bb_min + bb_max) / 2 - size / 2)`` per axis (see
    ``crop_or_pad_box``), so no label scan is needed once the box is known.
    """
    start = tuple(math.floor((lo + hi) / 2 - size / 2) for lo, hi in bbox)
    return CropPad(tuple(int(n) for n in source_shape), start, (int(size),) * 3)


def apply_crop_or_pad(
    array: Shaped[np.ndarray, "h w d *c"], crop_pad: CropPad, fill=0
) -> Shaped[np.ndarray, "t0 t1 t2 *c"]:
    """Cuts the ROI out of ``array`` (``[*source_shape, ...]``), filling outside voxels with ``fill`` (upstream: 0)."""
    if tuple(array.shape[:3]) != crop_pad.source_shape:
        raise ValueError(f"array shape {array.shape} does not match the CropPad source shape {crop_pad.source_shape}")
    out = np.full(crop_pad.target_shape + array.shape[3:], fill, dtype=array.dtype)
    src, dst = crop_pad.overlap()
    out[dst] = array[src]
    return out


# --- Intensity, flips, foreground rule ---


def z_normalize(
    image: Float[np.ndarray, "*b h w d"],
    mask: Bool[np.ndarray, "*b h w d"] | None = None,
    *,
    batch_pooled: bool = False,
    name: str | None = None,
) -> Float[np.ndarray, "*b h w d"]:
    """torchio ``ZNormalization(masking_method=x > 0)``: ``(x - mean) / std`` with statistics over the mask.

    Mean and unbiased std (ddof=1, torch's ``std``) are taken over ``mask`` (default ``image > 0``) in
    float64 and applied to every voxel, zeros and padding included; the result is float32.

    Args:
        image: one volume ``[h, w, d]`` or a batch ``[b, h, w, d]`` (any leading axes).
        mask: voxels that enter the statistics; default ``image > 0``.
        batch_pooled: False (default): statistics per volume, as upstream inference does and so that a
            sample does not depend on its batch neighbours. True: one mean/std pooled over all leading axes,
            reproducing upstream training (torchio sees the ``(B,128,128,128)`` batch as one
            B-channel image).
        name: case name for error messages.

    Raises:
        ValueError: no voxel in the mask, or std == 0 (torchio raises too), naming the case when given.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = image > 0 if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"z_normalize: mask shape {mask.shape} != image shape {image.shape}")
    if image.ndim == 3 or batch_pooled:
        return _z_normalize_one(image, mask, name)
    flat_img, flat_mask = image.reshape((-1,) + image.shape[-3:]), mask.reshape((-1,) + image.shape[-3:])
    out = [_z_normalize_one(x, m, f"{name or 'volume'}[{i}]") for i, (x, m) in enumerate(zip(flat_img, flat_mask))]
    return np.stack(out).reshape(image.shape)


def _z_normalize_one(image, mask, name):
    where = f" in {name}" if name else ""
    values = image[mask].astype(np.float64)
    if values.size == 0:
        raise ValueError(f"z_normalize: no voxel > 0 (or in the given mask){where}; cannot normalise")
    std = values.std(ddof=1) if values.size > 1 else 0.0
    if not std > 0:
        raise ValueError(f"z_normalize: standard deviation is 0 over the {values.size} masked voxels{where}")
    return (image - np.float32(values.mean())) / np.float32(std)


def clip_intensity(
    image: Float[np.ndarray, "*s"], lo: float | int = CT_CLIP_HU[0], hi: float | int = CT_CLIP_HU[1]
) -> Float[np.ndarray, "*s"]:
    """Clamps intensities to ``[lo, hi]`` (default the CT window ``[-1000, 1000]`` HU).

    Upstream clamps in training only, for paths containing ``/ct_``; current inference does
    not. Whether to call this is the caller's option; the pipeline's default follows training.
    """
    if lo > hi:
        raise ValueError(f"clip_intensity: lo={lo} > hi={hi}")
    return np.clip(image, np.float32(lo), np.float32(hi)).astype(np.float32, copy=False)


def random_flip(
    rng: np.random.Generator, *arrays: Shaped[np.ndarray, "..."], axes=(0, 1, 2), p: float | int = 0.5
) -> tuple:
    """torchio ``RandomFlip(axes=(0, 1, 2))``: each listed spatial axis flipped with probability ``p``.

    One draw per axis (``rng.random(len(axes))``), the same flips applied to every array (image and label).

    Returns:
        The flipped arrays (C-contiguous copies), in the order given.
    """
    if not arrays:
        raise ValueError("random_flip: give at least one array")
    shape = arrays[0].shape[:3]
    if any(a.shape[:3] != shape for a in arrays):
        raise ValueError(f"random_flip: spatial shapes differ: {[a.shape for a in arrays]}")
    flip = tuple(ax for ax, u in zip(axes, rng.random(len(axes))) if u < p)
    return tuple(np.ascontiguousarray(np.flip(a, flip)) if flip else a.copy() for a in arrays)


def has_enough_foreground(
    label: Integer[np.ndarray, "*s"] | Bool[np.ndarray, "*s"], threshold: int = MIN_CROP_FOREGROUND
) -> bool:
    """True when the cropped label has more than ``threshold`` voxels > 0.

    Upstream training replaces a sample with ``sum <= 1000`` by a random other one; the
    pipeline decides how to redraw. Use ``threshold=0`` to only reject empty crops.
    """
    return int(np.count_nonzero(np.asarray(label) > 0)) > threshold
