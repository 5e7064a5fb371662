"""Challenge cases from an nnU-Net/MSD or upstream-layout dataset (``make-cases DATASET OUT``).

Per case (all targets of one (dataset, case) pair; see ``data/manifest.py`` for the layouts):

1. The image and its label map(s) are reoriented to LPS (nibabel's closest-axes reorientation, no interpolation) and
   stored in SimpleITK's array order ``(z, y, x)`` -- what the challenge's files hold for scans in the DICOM/ITK
   convention and what ``predict``/``evaluate`` assume by default -- with ``spacing`` in SimpleITK's ``(x, y, z)``
   order.
2. Intensities become uint8 0-255: clipped to a window and scaled linearly. The window is ``--window LO,HI`` when
   given (e.g. a CT soft-tissue window), else the 0.5-99.5 percentiles of the image's voxels (CT) or of its voxels
   above 0 (other modalities, so a zero background stays 0).
3. The targets present become classes 1..K (ascending label value; in the upstream layout, ascending target name),
   ``gts`` uint8; a target with no voxel is left out. Where targets of the upstream layout overlap, the later wins.
4. ``boxes``: one per class by the challenge's rule (``boxes.challenge_box``), seeded by ``--seed``, the case name and
   the class, so a rerun writes the same boxes.

``OUT/cases.json`` maps each case's classes back to the dataset's targets and label values. One unreadable case is
reported and skipped; the others are written. Imports the data/ readers and the cvpr25 modules; no jax.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
from etils import epath

from sammed3d_jax.cvpr25 import boxes as box_lib
from sammed3d_jax.cvpr25.safe_npz import object_array, write_npz
from sammed3d_jax.data.manifest import Record, load_records
from sammed3d_jax.data.nifti import Geometry, read_image, read_label

PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class MadeCase:
    """A written case: its file name and what each class is (target name, label value, label file)."""

    name: str
    shape_zyx: tuple[int, int, int]
    classes: list[dict]


def to_lps_zyx(array: np.ndarray, geom: Geometry) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` (nibabel voxel order) reoriented to LPS and transposed to ``(z, y, x)``; spacing in ``(x, y, z)``."""
    current = nib.orientations.io_orientation(geom.affine)
    ornt = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(("L", "P", "S")))
    lps = nib.orientations.apply_orientation(array, ornt)
    affine = geom.affine @ nib.orientations.inv_ornt_aff(ornt, geom.shape)
    spacing = tuple(float(s) for s in np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0)))
    return np.ascontiguousarray(lps.transpose(2, 1, 0)), spacing


def scale_to_uint8(image: np.ndarray, modality: str, window: Sequence[float | int] | None = None) -> np.ndarray:
    """Clips to ``window`` (or the module's percentile rule) and scales linearly to uint8 0-255 (rounded).

    Raises:
        ValueError: the window is empty (e.g. a constant image).
    """
    image = np.asarray(image, np.float64)
    if window is not None:
        lo, hi = (float(w) for w in window)
    else:
        voxels = image if modality.lower() == "ct" else image[image > 0]
        if voxels.size == 0:
            raise ValueError("the image has no voxel above 0 to take an intensity window from")
        lo, hi = (float(v) for v in np.percentile(voxels, PERCENTILES))
    if not hi > lo:
        raise ValueError(f"intensity window {lo:g}..{hi:g} is empty (constant image?)")
    return np.round((np.clip(image, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _group(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.case), []).append(r)
    return groups


def make_case(records: Sequence[Record], name: str, out_dir: epath.Path, *, seed: int = 0,
              window: Sequence[float | int] | None = None) -> MadeCase:
    """Writes ``out_dir/<name>.npz`` from the records of one case (one image, its targets).

    Raises:
        DataFileError / ValueError: unreadable files, mismatched shapes, no non-empty target, empty window.
    """
    first = records[0]
    image, geom = read_image(first.image)
    one_file = len({r.label for r in records}) == 1
    ordered = sorted(records, key=lambda r: (r.label_value, r.target) if one_file else (r.target, r.label_value))
    gts = np.zeros(geom.shape, np.uint8)
    labels_cache: dict[str, np.ndarray] = {}
    classes = []
    for r in ordered:
        if r.label not in labels_cache:
            label, lgeom = read_label(r.label)
            if lgeom.shape != geom.shape:
                raise ValueError(f"{r.label}: label shape {lgeom.shape} differs from the image's {geom.shape}")
            labels_cache[r.label] = label
        mask = labels_cache[r.label] == r.label_value
        if not mask.any():
            continue
        if len(classes) == 255:
            raise ValueError(f"{first.image}: more than 255 targets do not fit uint8 class ids")
        classes.append({"class": len(classes) + 1, "target": r.target, "label_value": r.label_value,
                        "label": r.label})
        gts[mask] = len(classes)
    if not classes:
        raise ValueError(f"{first.image}: no target with any voxel")
    imgs_zyx, spacing_xyz = to_lps_zyx(scale_to_uint8(image, first.modality, window), geom)
    gts_zyx, _ = to_lps_zyx(gts, geom)
    boxes = [box_lib.challenge_box(gts_zyx == c["class"], box_lib.box_rng(seed, name, c["class"])).to_dict()
             for c in classes]
    write_npz(out_dir / f"{name}.npz", imgs=imgs_zyx, gts=gts_zyx, spacing=np.asarray(spacing_xyz, np.float64),
              boxes=object_array(boxes))
    return MadeCase(f"{name}.npz", tuple(int(s) for s in imgs_zyx.shape), classes)


def make_cases(dataset: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
               window: Sequence[float | int] | None = None, limit: int | None = None,
               on_case: Callable[[str, str | None], None] = lambda name, error: None
               ) -> tuple[list[MadeCase], list[dict]]:
    """Turns every case of ``dataset`` into ``out/<case>.npz`` (module docstring) and writes ``out/cases.json``.

    Args:
        dataset: dataset folder or manifest (``data.manifest.load_records``).
        out: output folder (created).
        seed: box seed.
        window: fixed intensity window ``(lo, hi)``, else percentiles.
        limit: at most this many cases (the first in name order).
        on_case: called with each case name and None, or the error message when the case failed.

    Returns:
        ``(written cases, failures {"case", "error"})``.
    """
    records, problems = load_records(dataset)
    groups = _group(records)
    if not groups:
        raise ValueError(f"{dataset}: no case with a target found" + (f" ({problems[0][0]}: {problems[0][1]})"
                                                                         if problems else ""))
    several = len({d for d, _ in groups}) > 1
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    made, failures = [], [{"case": f, "error": p} for f, p in problems]
    for (ds, case), recs in sorted(groups.items())[: limit if limit else None]:
        name = f"{ds}_{case}" if several else case
        try:
            made.append(make_case(recs, name, out_dir, seed=seed, window=window))
            on_case(name, None)
        except (ValueError, OSError) as err:
            failures.append({"case": name, "error": str(err)})
            on_case(name, str(err))
    meta = {"format": "sammed3d_jax.cvpr25.cases/v1", "dataset": os.fspath(dataset), "seed": seed,
            "window": None if window is None else [float(w) for w in window],
            "cases": {m.name: {"shape_zyx": list(m.shape_zyx), "classes": m.classes} for m in made},
            "failures": failures}
    (out_dir / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")
    return made, failures
