"""Synthetic and MNI152 dataset generators: layout, determinism, geometry variety, target sizes."""

import json
import socket
import sys

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data import mni152, synthetic

TINY = (28, 24, 16)


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return synthetic.make_synthetic_dataset(tmp_path_factory.mktemp("synth"), cases=4, seed=3, shape=TINY)


def test_layout_and_contents(tiny_dataset):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "ellipsoid": 1, "tube": 2, "blob": 3}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (tiny_dataset / "imagesTr").iterdir()) == [f"synth_{i:03d}_0000.nii.gz" for i in range(4)]
    assert sorted(p.name for p in (tiny_dataset / "labelsTr").iterdir()) == [f"synth_{i:03d}.nii.gz" for i in range(4)]
    for i in range(4):
        image_img = nib.load(tiny_dataset / "imagesTr" / f"synth_{i:03d}_0000.nii.gz")
        label_img = nib.load(tiny_dataset / "labelsTr" / f"synth_{i:03d}.nii.gz")
        assert image_img.get_data_dtype() == np.float32 and label_img.get_data_dtype() == np.uint8
        assert image_img.shape == label_img.shape == TINY
        np.testing.assert_array_equal(image_img.affine, label_img.affine)
        image, labels = image_img.get_fdata(), np.asarray(label_img.dataobj)
        assert np.isfinite(image).all() and image.min() >= 0
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        # Intensity classes: tube brightest, then ellipsoid, then body tissue, blob darkest, air exactly 0.
        means = [image[labels == k].mean() for k in (2, 1)]
        body = image[(labels == 0) & (image > 0)].mean()
        assert means[0] > means[1] > body > image[labels == 3].mean() > 0
        assert (image == 0).any()


def test_orientations_vary(tiny_dataset):
    affines = [nib.load(tiny_dataset / "labelsTr" / f"synth_{i:03d}.nii.gz").affine for i in range(4)]
    codes = ["".join(nib.aff2axcodes(a)) for a in affines]
    assert codes[0] == "RAS" and codes[1] == "LPS" and codes[2] not in ("RAS", "LPS")
    directions = [a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0) for a in affines]
    assert all(np.allclose(np.abs(d), np.round(np.abs(d))) for d in directions[:3])  # axis-aligned
    assert not np.allclose(np.abs(directions[3]), np.round(np.abs(directions[3])), atol=0.05)  # oblique
    for a in affines:
        spacing = np.linalg.norm(a[:3, :3], axis=0)
        assert spacing[2] > 2.0 * spacing[:2].max()  # thick slices across the smallest axis (16)


def test_deterministic_for_seed_and_prefix_stable(tmp_path, tiny_dataset):
    again = synthetic.make_synthetic_dataset(tmp_path / "again", cases=2, seed=3, shape=TINY)
    for i in range(2):
        for rel in (f"imagesTr/synth_{i:03d}_0000.nii.gz", f"labelsTr/synth_{i:03d}.nii.gz"):
            a, aff_a = _load(tiny_dataset / rel)
            b, aff_b = _load(again / rel)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(aff_a, aff_b)
    other_image, other_labels, _, _ = synthetic.make_case(4, 0, TINY)
    image, labels, _, _ = synthetic.make_case(3, 0, TINY)
    assert not np.array_equal(labels, other_labels) and not np.allclose(image, other_image)


def test_default_shape_targets_fit_small_model_crops():
    """At the default shape every target has > 1000 voxels at 1.5 mm and spans < 64 voxels at 1.5 mm (96 mm)."""
    for case_index in (0, 3):  # axis-aligned RAS and oblique
        _, labels, affine, _ = synthetic.make_case(0, case_index)
        voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))
        for value in (1, 2, 3):
            ijk = np.argwhere(labels == value)
            assert len(ijk) * voxel_mm3 > 1000 * 1.5**3 * 1.3
            world = ijk @ affine[:3, :3].T
            assert np.all(world.max(0) - world.min(0) < 0.9 * 64 * 1.5)


def test_cli(tmp_path, capsys):
    synthetic.main([str(tmp_path / "cli"), "--cases", "1", "--seed", "5", "--shape", *map(str, TINY)])
    assert "wrote 1 case to" in capsys.readouterr().out
    # The files hold exactly the case the generator makes for these arguments (values, dtypes and affine).
    image, labels, affine, _ = synthetic.make_case(5, 0, TINY)
    for rel, want, dtype in (("imagesTr/synth_000_0000.nii.gz", image, np.float32),
                             ("labelsTr/synth_000.nii.gz", labels, np.uint8)):
        got, got_affine = _load(tmp_path / "cli" / rel)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got_affine, affine, atol=1e-5)
    with pytest.raises(ValueError, match="--cases"):
        synthetic.make_synthetic_dataset(tmp_path / "none", cases=0)


def test_mni152_three_tissue_targets_without_network(tmp_path, monkeypatch, dev_package):
    dev_package("nilearn")

    def no_network(*args, **kwargs):
        raise AssertionError("mni152 tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = mni152.make_mni152_dataset(tmp_path / "mni", resolution=1)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2, "csf": 3}
    image, affine = _load(out / "imagesTr" / "mni152_0000.nii.gz")
    labels, label_affine = _load(out / "labelsTr" / "mni152.nii.gz")
    np.testing.assert_array_equal(affine, label_affine)
    assert "".join(nib.aff2axcodes(affine)) == "RAS" and np.allclose(np.diag(affine)[:3], 1.0)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    means = {k: image[labels == k].mean() for k in (1, 2, 3)}
    assert means[2] > means[1] > means[3]  # T1 contrast: white > grey > CSF
    assert image[labels == 0].mean() < 0.1 * means[3]  # brain-extracted template: labels cover the brain
    assert all(meta["voxel_counts"][name] == int((labels == v).sum()) for name, v in mni152.LABELS.items() if v)


def test_mni152_tissue_rule_and_missing_nilearn(tmp_path, monkeypatch):
    gm = np.array([[[0.6, 0.2, 0.1, 0.5]]], np.float32)
    wm = np.array([[[0.3, 0.7, 0.2, 0.5]]], np.float32)
    brain = np.array([[[1, 1, 1, 0]]], np.uint8)
    np.testing.assert_array_equal(mni152.tissue_labels(gm, wm, brain), [[[1, 2, 3, 0]]])
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[data\]"'):
        mni152.make_mni152_dataset(tmp_path / "x")
