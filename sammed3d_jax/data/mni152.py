"""A real-image dataset without downloads: the MNI152 T1 template that nilearn ships, with three tissue targets.

Owns ``make_mni152_dataset`` and ``python -m sammed3d_jax.data.mni152 OUT``. Needs the optional ``[data]`` extra
(nilearn); imports nilearn lazily so the rest of the package works without it. Never imports jax, flax or the model.

nilearn's package data hold the MNI152 2009a (symmetric) T1 template (brain-extracted, intensities in [0, 1]),
its grey- and white-matter probability maps and a brain mask; ``load_mni152_*`` read these files and download
nothing. nilearn's binary ``load_mni152_gm_mask`` / ``load_mni152_wm_mask`` are these probability maps thresholded
at 0.2 and morphologically closed, so they overlap heavily (about 40 % of the grey-matter mask is also
white-matter mask) and make poor evaluation targets. We therefore resolve the overlap the standard way and write
ONE label map of three disjoint tissue classes (nnU-Net layout, one case ``mni152``):

- 1 ``grey_matter``, 2 ``white_matter``, 3 ``csf``: inside ``load_mni152_brain_mask``, each voxel takes the class of
  highest probability among grey matter p_gm, white matter p_wm and the remainder ``max(0, 1 - p_gm - p_wm)``
  (cerebrospinal fluid and other non-GM/WM tissue of the brain mask); outside the brain mask, 0.

Each class is contiguous-ish, clearly separated in T1 intensity (mean 0.65, 0.84, 0.39 on the template) and large
(about 1.09e6, 0.64e6 and 0.16e6 mm^3 at 1 mm), so per-class Dice is meaningful. The template is in RAS at 1 mm
(``--resolution 2`` gives nilearn's 2 mm version); the brain fits a 128^3 crop at 1.5 mm.
"""

import argparse
import json
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from sammed3d_jax import cli

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2, "csf": 3}
CASE = "mni152"


def _nilearn_datasets():
    try:
        from nilearn import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(
            "sammed3d_jax.data.mni152 needs nilearn (it ships the MNI152 template). Install the optional extra: "
            'pip install -e ".[data]"'
        ) from err
    return datasets


def tissue_labels(
    gm_prob: np.ndarray, wm_prob: np.ndarray, brain_mask: np.ndarray
) -> np.ndarray:
    """Maximum-probability tissue label map inside the brain mask (1 grey, 2 white, 3 csf/other, 0 outside).

    Args:
        gm_prob: grey-matter probability in [0, 1], [h, w, d].
        wm_prob: white-matter probability in [0, 1], same shape.
        brain_mask: brain mask (nonzero = brain), same shape.

    Returns:
        uint8 label map; ties go to the lower label (grey before white before csf).
    """
    if not gm_prob.shape == wm_prob.shape == brain_mask.shape:
        raise ValueError(f"shape mismatch: gm {gm_prob.shape}, wm {wm_prob.shape}, brain {brain_mask.shape}")
    rest = np.clip(1.0 - gm_prob - wm_prob, 0.0, 1.0)
    # Elementwise argmax (ties to the lower label); np.argmax over a stacked axis is several times slower here.
    labels = np.where((gm_prob >= wm_prob) & (gm_prob >= rest), 1, np.where(wm_prob >= rest, 2, 3)).astype(np.uint8)
    labels[brain_mask == 0] = 0
    return labels


def make_mni152_dataset(out: str | pathlib.Path, resolution: int = 1) -> pathlib.Path:
    """Writes the MNI152 T1 template and its tissue label map as a one-case nnU-Net dataset.

    Args:
        out: dataset folder to create.
        resolution: 1 or 2 (mm), the template resolutions nilearn ships.

    Returns:
        The dataset folder.
    """
    if resolution not in (1, 2):
        raise ValueError(f"--resolution must be 1 or 2 (mm), got {resolution}")
    datasets = _nilearn_datasets()
    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    brain = datasets.load_mni152_brain_mask(resolution=resolution)
    for name, img in (("grey-matter template", gm), ("white-matter template", wm), ("brain mask", brain)):
        if img.shape != t1.shape or not np.allclose(img.affine, t1.affine):
            raise ValueError(f"nilearn's MNI152 {name} does not share the T1 template's grid")
    labels = tissue_labels(
        np.asarray(gm.get_fdata(), np.float32), np.asarray(wm.get_fdata(), np.float32), np.asarray(brain.dataobj)
    )
    image = np.asarray(t1.get_fdata(), np.float32)

    out = pathlib.Path(out)
    for folder, name, array in (("imagesTr", f"{CASE}_0000.nii.gz", image), ("labelsTr", f"{CASE}.nii.gz", labels)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(array, t1.affine)
        img.set_qform(t1.affine, code=4)  # MNI152 space
        img.set_sform(t1.affine, code=4)
        img.header.set_xyzt_units("mm")
        tmp = out / folder / (name + ".tmp.nii.gz")
        nib.save(img, tmp)
        tmp.replace(out / folder / name)
    counts = {name: int((labels == value).sum()) for name, value in LABELS.items() if value}
    meta = {
        "name": "MNI152",
        "description": "nilearn's MNI152 2009a T1 template; labels = maximum-probability tissue class inside the "
        "brain mask (see sammed3d_jax/data/mni152.py).",
        "channel_names": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "resolution_mm": resolution,
        "voxel_counts": counts,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


@cli.guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.data.mni152", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output dataset folder (must not exist yet, or be empty)")
    parser.add_argument("--resolution", type=int, default=1, choices=(1, 2), help="template resolution in mm")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing dataset folder")
    args = parser.parse_args(argv)
    cli.check_output_path(args.out, overwrite=args.overwrite, name="OUT", is_dir=True)
    try:
        out = make_mni152_dataset(args.out, resolution=args.resolution)
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None
    meta = json.loads((out / "dataset.json").read_text())
    print(f"wrote {out} (1 case, {meta['resolution_mm']} mm): voxel counts {meta['voxel_counts']}")


if __name__ == "__main__":
    main()
