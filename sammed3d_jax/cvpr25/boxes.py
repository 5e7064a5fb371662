"""The challenge's box rule (a box per class from a ground-truth mask) and how a challenge case maps to our axes.

Box rule (how the challenge makes its boxes, restated): the class's occupied slices along axis 0 give ``z_min`` and
``z_max`` (not perturbed); ``z_mid`` is the middle occupied slice (the ``n // 2``-th of the sorted occupied slice
indices); on that slice the tight 2-D box of the mask is widened on every side by ``int(shift * n / 256)`` voxels,
where ``shift`` is one draw of ``randint(0, 6)`` (0..5) per class and ``n`` the image size along that axis (H for y,
W for x), then clipped to the image. Our draw comes from ``np.random.default_rng([seed, crc32(case), class])``,
so a case's boxes depend only on the seed, its name and the class.

Axes: challenge arrays are SimpleITK's ``(z, y, x)``; ours are nibabel's voxel axes ``(i, j, k) = (x, y, z)``, so
a challenge volume enters our code transposed by ``(2, 1, 0)`` and a challenge index ``(z, y, x)`` becomes
``(x, y, z)``. A 3-D box ``(d0min, d1min, d2min, d0max, d1max, d2max)`` in our order is therefore
``(x_min, y_min, z_min, x_max, y_max, z_max)`` of the challenge box. The files keep no orientation; we read them as
SimpleITK's identity direction (LPS: axis x points left, y posterior, z superior; ``orientation="LPS"``, the usual
storage of scans converted from DICOM and what ``make-cases`` writes) or as RAS (``orientation="RAS"``).

Owns: ``challenge_box``, ``case_geometry``, ``to_our_axes``/``from_our_axes``, ``zyx_to_grid``, ``box_to_grid``.
Imports numpy, ``data.nifti.Geometry`` and ``cases``; must not import jax or the model.
"""

import itertools
import zlib
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float, Real, Shaped

from sammed3d_jax.cvpr25.cases import Box
from sammed3d_jax.data.nifti import Geometry

ORIENTATIONS = ("LPS", "RAS")


def box_rng(seed: int, case: str, class_index: int) -> np.random.Generator:
    """The generator of one class's box shift: depends only on (seed, case name, class index)."""
    return np.random.default_rng([int(seed), zlib.crc32(case.encode("utf-8")), int(class_index)])


def challenge_box(mask: Bool[np.ndarray, "z y x"], rng: np.random.Generator) -> Box:
    """The challenge's box of one class mask ``[D, H, W]`` (module docstring), with one shift drawn from ``rng``.

    Raises:
        ValueError: the mask is empty.
    """
    mask = np.asarray(mask, bool)
    occupied = np.flatnonzero(mask.any(axis=(1, 2)))
    if occupied.size == 0:
        raise ValueError("cannot make a box for an empty class mask")
    z_mid = int(occupied[occupied.size // 2])
    ys, xs = np.nonzero(mask[z_mid])
    shift = int(rng.integers(0, 6))
    h, w = mask.shape[1:]
    dy, dx = int(shift * h / 256), int(shift * w / 256)
    return Box(z_min=int(occupied[0]), z_max=int(occupied[-1]), z_mid=z_mid,
               z_mid_x_min=max(0, int(xs.min()) - dx), z_mid_y_min=max(0, int(ys.min()) - dy),
               z_mid_x_max=min(w - 1, int(xs.max()) + dx), z_mid_y_max=min(h - 1, int(ys.max()) + dy))


def to_our_axes(volume: Shaped[np.ndarray, "z y x"]) -> Shaped[np.ndarray, "x y z"]:
    """A challenge volume ``(z, y, x)`` in our axis order ``(x, y, z)`` (a transposed view)."""
    return np.asarray(volume).transpose(2, 1, 0)


def from_our_axes(volume: Shaped[np.ndarray, "x y z"]) -> Shaped[np.ndarray, "z y x"]:
    """Inverse of ``to_our_axes`` (a C-contiguous copy)."""
    return np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0))


def case_geometry(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], orientation: str = "LPS") -> Geometry:
    """Geometry of a challenge volume in our axis order: voxel ``(x, y, z)`` -> world mm (RAS+), origin at voxel 0.

    Args:
        shape_zyx: the challenge array's shape ``(D, H, W)``.
        spacing_zyx: voxel size along the challenge axes (z, y, x) in mm (see ``Case.spacing_zyx``).
        orientation: "LPS" (SimpleITK identity direction) or "RAS".
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    sz, sy, sx = (float(s) for s in spacing_zyx)
    signs = (-1.0, -1.0, 1.0) if orientation == "LPS" else (1.0, 1.0, 1.0)
    affine = np.diag([signs[0] * sx, signs[1] * sy, signs[2] * sz, 1.0])
    return Geometry(affine, tuple(int(s) for s in shape_zyx)[::-1])


def zyx_to_grid(points_zyx: Real[np.ndarray, "n 3"], geom: Geometry, grid: Geometry) -> Float[np.ndarray, "n 3"]:
    """Challenge indices ``(z, y, x)`` of a volume on ``geom`` (``case_geometry``) -> float indices of ``grid``."""
    pts = np.asarray(points_zyx, np.float64).reshape(-1, 3)[:, ::-1]
    world = np.c_[pts, np.ones(len(pts))] @ geom.affine.T
    return (world @ np.linalg.inv(grid.affine).T)[:, :3]


def box_to_grid(box: Box, geom: Geometry, grid: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The box's voxel-centre corners mapped to ``grid``: ``(lo [3], hi [3])`` float indices, our axis order.

    All eight corners are mapped and the per-axis minimum and maximum kept, so flips (LPS -> RAS) and any axis
    permutation of ``grid`` are handled.
    """
    lo, hi = box.lo_hi()
    corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), np.float64)
    mapped = zyx_to_grid(corners, geom, grid)
    return mapped.min(axis=0), mapped.max(axis=0)
