"""Synthetic 3-D segmentation datasets in the nnU-Net layout, made from a seed (no downloads).

Owns ``make_synthetic_dataset`` and the ``python -m sammed3d_jax.data.synthetic OUT --cases N`` command. Numpy,
scipy, nibabel and the shared ``cli`` helpers only: never imports jax, flax, grain or the model.

Each case is one image ``imagesTr/<case>_0000.nii.gz`` (float32) and one label map ``labelsTr/<case>.nii.gz``
(uint8) with three disjoint structures, defined in world (scanner, mm) coordinates so that they survive any
orientation:

- 1 ``ellipsoid``: a randomly rotated ellipsoid, bright, mildly textured;
- 2 ``tube``: a tube of constant radius along a random curved (quadratic Bezier) centre line, very bright;
- 3 ``blob``: an irregular blob (thresholded smoothed noise inside a spherical envelope, largest connected
  component), dark and strongly textured.

They sit inside an ellipsoidal "body" of textured soft tissue; air outside the body is exactly 0, as in
skull-stripped or background-masked images, so upstream's z-normalisation over ``x > 0`` measures the body only.
The image gets a little partial-volume blur, a smooth multiplicative bias field and Gaussian noise.

Geometry varies per case (``case_index % 4``): 0 axis-aligned RAS, 1 axis-aligned LPS (the DICOM/ITK convention),
2 a random axis permutation with flips (e.g. a sagittal acquisition), 3 the same plus an oblique rotation of 8-20
degrees. Spacing is anisotropic (about 1.1-1.35 mm in-plane, 2.6-3.2 mm across the smallest array axis). Sizes
scale with the field of view; at the default shape every structure holds several thousand mm^3 (well over the
1000 voxels at 1.5 mm that upstream's training sampler needs) and spans at most ~80 mm, so it fits a 64^3 crop at
1.5 mm (96 mm) with room to spare.

Case ``i`` depends only on ``(seed, i)``, so a dataset of N cases is a prefix of one of N + 1 cases.
"""

import argparse
import json
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage, spatial

from sammed3d_jax import cli

LABELS = {"background": 0, "ellipsoid": 1, "tube": 2, "blob": 3}
DEFAULT_SHAPE = (96, 96, 40)
_ORIENTATION_KINDS = ("ras", "lps", "permuted", "oblique")


def _rotation(rng: np.random.Generator, max_degrees: float, min_degrees: float = 0.0) -> np.ndarray:
    """Rotation about a random axis (Rodrigues) by an angle drawn in [min_degrees, max_degrees]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(min_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _affine(rng: np.random.Generator, kind: str, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns (4x4 voxel->world affine, spacing_mm in array order) for one orientation kind."""
    thick_axis = int(np.argmin(shape))
    spacing = rng.uniform(1.1, 1.35, size=3)
    spacing[thick_axis] = rng.uniform(2.6, 3.2)
    if kind == "ras":
        direction = np.eye(3)
    elif kind == "lps":
        direction = np.diag([-1.0, -1.0, 1.0])
    else:
        # A signed permutation that is neither RAS nor LPS, so reorientation has real work to do.
        while True:
            direction = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)
            if not (np.allclose(direction, np.eye(3)) or np.allclose(direction, np.diag([-1.0, -1.0, 1.0]))):
                break
        if kind == "oblique":
            direction = _rotation(rng, 20.0, 8.0) @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    centre_world = rng.uniform(-20.0, 20.0, size=3)
    affine[:3, 3] = centre_world - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine, spacing


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed to a correlation length of ``sigma_mm``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_mm / spacing, mode="reflect")
    return (field - field.mean()) / max(field.std(), 1e-8)


def _unit_perpendicular(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(u) * u
    return v / np.linalg.norm(v)


def _structures(rng: np.random.Generator, points: np.ndarray, shape: Sequence[int], spacing: np.ndarray, h: float):
    """Label map of the three structures; ``points`` are world offsets from the volume centre, (n, 3) mm.

    The tube lies in the plane through the centre perpendicular to a random direction u; the ellipsoid and the
    blob sit on either side of that plane along +u / -u, beyond the tube radius, so the structures never overlap
    and each keeps its full volume. Every structure stays within 0.85 h of the centre (h = smallest half field of
    view), inside the body ellipsoid (0.95 h).
    """
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    d = _unit_perpendicular(rng, u)
    w = np.cross(u, d)
    labels = np.zeros(len(points), np.uint8)

    tube_radius = rng.uniform(0.12, 0.15) * h
    length = rng.uniform(0.95, 1.2) * h
    bulge = rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0.0, 1.0, 200)[:, None]
    p0, p1, p2 = -d * length / 2, w * bulge, d * length / 2
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    dist, _ = spatial.cKDTree(curve).query(points, distance_upper_bound=tube_radius)
    labels[np.isfinite(dist)] = LABELS["tube"]

    semi_axes = rng.uniform(0.2, 0.3, size=3) * h
    ell_centre = u * (semi_axes.max() + tube_radius + 0.06 * h)
    local = (points - ell_centre) @ _rotation(rng, 180.0)
    labels[np.sum((local / semi_axes) ** 2, axis=1) <= 1.0] = LABELS["ellipsoid"]

    envelope = rng.uniform(0.25, 0.32) * h
    blob_centre = -u * (envelope + tube_radius + 0.06 * h)
    radial = np.linalg.norm(points - blob_centre, axis=1) / envelope
    inside = radial < 1.0
    field = _smooth_noise(rng, shape, 0.12 * h, spacing).reshape(-1) + 2.0 * (1.0 - radial)
    threshold = np.quantile(field[inside], 1.0 - rng.uniform(0.45, 0.65))
    blob = (inside & (field > threshold)).reshape(shape)
    components, count = ndimage.label(blob)
    if count > 1:
        sizes = ndimage.sum_labels(blob, components, index=np.arange(1, count + 1))
        blob = components == (1 + int(np.argmax(sizes)))
    labels[blob.reshape(-1)] = LABELS["blob"]
    return labels.reshape(shape)


