"""Where the model's ``S``³ windows go when there is no ground truth: placement around prompts, growth, coordinates.

Upstream crops one window around the ground truth, which a user does not have. The paper extends a first crop with
50 %-overlap windows where the prediction reaches the patch edge; that is what these helpers implement, on the
resampled RAS+ grid of ``inference.resample_case`` (the *model grid*):

- ``to_model_grid`` / ``box_to_model_grid``: user coordinates (voxel indices of the file, or RAS+ world mm) to
  float indices of the model grid; a box maps through its eight corners (flips, permutations, oblique grids).
- ``window_starts``: one window centred on the extent of the prompts (``floor(centre - S/2)`` of the voxel extent),
  or, along an axis where the extent exceeds ``S``, tiles overlapping by at least half (at most ``max_windows``,
  else the fewest windows that cover it). ``grid_starts``: the same on a lattice of ``S/4`` (``S/2`` for tiles),
  so the windows of nearby objects coincide and share their encode; the prompts stay inside and at most ``S/8``
  off the window centre along an axis.
- ``grown``: the neighbour windows (shifted by ``S/2``) across every face that a window's mask touches where the
  volume continues, each seeded at the mask's deepest voxel (Euclidean distance transform maximum) inside the
  overlap of the two windows. ``recentred``: the window moved onto the bounding box of its own mask.

Imports numpy/scipy and ``data.nifti.Geometry``; never jax or the model.
"""

import itertools
import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float
from scipy import ndimage

from sammed3d_jax.data.nifti import Geometry

Start = tuple[int, int, int]


def to_model_grid(coords: Float[np.ndarray, "n 3"], geom: Geometry, grid: Geometry, world: bool = False,
                  source: str = "image", what: str = "--points", noun: str = "point") -> Float[np.ndarray, "n 3"]:
    """Maps points (file voxel indices, or world mm with ``world``) to float voxel indices of ``grid``.

    Raises:
        ValueError: a point outside the image volume, naming ``what``, the point, the volume shape and ``source``.
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 3)
    homogeneous = np.c_[coords, np.ones(len(coords))]
    world_mm = homogeneous @ geom.affine.T if not world else homogeneous
    voxels = (world_mm @ np.linalg.inv(geom.affine).T)[:, :3]
    shape = np.asarray(geom.shape)
    for n, (v, c) in enumerate(zip(voxels, coords, strict=True), 1):
        if np.any(v < -0.5) or np.any(v >= shape - 0.5):
            where = f"world {c.tolist()} mm = voxel {np.round(v, 2).tolist()}" if world else f"voxel {c.tolist()}"
            raise ValueError(f"{what}: {noun} {n} ({where}) lies outside the volume of shape {geom.shape} "
                             f"({source})")
    on_grid = (world_mm @ np.linalg.inv(grid.affine).T)[:, :3]
    return np.clip(on_grid, 0, np.asarray(grid.shape) - 1).astype(np.float32)


def box_to_model_grid(lo: Sequence[float | int] | np.ndarray, hi: Sequence[float | int] | np.ndarray, geom: Geometry, grid: Geometry, world: bool = False,
                      source: str = "image", what: str = "--box") -> tuple[np.ndarray, np.ndarray]:
    """A box given by two opposite corners (inclusive voxel indices of the file, or world mm) on ``grid``:
    ``(lo [3], hi [3])`` float indices, from the per-axis extremes of its eight corners.

    Raises:
        ValueError: a corner outside the volume, or corners that are not opposite (lo > hi along an axis).
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if lo.shape != (3,) or hi.shape != (3,) or not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(f"{what}: a box is two corners of three finite numbers each")
    if np.any(lo > hi):
        raise ValueError(f"{what}: the first corner {lo.tolist()} must be the lower one ({hi.tolist()} given as the "
                         "upper one)")
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), np.float64)
    mapped = to_model_grid(corners, geom, grid, world, source, what, noun="corner")
    return mapped.min(axis=0), mapped.max(axis=0)


