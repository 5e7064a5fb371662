"""The challenge's click rule: the next click of each class, computed from the previous prediction and the ground truth.

For class ``c`` (restated from the official evaluation, not copied):

1. error = ``(segs == c) != (gts == c)``; no error voxel -> no click (``clicks_order`` gets None).
2. The largest 26-connected component of the error. Ties between equally large components go to the one labelled
   first, i.e. whose first voxel comes first in C order (scipy and cc3d both label in raster order).
3. A Euclidean distance transform, in voxels (unit spacing), on the component's bounding box padded by
   ``max(int(0.25 * size), 1)`` per axis (so the component never touches the border): the distance of each component
   voxel to the nearest non-component voxel. When the padded crop exceeds 6e7 voxels it is first reduced 2x by max
   pooling (zero-padded at the end to even sizes, as ``skimage.measure.block_reduce``), the transform is taken there
   (distances in pooled voxels, not rescaled) and every value repeated back 2x per axis.
4. The transform is zeroed outside the component (outside the bounding box it is zero anyway); if nothing is left,
   the component itself (value 1) is used.
5. Among the voxels of maximal value (candidates in ``np.argwhere``'s C order), one is picked as the official script
   does with ``np.random.seed(42); np.random.choice(len(candidates))`` reset at every call. We draw the same number
   from a fresh ``np.random.RandomState(42)`` (the legacy generator that ``np.random.seed`` seeds), which leaves the
   global numpy state untouched.
6. The click is "fg" where ``gts == c`` there (missed target), else "bg" (false positive).

Owns: ``largest_error_component``, ``component_edt``, ``next_click``, ``next_clicks``. Numpy/scipy only; must not
import jax or the model.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float, Integer
from scipy import ndimage

MAX_EDT_VOXELS = 60_000_000
_CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


@dataclasses.dataclass(frozen=True)
class Click:
    """One simulated click: ``coord`` (array indices of the case volume) and ``kind`` ("fg" or "bg")."""

    coord: tuple[int, int, int]
    kind: str


def largest_error_component(error: Bool[np.ndarray, "d h w"]) -> Bool[np.ndarray, "d h w"] | None:
    """The largest 26-connected component of ``error`` (ties: lowest raster label), or None if there is no error."""
    error = np.asarray(error, bool)
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=_CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _max_pool2(a: np.ndarray) -> np.ndarray:
    pad = [(0, s % 2) for s in a.shape]
    a = np.pad(a, pad)
    s0, s1, s2 = (s // 2 for s in a.shape)
    return a.reshape(s0, 2, s1, 2, s2, 2).max(axis=(1, 3, 5))


def component_edt(component: Bool[np.ndarray, "d h w"], max_voxels: int = MAX_EDT_VOXELS
                  ) -> Float[np.ndarray, "d h w"]:
    """Distance transform (voxels) of ``component`` on its padded bounding-box crop, zero elsewhere (steps 3-4 without
    the fallback). ``max_voxels`` is the size above which the crop is max-pooled 2x first."""
    component = np.asarray(component, bool)
    idx = np.argwhere(component)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    size = hi - lo
    pad = np.maximum((size * 0.25).astype(int), 1)
    crop = np.zeros(tuple(size + 2 * pad), np.uint8)
    inner = tuple(slice(int(p), int(p + s)) for p, s in zip(pad, size, strict=True))
    crop[inner] = component[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]
    if crop.size > max_voxels:
        edt = ndimage.distance_transform_edt(_max_pool2(crop))
        edt = edt.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    else:
        edt = ndimage.distance_transform_edt(crop)
    out = np.zeros(component.shape, np.float64)
    out[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))] = edt[inner]
    return out * component


def pick_maximum(values: Float[np.ndarray, "d h w"]) -> tuple[int, int, int]:
    """One voxel of maximal value: candidates in ``np.argwhere`` order, index from a fresh ``RandomState(42)``."""
    candidates = np.argwhere(values == values.max())
    chosen = candidates[np.random.RandomState(42).choice(len(candidates))]
    return tuple(int(c) for c in chosen)


def next_click(segs: Integer[np.ndarray, "d h w"], gts: Integer[np.ndarray, "d h w"], class_id: int,
               max_voxels: int = MAX_EDT_VOXELS) -> Click | None:
    """The official next click for ``class_id`` (module docstring), or None when the class has no error."""
    pred, target = np.asarray(segs) == class_id, np.asarray(gts) == class_id
    component = largest_error_component(pred != target)
    if component is None:
        return None
    edt = component_edt(component, max_voxels)
    if not edt.any():
        edt = component.astype(np.float64)
    coord = pick_maximum(edt)
    return Click(coord, "fg" if target[coord] else "bg")


def next_clicks(segs: Integer[np.ndarray, "d h w"], gts: Integer[np.ndarray, "d h w"], class_ids: Sequence[int],
                max_voxels: int = MAX_EDT_VOXELS) -> list[Click | None]:
    """``next_click`` for each class of ``class_ids`` (one entry per class, None where it has no error)."""
    return [next_click(segs, gts, int(c), max_voxels) for c in class_ids]
