"""A challenge case: what its ``.npz`` holds, checked, and the prompts of each class in the order they were given.

File format (the challenge's, axis names as it uses them: ``z`` is array axis 0, ``y`` axis 1, ``x`` axis 2):

- ``imgs`` ``[D, H, W]`` intensities 0-255; ``spacing`` three numbers in mm; ``gts`` ``[D, H, W]`` class ids (optional:
  evaluation may read them from a separate folder);
- ``boxes``: one dict per class, ``z_min``, ``z_max`` (the class's extent along axis 0), ``z_mid`` (a slice) and a
  2-D box on that slice: ``z_mid_y_min``, ``z_mid_y_max`` (axis 1), ``z_mid_x_min``, ``z_mid_x_max`` (axis 2); all
  bounds are inclusive voxel indices;
- ``clicks``: one dict per class ``{"fg": [[i0, i1, i2], ...], "bg": [...]}`` (array indices);
- ``clicks_order``: per class the kinds in the order they were made, ``"fg"``, ``"bg"`` or ``None`` (a step without
  a click for that class); ``prev_pred``: the previous step's ``segs``.

Class ``k`` (1-based) of a case is the ``k``-th box / clicks dict; predictions label it ``k``.

Spacing order: the challenge's files carry SimpleITK's ``GetSpacing()``, which lists x first (axis 2), while ``imgs``
is in SimpleITK's array order (z, y, x). ``spacing_order="xyz"`` (default) reads it that way; ``"zyx"`` takes it in
array order. Scoring passes the stored spacing to NSD unchanged, as the official evaluation does.

Owns: ``Box``, ``ClassPrompts``, ``Case``, ``read_case``, ``case_arrays``. Imports ``safe_npz`` only; must not import
jax or the model.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from sammed3d_jax.cvpr25.safe_npz import NpzError, object_array, plain, read_npz

BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
SPACING_ORDERS = ("xyz", "zyx")
CLICK_KINDS = ("fg", "bg")


@dataclasses.dataclass(frozen=True)
class Box:
    """The challenge's box of one class: a 2-D box on slice ``z_mid`` plus the class's extent along axis 0.

    All bounds are inclusive voxel indices of the ``[D, H, W]`` array (z = axis 0, y = axis 1, x = axis 2).
    """

    z_min: int
    z_max: int
    z_mid: int
    z_mid_x_min: int
    z_mid_y_min: int
    z_mid_x_max: int
    z_mid_y_max: int

    def lo_hi(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``((z_min, y_min, x_min), (z_max, y_max, x_max))``: the 3-D box in array-axis order, inclusive."""
        return ((self.z_min, self.z_mid_y_min, self.z_mid_x_min), (self.z_max, self.z_mid_y_max, self.z_mid_x_max))

    def to_dict(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in BOX_KEYS}

    @classmethod
    def from_dict(cls, d: Any, shape: Sequence[int], where: str) -> "Box":
        """Checks a box dict (keys, whole numbers, min <= mid <= max, inside ``shape``) and builds the Box."""
        if not isinstance(d, dict) or set(BOX_KEYS) - set(d):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise NpzError(f"{where}: a box must be a dict with {list(BOX_KEYS)}, got {got}")
        values = {}
        for k in BOX_KEYS:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
                raise NpzError(f"{where}: box {k} must be a whole number, got {v!r}")
            values[k] = int(v)
        box = cls(**values)
        (lo, hi), axes = box.lo_hi(), ("z", "y", "x")
        for a in range(3):
            if not 0 <= lo[a] <= hi[a] < shape[a]:
                raise NpzError(f"{where}: box {axes[a]} range {lo[a]}..{hi[a]} is empty or outside the image "
                               f"(size {shape[a]})")
        if not box.z_min <= box.z_mid <= box.z_max:
            raise NpzError(f"{where}: box z_mid {box.z_mid} lies outside z_min..z_max {box.z_min}..{box.z_max}")
        return box


@dataclasses.dataclass(frozen=True)
class ClassPrompts:
    """Everything one class was prompted with, in order.

    Attributes:
        box: the class's box, or None (a case without boxes).
        clicks: ``((i0, i1, i2), positive)`` per click, in the order they were made (array indices of ``imgs``).
    """

    box: Box | None = None
    clicks: tuple[tuple[tuple[int, int, int], bool], ...] = ()


