"""Dataset validation: every bad-input kind on tiny files, the table, and the CLI exit codes."""

import json

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data.check import Problem, main, validate_record
from sammed3d_jax.data.manifest import discover, write_manifest


def _nii(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _case(root, case, image=None, label=None, image_affine=None, label_affine=None):
    folder = root / "liver" / "ct_TEST"
    rng = np.random.default_rng(len(case))
    if image is not False:
        img = rng.normal(size=(6, 6, 6)).astype(np.float32) if image is None else image
        _nii(folder / "imagesTr" / f"{case}.nii.gz", img, image_affine)
    lab = np.zeros((6, 6, 6), np.uint8) if label is None else label
    if label is None:
        lab[2:4, 2:4, 2:4] = 1
    return _nii(folder / "labelsTr" / f"{case}.nii.gz", lab, label_affine)


@pytest.fixture()
def clean(tmp_path):
    root = tmp_path / "clean"
    for case in ("a", "b"):
        _case(root, case)
    return root


def test_clean_dataset_and_its_manifest_exit_zero(clean, tmp_path, capsys):
    assert main([str(clean), "--no-progress"]) == 0
    assert "2 cases, 2 targets: no problems" in capsys.readouterr().out
    records = discover(clean)
    assert [validate_record(r) for r in records] == [[], []]
    write_manifest(tmp_path / "m" / "manifest.json", records)
    assert main([str(tmp_path / "m" / "manifest.json"), "--no-progress"]) == 0


def test_every_bad_kind_is_reported(tmp_path, capsys):
    root = tmp_path / "bad"
    _case(root, "ok")
    _case(root, "empty", label=np.zeros((6, 6, 6), np.uint8))
    _case(root, "nopair", image=False)
    _case(root, "four", image=np.zeros((6, 6, 6, 2), np.float32))
    nan = np.ones((6, 6, 6), np.float32)
    nan[0, 0, :2] = np.nan
    _case(root, "nan", image=nan)
    frac = np.zeros((6, 6, 6), np.float32)
    frac[1, 1, 1] = 0.5
    _case(root, "frac", label=frac)
    trunc = _case(root, "trunc").parent.parent / "imagesTr" / "trunc.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[:-20])  # header intact, voxel data cut short
    _case(root, "shape", label=np.ones((6, 6, 5), np.uint8))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    _case(root, "affine", label_affine=shifted)
    (_case(root, "junk")).write_bytes(b"\x1f\x8b garbage")
    assert main([str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["file", "problem"]
    base = "liver/ct_TEST/"
    expected = [
        ("labelsTr/empty.nii.gz", "empty target 'liver': no voxel == 1 (values present: [0])"),
        ("imagesTr/nopair.nii.gz", "image file not found (missing pair of nopair.nii.gz)"),
        ("imagesTr/four.nii.gz", "4-D image of shape (6, 6, 6, 2)"),
        ("imagesTr/nan.nii.gz", "2 non-finite voxels (2 NaN, 0 inf)"),
        ("labelsTr/frac.nii.gz", "label map has 1 non-integer voxels (e.g. [0.5])"),
        ("imagesTr/trunc.nii.gz", "cannot read voxel data, file truncated or corrupt"),
        ("labelsTr/shape.nii.gz", "shape (6, 6, 5) differs from the image's (6, 6, 6)"),
        ("labelsTr/affine.nii.gz", "affine differs from the image's (max difference 2;"),
        ("labelsTr/junk.nii.gz", "not a readable NIfTI file"),
    ]
    for file, problem in expected:
        assert any(line.startswith(base + file) and problem in line for line in lines), (file, problem, out)
    assert "ok.nii.gz" not in out
    assert lines[-1].endswith(f"10 cases, 10 targets: {len(expected)} problems in {len(expected)} files")
    # The pipeline gets the same messages per record.
    by_case = {r.case: r for r in discover(root)}
    assert validate_record(by_case["ok"]) == []
    (problem,) = validate_record(by_case["nan"])
    assert problem == Problem(str(root / base / "imagesTr" / "nan.nii.gz"), "2 non-finite voxels (2 NaN, 0 inf)")


def test_discovery_problems_reach_the_table(tmp_path, capsys):
    folder = tmp_path / "Dataset003_Y"
    _nii(folder / "labelsTr" / "c1.nii.gz", np.array([[[0, 1], [7, 1]]] * 2, np.uint8))
    _nii(folder / "imagesTr" / "c1_0000.nii.gz", np.ones((2, 2, 2), np.float32))
    _nii(folder / "imagesTr" / "c9_0000.nii.gz", np.ones((2, 2, 2), np.float32))
    meta = {"labels": {"background": 0, "organ": 1}, "channel_names": {"0": "CT"}}
    (folder / "dataset.json").write_text(json.dumps(meta))
    assert main([str(folder), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "imagesTr/c9_0000.nii.gz  image without a label" in out
    assert "labelsTr/c1.nii.gz       label value 7 is not declared in dataset.json" in out


def test_unusable_dataset_argument_exits_two(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "nothing: no dataset found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "not a sammed3d_jax.manifest file" in capsys.readouterr().err


def _raw_nifti(path, shape, dtype, affine, payload=b""):
    """A .nii.gz written byte by byte: a header nibabel's image class would refuse to produce, then ``payload``."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\x00" * 4 + payload))
    return path


def test_header_bombs_and_unusable_affines_are_per_file_problems(tmp_path, capsys):
    root = tmp_path / "bad"
    _case(root, "ok")
    labels = root / "liver" / "ct_TEST" / "labelsTr"
    _case(root, "bomb")
    _raw_nifti(labels / "bomb.nii.gz", (1100, 1100, 1100), np.uint8, np.eye(4))  # ~70 bytes claiming 1.3 GB
    _case(root, "flat")
    zero_axis = np.eye(4)
    zero_axis[:3, 1] = 0.0
    _raw_nifti(labels / "flat.nii.gz", (6, 6, 6), np.uint8, zero_axis, np.ones(216, np.uint8).tobytes())
    _case(root, "nanaxis")
    nan_axis = np.eye(4)
    nan_axis[2, 2] = np.nan
    _raw_nifti(labels / "nanaxis.nii.gz", (6, 6, 6), np.uint8, nan_axis, np.ones(216, np.uint8).tobytes())
    trunc = _case(root, "trunc", label=np.ones((6, 6, 5), np.uint8)).parent.parent / "imagesTr" / "trunc.nii.gz"
    trunc.write_bytes(trunc.read_bytes()[:-20])
    assert main([str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    expected = [
        ("labelsTr/bomb.nii.gz", "cannot read voxel data, file truncated or corrupt (the header claims shape "
                                 "(1100, 1100, 1100) of uint8"),
        ("labelsTr/bomb.nii.gz", "shape (1100, 1100, 1100) differs from the image's (6, 6, 6)"),
        ("labelsTr/flat.nii.gz", "unusable geometry in the header: Geometry: affine has a zero-length axis"),
        ("labelsTr/nanaxis.nii.gz", "unusable geometry in the header: Geometry: affine must be a finite 4x4 matrix"),
        ("imagesTr/trunc.nii.gz", "cannot read voxel data, file truncated or corrupt"),
        ("labelsTr/trunc.nii.gz", "shape (6, 6, 5) differs from the image's (6, 6, 6)"),  # from the header alone
    ]
    lines = out.splitlines()
    for file, problem in expected:
        assert any(line.startswith("liver/ct_TEST/" + file) and problem in line for line in lines), (file, out)
    assert "ok.nii.gz" not in out
