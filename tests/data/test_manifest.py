"""Dataset discovery (upstream and nnU-Net/MSD layouts) and the manifest file."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from sammed3d_jax.data.manifest import (
    MANIFEST_FORMAT,
    Record,
    detect_layout,
    discover,
    discover_with_problems,
    load_records,
    read_manifest,
    write_manifest,
)


def _nii(path, values, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((3, 3, 3), dtype)
    data.reshape(-1)[: len(values)] = values
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _upstream_root(tmp_path):
    # The root path itself contains "labels": only the labelsTr directory name may be rewritten.
    root = tmp_path / "my_labels_root"
    for target, dataset, cases in [("adrenal", "ct_WORD", ["a", "b"]), ("liver", "mr_CHAOS", ["c"])]:
        for case in cases:
            _nii(root / target / dataset / "labelsTr" / f"{case}.nii.gz", [1, 1])
            _nii(root / target / dataset / "imagesTr" / f"{case}.nii.gz", [5, 6, 7], np.int16)
    return root


def _nnunet(folder, labels, meta_extra=None, cases=None, suffix="_0000"):
    cases = cases or {"case_1": [0, 1, 2, 2], "case_2": [1, 1]}
    for case, values in cases.items():
        _nii(folder / "labelsTr" / f"{case}.nii.gz", values)
        _nii(folder / "imagesTr" / f"{case}{suffix}.nii.gz", [3, 4], np.int16)
    meta = {"labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz", **(meta_extra or {})}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def test_upstream_layout(tmp_path):
    root = _upstream_root(tmp_path)
    assert detect_layout(root) == "upstream"
    records = discover(root)
    assert [(r.target, r.dataset, r.case, r.label_value, r.modality) for r in records] == [
        ("adrenal", "ct_WORD", "a", 1, "ct"),
        ("adrenal", "ct_WORD", "b", 1, "ct"),
        ("liver", "mr_CHAOS", "c", 1, "mr"),
    ]
    r = records[0]
    assert r.label == str(root / "adrenal" / "ct_WORD" / "labelsTr" / "a.nii.gz")
    assert r.image == str(root / "adrenal" / "ct_WORD" / "imagesTr" / "a.nii.gz")
    # One upstream dataset folder on its own: the target is its parent's name.
    one = root / "liver" / "mr_CHAOS"
    assert detect_layout(one) == "upstream_dataset"
    assert [(r.target, r.dataset, r.case) for r in discover(one)] == [("liver", "mr_CHAOS", "c")]


def test_nnunet_v2_every_present_value_is_a_target(tmp_path):
    folder = _nnunet(
        tmp_path / "Dataset001_Abd",
        {"background": 0, "liver": 1, "tumour": 2, "both": [1, 2]},
        {"channel_names": {"0": "CT"}},
    )
    (folder / "imagesTr" / "._case_1_0000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    assert detect_layout(folder) == "nnunet"
    records, problems = discover_with_problems(folder)
    assert problems == []
    assert [(r.case, r.label_value, r.target) for r in records] == [
        ("case_1", 1, "liver"),
        ("case_1", 2, "tumour"),
        ("case_2", 1, "liver"),
    ]
    assert {r.dataset for r in records} == {"Dataset001_Abd"} and {r.modality for r in records} == {"ct"}
    assert records[0].image == str(folder / "imagesTr" / "case_1_0000.nii.gz")
    # Without scanning, every declared target is listed for every case (no file is read).
    fast = discover(folder, scan_labels=False)
    assert [(r.case, r.label_value) for r in fast] == [("case_1", 1), ("case_1", 2), ("case_2", 1), ("case_2", 2)]


def test_msd_v1_raw_images_ignore_label_and_undeclared_values(tmp_path):
    folder = _nnunet(
        tmp_path / "Task09_Spleen",
        {"0": "background", "1": "spleen", "4": "ignore"},
        {"modality": {"0": "MRI"}},
        cases={"s1": [0, 1, 4, 3]},
        suffix="",  # raw MSD: imagesTr/<case>.nii.gz
    )
    records, problems = discover_with_problems(folder)
    assert [(r.label_value, r.target, r.modality) for r in records] == [(1, "spleen", "mri"), (3, "label_3", "mri")]
    assert records[0].image == str(folder / "imagesTr" / "s1.nii.gz")
    assert problems == [(str(folder / "labelsTr" / "s1.nii.gz"), "label value 3 is not declared in dataset.json")]
    with pytest.warns(UserWarning, match="label value 3 is not declared"):
        discover(folder)
    with pytest.raises(ValueError, match="label value 3 is not declared"):
        discover(folder, strict=True)


def test_unreadable_labels_orphan_images_and_missing_images(tmp_path):
    folder = _nnunet(tmp_path / "Dataset002_X", {"background": 0, "a": 1}, cases={"case_1": [1], "case_2": [1]})
    (folder / "labelsTr" / "case_2.nii.gz").write_bytes(b"garbage" * 20)
    _nii(folder / "imagesTr" / "lonely_0000.nii.gz", [1])
    _nii(folder / "labelsTr" / "noimage.nii.gz", [1])
    records, problems = discover_with_problems(folder)
    assert [r.case for r in records] == ["case_1", "noimage"]
    assert records[1].image == str(folder / "imagesTr" / "noimage_0000.nii.gz")  # expected path; check reports it
    assert len(problems) == 2
    lonely = (str(folder / "imagesTr" / "lonely_0000.nii.gz"), "image without a label (no labelsTr/lonely.nii.gz)")
    assert problems[0] == lonely
    assert problems[1][0] == str(folder / "labelsTr" / "case_2.nii.gz") and "not a readable NIfTI" in problems[1][1]
    with pytest.warns(UserWarning):
        assert len(discover(folder)) == 2


def test_collection_of_nnunet_datasets(tmp_path):
    _nnunet(tmp_path / "raw" / "Dataset001_A", {"background": 0, "x": 1}, cases={"case_1": [1], "case_2": [1]})
    _nnunet(tmp_path / "raw" / "Dataset002_B", {"background": 0, "y": 1, "z": 2})
    assert detect_layout(tmp_path / "raw") == "nnunet_collection"
    records = discover(tmp_path / "raw")
    assert [(r.dataset, r.case, r.target) for r in records] == [
        ("Dataset001_A", "case_1", "x"),
        ("Dataset001_A", "case_2", "x"),
        ("Dataset002_B", "case_1", "y"),
        ("Dataset002_B", "case_1", "z"),
        ("Dataset002_B", "case_2", "y"),
    ]


def test_no_layout_and_bad_dataset_json(tmp_path):
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: no dataset found"):
        discover(tmp_path / "empty")
    with pytest.raises(ValueError, match="nope: does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "file.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="file.nii.gz: not a folder"):
        discover(tmp_path / "file.nii.gz")
    folder = _nnunet(tmp_path / "D", {"background": 0, "a": 1})
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"dataset.json: cannot read dataset.json"):
        discover(folder)
    (folder / "dataset.json").write_text(json.dumps({"labels": {"a": "b", "1": 2}}))
    with pytest.raises(ValueError, match="neither"):
        discover(folder)


@pytest.mark.parametrize("relative", [True, False])
def test_manifest_round_trip(tmp_path, relative):
    root = _upstream_root(tmp_path)
    records = discover(root)
    path = tmp_path / "out" / "manifest.json"
    write_manifest(path, records, relative=relative)
    body = json.loads(path.read_text())
    assert body["format"] == MANIFEST_FORMAT and body["version"] == 1 and len(body["records"]) == 3
    assert body["records"][0]["image"].startswith("..") == relative
    assert read_manifest(path) == records
    assert load_records(path) == (records, [])
    if relative:  # dataset and manifest move together
        moved = tmp_path / "moved"
        shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
        again = read_manifest(moved / "out" / "manifest.json")
        assert again[0].image == str(moved / "my_labels_root" / "adrenal" / "ct_WORD" / "imagesTr" / "a.nii.gz")


def test_manifest_errors_name_the_file_and_record(tmp_path):
    path = tmp_path / "m.json"
    good = {"case": "a", "image": "i.nii.gz", "label": "l.nii.gz", "label_value": 1, "target": "t", "dataset": "d",
            "modality": "ct"}
    cases = [
        ({"format": "other"}, "not a sammed3d_jax.manifest file"),
        ({"format": MANIFEST_FORMAT, "version": 9, "records": []}, "manifest version 9"),
        ({"format": MANIFEST_FORMAT, "version": 1, "records": [good, {"case": "b"}]}, "record 1 must have exactly"),
        (
            {"format": MANIFEST_FORMAT, "version": 1, "records": [dict(good, label_value="1")]},
            "record 0 field 'label_value'",
        ),
    ]
    for body, match in cases:
        path.write_text(json.dumps(body))
        with pytest.raises(ValueError, match=f"m.json: {match}"):
            read_manifest(path)
    path.write_text("[")
    with pytest.raises(ValueError, match="m.json: cannot read manifest"):
        read_manifest(path)
    rec = Record(**good)
    assert rec.label_value == 1


def test_all_zero_label_map_is_reported_as_empty(tmp_path):
    """An nnU-Net label map with no target voxel yields no target; discovery says so (check and prepare list it)."""
    folder = _nnunet(tmp_path / "Dataset005_Z", {"background": 0, "a": 1, "ignore": 9},
                     cases={"full": [1, 1], "blank": [0, 0], "ignored": [9, 0]})
    records, problems = discover_with_problems(folder)
    assert [r.case for r in records] == ["full"]
    assert sorted(problems) == [
        (str(folder / "labelsTr" / "blank.nii.gz"), "empty label map: no target voxel (values present: [0])"),
        (str(folder / "labelsTr" / "ignored.nii.gz"), "empty label map: no target voxel (values present: [0, 9])"),
    ]
    assert discover_with_problems(folder, scan_labels=False)[1] == []  # not read, not judged