def voxel_extent(points: Float[np.ndarray, "n 3"]) -> tuple[np.ndarray, np.ndarray]:
    """``[lo, hi)`` of the voxels holding ``points`` (nearest voxel of each float index)."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    return np.floor(pts.min(0) + 0.5).astype(int), np.floor(pts.max(0) + 0.5).astype(int) + 1


def _axis_starts(lo: int, hi: int, size: int, overlap: bool) -> list[int]:
    extent = hi - lo
    if extent <= size:
        return [math.floor((lo + hi) / 2 - size / 2)]
    n = (math.ceil((extent - size) / (size // 2)) + 1) if overlap else math.ceil(extent / size)
    n = max(n, 2)
    return [round(lo + i * (extent - size) / (n - 1)) for i in range(n)]


def window_starts(lo: Sequence[int] | np.ndarray, hi: Sequence[int] | np.ndarray, size: int, max_windows: int) -> list[Start]:
    """Windows over ``[lo, hi)`` (model-grid voxels): one centred window, or tiles where the extent exceeds ``size``."""
    per_axis = [_axis_starts(int(a), int(b), size, True) for a, b in zip(lo, hi, strict=True)]
    if math.prod(len(p) for p in per_axis) > max_windows:
        per_axis = [_axis_starts(int(a), int(b), size, False) for a, b in zip(lo, hi, strict=True)]
    return [tuple(int(v) for v in s) for s in itertools.product(*per_axis)]


def _grid_axis_starts(lo: int, hi: int, size: int) -> list[int]:
    if hi - lo <= size:
        step = max(size // 4, 1)
        centred = math.floor((lo + hi) / 2 - size / 2)
        first, last = math.ceil((hi - size) / step), math.floor(lo / step)  # lattice starts keeping [lo, hi) inside
        if first > last:
            return [centred]
        k = min(max(round(centred / step), first), last)
        return [k * step]
    half = max(size // 2, 1)
    first = math.floor(lo / half) * half
    return list(range(first, max(hi - size, first) + half, half))


def grid_starts(lo: Sequence[int] | np.ndarray, hi: Sequence[int] | np.ndarray, size: int, max_windows: int) -> list[Start]:
    """Like ``window_starts`` but on a lattice (``size/4`` for a single window, ``size/2`` for tiles); falls back to
    ``window_starts`` when the lattice tiles would exceed ``max_windows``."""
    per_axis = [_grid_axis_starts(int(a), int(b), size) for a, b in zip(lo, hi, strict=True)]
    if math.prod(len(p) for p in per_axis) > max_windows:
        return window_starts(lo, hi, size, max_windows)
    return [tuple(int(v) for v in s) for s in itertools.product(*per_axis)]


def inside(points: Float[np.ndarray, "n 3"], start: Sequence[int] | np.ndarray, size: int) -> Bool[np.ndarray, " n"]:
    """Which points (model-grid float indices) fall in the window's voxels."""
    rel = np.asarray(points, np.float64).reshape(-1, 3) - np.asarray(start)
    return np.all((rel >= -0.5) & (rel < size - 0.5), axis=1)


def in_volume(start: Sequence[int], size: int, shape: Sequence[int]) -> tuple[slice, ...]:
    """The window's voxels that lie inside the volume, as local slices."""
    return tuple(slice(max(-s, 0), min(n - s, size)) for s, n in zip(start, shape, strict=True))


def deepest(mask: Bool[np.ndarray, "a b c"], box: tuple[slice, ...]) -> np.ndarray | None:
    """The voxel of ``mask`` inside ``box`` farthest from the box's mask border (indices of ``mask``), or None."""
    part = mask[box]
    if not part.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1, 1:-1]
    local = np.unravel_index(int(np.argmax(depth)), part.shape)
    return np.asarray([b.start + i for b, i in zip(box, local, strict=True)], np.float32)


def grown(start: Start, local_mask: Bool[np.ndarray, "s0 s1 s2"], shape: Sequence[int],
          edge_margin: int) -> list[tuple[Start, np.ndarray | None]]:
    """``(neighbour start, seed)`` for each face of the window that its mask touches where the volume continues.

    Args:
        start: the window's start on the model grid.
        local_mask: the window's mask (voxels outside the volume are ignored).
        shape: the model grid's shape.
        edge_margin: mask voxels this close to a face make the window grow there.

    Returns:
        Neighbours in face order (axis 0-2, lower face first); the seed is the mask's deepest voxel inside the two
        windows' overlap (model-grid index), or None when the mask has no voxel there.
    """
    size = local_mask.shape[0]
    valid = in_volume(start, size, shape)
    out = []
    for axis, side in itertools.product(range(3), (-1, 1)):
        lo, hi = start[axis], start[axis] + size
        if (side < 0 and lo <= 0) or (side > 0 and hi >= shape[axis]):
            continue  # the window already reaches the volume border there
        v = valid[axis]
        face = slice(v.start, min(v.start + edge_margin, v.stop)) if side < 0 else slice(
            max(v.stop - edge_margin, v.start), v.stop)
        if not local_mask[valid[:axis] + (face,) + valid[axis + 1:]].any():
            continue
        new = list(start)
        new[axis] = max(lo - size // 2, 0) if side < 0 else min(lo + size // 2, max(int(shape[axis]) - size, 0))
        overlap = tuple(slice(max(b - a, v.start), min(b - a + size, v.stop)) for a, b, v in zip(
            start, new, valid, strict=True))
        local = deepest(local_mask, overlap)
        out.append((tuple(int(x) for x in new), None if local is None else local + np.asarray(start, np.float32)))
    return out


def recentred(start: Start, local_mask: Bool[np.ndarray, "s0 s1 s2"], points: Float[np.ndarray, "n 3"],
              edge_margin: int) -> Start | None:
    """The window centred (torchio's rule) on its mask's bounding box along the axes where the mask stays clear of
    both faces, or None when that changes nothing or would move a prompt in or out of the window."""
    fg = np.argwhere(local_mask)
    if not len(fg):
        return None
    size = local_mask.shape[0]
    lo, hi = fg.min(0), fg.max(0) + 1
    new = list(start)
    for a in range(3):
        if lo[a] >= edge_margin and hi[a] <= size - edge_margin:
            new[a] = start[a] + math.floor((lo[a] + hi[a]) / 2 - size / 2)
    new = tuple(int(v) for v in new)
    if new == tuple(start) or not np.array_equal(inside(points, start, size), inside(points, new, size)):
        return None
    return new
