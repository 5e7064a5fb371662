"""Segmentation metrics on host masks (numpy/scipy): Dice, normalised surface Dice (NSD), the score-vs-clicks AUC and
dataset summaries: the numbers evaluation reports, as upstream's metric code defines them.

NSD follows the definition of DeepMind's ``surface_distance`` package (Nikolov et al. 2018): the surface is made of
marching-cubes surface elements ("surfels") of the 2x2x2 voxel neighbourhoods, each with its area in mm² at the true
(anisotropic) spacing, and distances are Euclidean distances in mm between surfel positions, from distance transforms
with that spacing. Why our own implementation rather than the package: the package (``surface-distance`` 0.1, a
2018 research release) is not maintained, imports scipy namespaces that scipy deprecates, and is not on the list of
dependencies this project allows at run time; reimplementing it is about 100 lines, and keeping the package as a
test-only oracle (``[dev]``) checks every surfel area and NSD value against it independently. The surfel-area table
is derived here from marching cubes (``_triangle_normals``), not copied from the package.

NaN policy (upstream's, for every overlap and surface score here): both masks empty -> NaN (nothing to score;
``summarize`` skips it); ground truth empty and prediction non-empty -> 0; ground truth non-empty and prediction
empty -> 0 (it follows from the formulas). Distances of an empty surface are +inf.

Must not import jax, flax or the model: runs on the host, after predictions were fetched.
"""

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from jaxtyping import Float, Shaped
from scipy import ndimage

# Corner (a, b, c) of a 2x2x2 neighbourhood (offsets along array axes 0, 1, 2) sets bit 4a + 2b + c of its code.
_CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _as_masks(pred, gt, ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0  # nonzero = inside, as upstream's uint8 cast
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got pred {pred.shape} and gt {gt.shape}")
    if ndim is not None and gt.ndim != ndim:
        raise ValueError(f"pred and gt must be {ndim}-D volumes, got shape {gt.shape}")
    return pred, gt


def dice(pred: Shaped[np.ndarray, "*dims"], gt: Shaped[np.ndarray, "*dims"]) -> float:
    """Dice similarity coefficient ``2|P∩G| / (|P| + |G|)``; nonzero voxels are inside.

    Returns NaN when both masks are empty, 0 when exactly one is empty (module NaN policy).
    """
    pred, gt = _as_masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _polygons(inside: frozenset) -> list[list[np.ndarray]]:
    """Marching-cubes polygons (vertices at crossed-edge midpoints) of one 2x2x2 neighbourhood.

    A face whose diagonal corners disagree is ambiguous; the surface cuts off the corners of the minority side
    (the inside corners when at most four are inside), which makes a code and its complement share one surface.
    """
    separate = inside if len(inside) <= 4 else frozenset(_CORNERS) - inside
    segments = []
    for axis, side in itertools.product(range(3), (0, 1)):
        u, v = (k for k in range(3) if k != axis)
        ring = []
        for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):  # the face's corners in cyclic order
            corner = [0, 0, 0]
            corner[axis], corner[u], corner[v] = side, du, dv
            ring.append(tuple(corner))
        edges = [frozenset((ring[i], ring[(i + 1) % 4])) for i in range(4)]
        crossed = [i for i in range(4) if (ring[i] in inside) != (ring[(i + 1) % 4] in inside)]
        if len(crossed) == 2:
            segments.append((edges[crossed[0]], edges[crossed[1]]))
        elif len(crossed) == 4:
            segments += [(edges[i - 1], edges[i]) for i in range(4) if ring[i] in separate]
    neighbours: dict = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    polygons, seen = [], set()
    for start in neighbours:  # every crossed edge has exactly two segment neighbours: the segments form loops
        if start in seen:
            continue
        loop, previous = [start], None
        seen.add(start)
        while step := [e for e in neighbours[loop[-1]] if e != previous and e not in seen]:
            previous = loop[-1]
            loop.append(step[0])
            seen.add(step[0])
        polygons.append([np.mean(np.array(sorted(edge), float), axis=0) for edge in loop])
    return polygons