@dataclasses.dataclass(frozen=True)
class Case:
    """One checked case file.

    Attributes:
        name: the file name (``<case>.npz``), as the challenge's CSV names cases.
        imgs: ``[D, H, W]`` intensities.
        spacing: the stored spacing, three positive floats, in the file's order (see module docstring).
        gts: ``[D, H, W]`` integer class map, or None.
        boxes: one Box per class, or None.
        clicks: per class ``{"fg": [[i0, i1, i2], ...], "bg": [...]}``, or None.
        clicks_order: per class the list of ``"fg"``/``"bg"``/None, or None.
        prev_pred: ``[D, H, W]`` previous prediction, or None.
    """

    name: str
    imgs: np.ndarray
    spacing: tuple[float, float, float]
    gts: np.ndarray | None = None
    boxes: tuple[Box, ...] | None = None
    clicks: tuple[dict, ...] | None = None
    clicks_order: tuple[list, ...] | None = None
    prev_pred: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        """Classes prompted in the file (boxes, else clicks), 0 when it holds no prompt."""
        if self.boxes is not None:
            return len(self.boxes)
        return len(self.clicks) if self.clicks is not None else 0

    def spacing_zyx(self, spacing_order: str = "xyz") -> tuple[float, float, float]:
        """The voxel size along array axes 0, 1, 2 (z, y, x), reading the stored spacing in ``spacing_order``."""
        if spacing_order not in SPACING_ORDERS:
            raise ValueError(f"spacing order must be one of {SPACING_ORDERS}, got {spacing_order!r}")
        s = self.spacing
        return (s[2], s[1], s[0]) if spacing_order == "xyz" else s

    def prompts(self) -> list[ClassPrompts]:
        """The box and the ordered clicks of each class (class k of the case is entry k - 1)."""
        out = []
        for k in range(self.num_classes):
            box = self.boxes[k] if self.boxes is not None else None
            clicks = []
            if self.clicks is not None:
                taken = {"fg": 0, "bg": 0}
                order = self.clicks_order[k] if self.clicks_order is not None else None
                kinds = order if order is not None else (["fg"] * len(self.clicks[k]["fg"]) +
                                                         ["bg"] * len(self.clicks[k]["bg"]))
                for kind in kinds:
                    if kind is None:
                        continue
                    coord = self.clicks[k][kind][taken[kind]]
                    taken[kind] += 1
                    clicks.append((tuple(int(c) for c in coord), kind == "fg"))
            out.append(ClassPrompts(box, tuple(clicks)))
        return out