def make_case(seed: int, case_index: int, shape: Sequence[int] = DEFAULT_SHAPE):
    """Makes one synthetic case.

    Args:
        seed: dataset seed.
        case_index: index of the case; with ``seed`` it fixes everything (``np.random.default_rng([seed, i])``).
        shape: array shape (h, w, d); the smallest axis gets the thick slices.

    Returns:
        ``(image float32 [h,w,d], label uint8 [h,w,d], affine float64 (4, 4), orientation kind)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {shape}")
    rng = np.random.default_rng([seed, case_index])
    kind = _ORIENTATION_KINDS[case_index % len(_ORIENTATION_KINDS)]
    affine, spacing = _affine(rng, kind, shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    centred = grid.reshape(-1, 3) - (np.asarray(shape) - 1) / 2.0
    points = centred @ affine[:3, :3].T  # world offsets (mm) from the centre of the volume
    h = 0.5 * float(np.min(np.asarray(shape) * spacing))

    labels = _structures(rng, points, shape, spacing, h)
    body = (np.sum((centred / (0.95 * (np.asarray(shape) - 1) / 2.0)) ** 2, axis=1) <= 1.0).reshape(shape)

    tissue = rng.uniform(80.0, 100.0) * (1.0 + 0.06 * _smooth_noise(rng, shape, 6.0, spacing))
    image = np.where(body, tissue, 0.0)
    for name, mean, texture, corr_mm in (("ellipsoid", 150.0, 0.05, 4.0), ("tube", 220.0, 0.03, 8.0),
                                         ("blob", 50.0, 0.15, 2.5)):
        inside = labels == LABELS[name]
        level = rng.uniform(0.9, 1.1) * mean * (1.0 + texture * _smooth_noise(rng, shape, corr_mm, spacing))
        image[inside] = level[inside]
    # Partial-volume blur, then a smooth multiplicative bias field (low-order polynomial in world coordinates).
    image = ndimage.gaussian_filter(image, sigma=0.6)
    normalised = points / h
    bias_terms = np.concatenate([normalised, normalised**2, normalised[:, [0]] * normalised[:, [1]]], axis=1)
    bias = np.exp(bias_terms @ rng.normal(0.0, 0.08, size=bias_terms.shape[1])).reshape(shape)
    image = image * bias + rng.normal(0.0, 4.0, size=shape)
    image = np.where(body, np.maximum(image, 0.0), 0.0).astype(np.float32)
    return image, labels, affine, kind


def _write(path: pathlib.Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)  # scanner coordinates; the affine is orthonormal x spacing, so qform holds it
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, tmp)
    tmp.replace(path)


def make_synthetic_dataset(
    out: str | pathlib.Path, cases: int, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
    name: str = "synth",
) -> pathlib.Path:
    """Writes a synthetic dataset in the nnU-Net layout.

    Args:
        out: dataset folder to create (existing case files are overwritten).
        cases: number of cases (>= 1).
        seed: dataset seed; the output is a deterministic function of (seed, shape, case index).
        shape: array shape of every case.
        name: case name prefix; cases are ``<name>_000``, ``<name>_001``, ...

    Returns:
        The dataset folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
    """
    if cases < 1:
        raise ValueError(f"--cases must be >= 1, got {cases}")
    out = pathlib.Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    orientations = {}
    for i in range(cases):
        case = f"{name}_{i:03d}"
        image, labels, affine, kind = make_case(seed, i, shape)
        _write(out / "imagesTr" / f"{case}_0000.nii.gz", image, affine)
        _write(out / "labelsTr" / f"{case}.nii.gz", labels, affine)
        orientations[case] = "".join(nib.aff2axcodes(affine)) + (" oblique" if kind == "oblique" else "")
    meta = {
        "name": f"{name}_seed{seed}",
        "description": "Synthetic structures from sammed3d_jax.data.synthetic (deterministic for the seed).",
        "channel_names": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "generator": {"module": "sammed3d_jax.data.synthetic", "seed": seed, "shape": list(map(int, shape))},
        "orientations": orientations,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


@cli.guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output dataset folder (must not exist yet, or be empty)")
    parser.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("H", "W", "D"),
                        help=f"array shape per case (default {' '.join(map(str, DEFAULT_SHAPE))})")
    parser.add_argument("--name", default="synth", help="case name prefix (default synth)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing dataset folder")
    args = parser.parse_args(argv)
    if args.cases < 1:
        raise cli.UsageError(f"--cases must be >= 1, got {args.cases}")
    if min(args.shape) < 8:
        raise cli.UsageError(f"--shape must be three sizes >= 8, got {args.shape}")
    cli.check_output_path(args.out, overwrite=args.overwrite, name="OUT", is_dir=True)
    out = make_synthetic_dataset(args.out, args.cases, seed=args.seed, shape=args.shape, name=args.name)
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote {args.cases} case{'' if args.cases == 1 else 's'} to {out} (labels {meta['labels']})")
    for case, orientation in meta["orientations"].items():
        print(f"  {case}: {orientation}")


if __name__ == "__main__":
    main()