@functools.cache
def _triangulations(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """All triangulations of a polygon with vertices 0..n-1 (Catalan many; n <= 6 here)."""

    def split(i, j):
        if j - i < 2:
            return [()]
        return [left + right + ((i, k, j),) for k in range(i + 1, j) for left in split(i, k) for right in split(k, j)]

    return tuple(split(0, n - 1))


@functools.cache
def _triangle_normals() -> np.ndarray:
    """Half cross products (area vectors) of the surfel triangles per code, unit voxel: float64 [256, t, 3].

    Non-planar polygons (pentagons and hexagons) are split by their largest-area triangulation at unit spacing,
    which reproduces the classic marching-cubes table that ``surface_distance`` uses (cross-checked in the tests).
    """
    per_code = []
    for code in range(256):
        inside = frozenset(c for i, c in enumerate(_CORNERS) if code >> (4 * c[0] + 2 * c[1] + c[2]) & 1)
        normals = []
        for poly in _polygons(inside):
            best, best_area = None, -1.0
            for tris in _triangulations(len(poly)):
                n = [0.5 * np.cross(poly[j] - poly[i], poly[k] - poly[i]) for i, j, k in tris]
                area = float(sum(np.linalg.norm(x) for x in n))
                if area > best_area + 1e-12:
                    best, best_area = n, area
            normals += best
        per_code.append(normals)
    out = np.zeros((256, max(len(n) for n in per_code), 3))
    for code, normals in enumerate(per_code):
        if normals:
            out[code, : len(normals)] = normals
    return out


def surfel_area_table(spacing_mm: Sequence[float]) -> Float[np.ndarray, "256"]:
    """Surface area in mm² of the marching-cubes surfel of each 2x2x2 neighbourhood code at this spacing.

    Code bit ``4a + 2b + c`` is the voxel at offset ``(a, b, c)`` along array axes 0, 1, 2. An area vector scales
    with the spacing as ``(n0·s1·s2, n1·s0·s2, n2·s0·s1)``.
    """
    s0, s1, s2 = (float(s) for s in spacing_mm)
    return np.linalg.norm(_triangle_normals() * np.array([s1 * s2, s0 * s2, s0 * s1]), axis=-1).sum(-1)


@dataclasses.dataclass(frozen=True)
class SurfaceDistances:
    """Surfels of both masks: distance (mm) of each to the other surface and its area (mm²); unsorted.

    An empty mask has no surfels; the other mask's distances are then +inf.
    """

    gt_to_pred: np.ndarray
    gt_areas: np.ndarray
    pred_to_gt: np.ndarray
    pred_areas: np.ndarray

    def surface_dice(self, tolerance_mm: float = 1.0) -> float:
        """Normalised surface Dice: surfel area within ``tolerance_mm`` (inclusive) of the other surface, over both."""
        total = self.gt_areas.sum() + self.pred_areas.sum()
        if total == 0:
            return float("nan")
        within = self.gt_areas[self.gt_to_pred <= tolerance_mm].sum()
        within += self.pred_areas[self.pred_to_gt <= tolerance_mm].sum()
        return float(within / total)


def surface_distances(
    pred: Shaped[np.ndarray, "h w d"], gt: Shaped[np.ndarray, "h w d"], spacing_mm: Sequence[float]
) -> SurfaceDistances:
    """Surfels of ``pred`` and ``gt`` with their areas and their distances to the other surface.

    Both masks are cropped to the bounding box of their union and padded by one voxel, so that every 2x2x2
    neighbourhood touching a mask is seen. A neighbourhood whose code is neither all-outside nor all-inside is a
    surfel; its distance to the other surface is the Euclidean distance (mm, true spacing) from its position to
    the nearest surfel position of the other mask.

    Args:
      pred: predicted mask (nonzero = inside).
      gt: ground-truth mask, same shape.
      spacing_mm: voxel size along array axes 0, 1, 2 (e.g. the NIfTI header zooms, in array order).
    """
    pred, gt = _as_masks(pred, gt, ndim=3)
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    union = pred | gt
    if not union.any():
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    lo = [int(np.flatnonzero(union.any(axis=tuple(k for k in range(3) if k != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(union.any(axis=tuple(k for k in range(3) if k != a)))[-1]) + 1 for a in range(3)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    table = surfel_area_table(spacing)

    def surfels(mask):
        m = np.pad(mask[box], 1).astype(np.uint8)
        n0, n1, n2 = (s - 1 for s in m.shape)
        code = np.zeros((n0, n1, n2), np.uint8)
        for a, b, c in _CORNERS:
            code |= m[a : a + n0, b : b + n1, c : c + n2] << np.uint8(4 * a + 2 * b + c)
        return (code != 0) & (code != 255), code

    border_gt, code_gt = surfels(gt)
    border_pred, code_pred = surfels(pred)

    def distance_to(border):
        if not border.any():
            return np.full(border.shape, np.inf)
        return ndimage.distance_transform_edt(~border, sampling=spacing)

    return SurfaceDistances(
        gt_to_pred=distance_to(border_pred)[border_gt],
        gt_areas=table[code_gt[border_gt]],
        pred_to_gt=distance_to(border_gt)[border_pred],
        pred_areas=table[code_pred[border_pred]],
    )


def normalized_surface_dice(
    pred: Shaped[np.ndarray, "h w d"],
    gt: Shaped[np.ndarray, "h w d"],
    spacing_mm: Sequence[float],
    tolerance_mm: float = 1.0,
) -> float:
    """Normalised surface Dice (NSD) at ``tolerance_mm`` with the true spacing, as ``surface_distance`` defines it.

    ``NSD = (area of gt surface within tolerance of pred + area of pred surface within tolerance of gt)
    / (gt surface area + pred surface area)``, distances inclusive (``<=``). Upstream reports it at 1.0 mm with
    the spacing of the ground-truth header. NaN when both masks are empty; 0 when exactly one is empty.
    """
    return surface_distances(pred, gt, spacing_mm).surface_dice(tolerance_mm)


def _mean_std(values: np.ndarray) -> dict[str, float | int]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:  # no warning for an all-NaN slice: the summary says NaN and n = 0
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "n_nan": int(values.size)}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "n": int(finite.size),
        "n_nan": int(values.size - finite.size),
    }


def summarize(per_target: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """Dataset summary of one metric, as upstream's ``compute_dataset_metrics``.

    Args:
      per_target: for each target (class) name, the metric of every case (NaN where both masks were empty).

    Returns:
      ``{"per_target": {name: stats}, "overall": stats}`` where ``stats = {"mean", "std", "n", "n_nan"}``.
      Per target: NaN-skipping mean and population std (ddof 0, numpy's ``nanmean``/``nanstd``) over cases.
      Overall: mean and std of all non-NaN (case, target) values pooled, not a mean of the per-target means.
      ``n`` counts the values used, ``n_nan`` the skipped ones; a target with no finite value has NaN mean/std.
    """
    columns = {name: np.asarray(list(values), np.float64).reshape(-1) for name, values in per_target.items()}
    pooled = np.concatenate(list(columns.values())) if columns else np.zeros(0)
    return {"per_target": {name: _mean_std(v) for name, v in columns.items()}, "overall": _mean_std(pooled)}


def dice_auc(
    n_clicks: Sequence[int], scores: Float[np.ndarray, "*batch k"] | Sequence[float]
) -> float | Float[np.ndarray, "*batch"]:
    """Area under the score-vs-clicks curve (e.g. Dice after 1, 3, 5, 10 clicks), normalised to [0, 1].

    Trapezoid rule over the click counts rescaled to ``x = (c - c_first) / (c_last - c_first)`` in [0, 1], so
    the result is the mean score over the click range: a constant score s gives s, and a score in [0, 1] gives
    a value in [0, 1]. With a single click count it is that score. NaN if any score of the curve is NaN.

    Args:
      n_clicks: strictly increasing click counts, one per score column.
      scores: scores with the click axis last (one curve, or a batch of curves).

    Returns:
      A float for one curve, else an array over the batch axes.
    """
    clicks = np.asarray(n_clicks, np.float64)
    values = np.asarray(scores, np.float64)
    if clicks.ndim != 1 or clicks.size == 0 or np.any(np.diff(clicks) <= 0):
        raise ValueError(f"n_clicks must be a non-empty strictly increasing sequence, got {list(n_clicks)!r}")
    if values.shape[-1:] != clicks.shape:
        raise ValueError(f"scores must have {clicks.size} values on their last axis, got shape {values.shape}")
    if clicks.size == 1:
        area = values[..., 0]
    else:
        x = (clicks - clicks[0]) / (clicks[-1] - clicks[0])
        area = np.sum(np.diff(x) * (values[..., 1:] + values[..., :-1]) / 2.0, axis=-1)
    return float(area) if area.ndim == 0 else area