def _volume(data: dict, key: str, where: str, shape=None, integer: bool = False) -> np.ndarray | None:
    if key not in data:
        return None
    a = data[key]
    if not isinstance(a, np.ndarray) or a.ndim != 3 or a.dtype.kind not in ("biu" if integer else "biuf"):
        kind = "an integer" if integer else "a numeric"
        desc = f"shape {a.shape} dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise NpzError(f"{where}: '{key}' must be {kind} 3-D array, got {desc}")
    if shape is not None and a.shape != shape:
        raise NpzError(f"{where}: '{key}' has shape {a.shape}, the image {shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise NpzError(f"{where}: '{key}' holds NaN or infinite values")
    return a


def _clicks(value: Any, shape, n: int | None, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise NpzError(f"{where}: 'clicks' must be a list of {n if n is not None else 'per-class'} dicts")
    out = []
    for k, d in enumerate(value, 1):
        if not isinstance(d, dict) or not set(CLICK_KINDS) <= set(d):
            raise NpzError(f"{where}: clicks of class {k} must be a dict with 'fg' and 'bg' lists")
        entry = {}
        for kind in CLICK_KINDS:
            coords = d[kind] if d[kind] is not None else []
            if not isinstance(coords, list):
                raise NpzError(f"{where}: clicks[{k - 1}][{kind!r}] must be a list of [i0, i1, i2]")
            checked = []
            for c in coords:
                ok = isinstance(c, list) and len(c) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in c)
                if not ok or not all(0 <= int(v) < s for v, s in zip(c, shape, strict=True)):
                    raise NpzError(f"{where}: class {k} {kind} click {c!r} is not three voxel indices inside the "
                                   f"image {tuple(shape)}")
                checked.append([int(v) for v in c])
            entry[kind] = checked
        out.append(entry)
    return tuple(out)


def _clicks_order(value: Any, clicks: tuple[dict, ...], where: str) -> tuple[list, ...]:
    if not isinstance(value, list) or len(value) != len(clicks):
        raise NpzError(f"{where}: 'clicks_order' must hold one list per class ({len(clicks)})")
    out = []
    for k, (order, d) in enumerate(zip(value, clicks, strict=True), 1):
        order = order if isinstance(order, list) else [order]
        if any(kind not in (*CLICK_KINDS, None) for kind in order):
            raise NpzError(f"{where}: clicks_order of class {k} may hold only 'fg', 'bg' and None, got {order!r}")
        for kind in CLICK_KINDS:
            if order.count(kind) != len(d[kind]):
                raise NpzError(f"{where}: clicks_order of class {k} names {order.count(kind)} {kind} clicks, "
                               f"'clicks' holds {len(d[kind])}")
        out.append(list(order))
    return tuple(out)


def read_case(path: str | os.PathLike, gts_path: str | os.PathLike | None = None) -> Case:
    """Reads and checks a case file (prompts restricted to plain data, see ``safe_npz``).

    Args:
        path: the case ``.npz``.
        gts_path: a separate ``.npz`` whose ``gts`` replaces the case's own (the challenge's validation layout).

    Raises:
        NpzError: naming the file and the offending key when something is missing, malformed or inconsistent.
    """
    p = epath.Path(path)
    data = read_npz(p)
    where = os.fspath(p)
    for key in ("boxes", "clicks", "clicks_order"):  # equal-length string lists come back as numpy str arrays
        if isinstance(data.get(key), np.ndarray):
            data[key] = plain(data[key], f"{where} ({key})")
    imgs = _volume(data, "imgs", where)
    if imgs is None:
        raise NpzError(f"{where}: no 'imgs' array")
    spacing = np.asarray(data.get("spacing", []), dtype=np.float64).reshape(-1) if "spacing" in data else None
    if spacing is None or spacing.size != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise NpzError(f"{where}: 'spacing' must be three positive numbers, got "
                       f"{None if spacing is None else spacing.tolist()}")
    if gts_path is not None:
        gdata = read_npz(gts_path)
        if "gts" not in gdata:
            raise NpzError(f"{os.fspath(gts_path)}: no 'gts' array")
        gts = _volume(gdata, "gts", os.fspath(gts_path), imgs.shape, integer=True)
    else:
        gts = _volume(data, "gts", where, imgs.shape, integer=True)
    boxes = None
    if "boxes" in data:
        raw = data["boxes"]
        raw = raw if isinstance(raw, list) else [raw]
        boxes = tuple(Box.from_dict(b, imgs.shape, f"{where} (box of class {k})") for k, b in enumerate(raw, 1))
    clicks = order = None
    if "clicks" in data:
        clicks = _clicks(data["clicks"], imgs.shape, None if boxes is None else len(boxes), where)
        if "clicks_order" in data:
            order = _clicks_order(data["clicks_order"], clicks, where)
    prev = _volume(data, "prev_pred", where, imgs.shape, integer=True)
    return Case(p.name, imgs, tuple(float(s) for s in spacing), gts, boxes, clicks, order, prev)


def case_arrays(case: Case, *, with_gts: bool = False) -> dict[str, Any]:
    """The members to write for ``case`` in the challenge's format (prompts as object arrays of plain data)."""
    out: dict[str, Any] = {"imgs": case.imgs, "spacing": np.asarray(case.spacing, np.float64)}
    if with_gts and case.gts is not None:
        out["gts"] = case.gts
    if case.boxes is not None:
        out["boxes"] = object_array([b.to_dict() for b in case.boxes])
    if case.clicks is not None:
        out["clicks"] = object_array([{k: [list(c) for c in d[k]] for k in CLICK_KINDS} for d in case.clicks])
    if case.clicks_order is not None:
        out["clicks_order"] = object_array([list(o) for o in case.clicks_order])
    if case.prev_pred is not None:
        out["prev_pred"] = case.prev_pred
    return out
