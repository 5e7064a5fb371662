"""Case files and the box rule: checked reading, prompts in the order given, the challenge's box rule, the mapping of
challenge axes (z, y, x) to ours (x, y, z) with LPS/RAS geometry, and make-cases on the synthetic dataset."""

import json

import numpy as np
import pytest

from sammed3d_jax.cvpr25 import boxes, cases, make_cases
from sammed3d_jax.cvpr25.safe_npz import NpzError, read_npz
from sammed3d_jax.data.nifti import Geometry
from sammed3d_jax.data.synthetic import make_synthetic_dataset

BOX = {"z_min": 2, "z_max": 6, "z_mid": 4, "z_mid_x_min": 1, "z_mid_y_min": 3, "z_mid_x_max": 9, "z_mid_y_max": 5}


def _write(path, **arrays):
    np.savez_compressed(path, **arrays)
    return path


def test_read_case_and_prompts_in_click_order(tmp_path):
    imgs = np.arange(8 * 10 * 12, dtype=np.uint8).reshape(8, 10, 12)
    clicks = [{"fg": [[1, 2, 3], [4, 5, 6]], "bg": [[7, 8, 9]]}, {"fg": [], "bg": []}]
    path = _write(tmp_path / "CT_a.npz", imgs=imgs, spacing=[0.7, 0.8, 2.5], boxes=[BOX, dict(BOX, z_mid=6)],
                  clicks=clicks, clicks_order=[["fg", "bg", "fg"], [None, None, None]])
    case = cases.read_case(path)
    assert case.name == "CT_a.npz" and case.num_classes == 2 and case.gts is None
    assert case.spacing == (0.7, 0.8, 2.5) and case.spacing_zyx() == (2.5, 0.8, 0.7)
    assert case.spacing_zyx("zyx") == (0.7, 0.8, 2.5)
    p1, p2 = case.prompts()
    assert p1.box.lo_hi() == ((2, 3, 1), (6, 5, 9))
    assert p1.clicks == (((1, 2, 3), True), ((7, 8, 9), False), ((4, 5, 6), True))  # fg, bg, fg as ordered
    assert p2.clicks == () and p2.box.z_mid == 6
    again = cases.read_case(_write(tmp_path / "b.npz", **cases.case_arrays(case)))
    assert again.prompts() == case.prompts() and np.array_equal(again.imgs, imgs)


def test_separate_ground_truth_file(tmp_path):
    imgs = np.zeros((4, 5, 6), np.uint8)
    gts = np.zeros((4, 5, 6), np.uint8)
    gts[1, 1, 1] = 1
    path = _write(tmp_path / "c.npz", imgs=imgs, spacing=[1, 1, 1])
    gpath = _write(tmp_path / "g.npz", gts=gts)
    assert cases.read_case(path).gts is None
    assert cases.read_case(path, gpath).gts.sum() == 1


@pytest.mark.parametrize("change, match", [
    ({"imgs": np.zeros((4, 5))}, "'imgs' must be a numeric 3-D array"),
    ({"spacing": [1.0, -1.0, 1.0]}, "'spacing' must be three positive numbers"),
    ({"spacing": [1.0, 1.0]}, "'spacing' must be three positive numbers"),
    ({"gts": np.zeros((8, 10, 13), np.uint8)}, "'gts' has shape"),
    ({"gts": np.zeros((8, 10, 12), np.float32)}, "'gts' must be an integer 3-D array"),
    ({"boxes": [dict(BOX, z_max=9)]}, r"box of class 1\): box z range 2..9 is empty or outside the image"),
    ({"boxes": [{"z_min": 1}]}, "a box must be a dict with"),
    ({"boxes": [dict(BOX, z_mid=1)]}, "z_mid 1 lies outside"),
    ({"boxes": [dict(BOX, z_min=2.5)]}, "box z_min must be a whole number"),
    ({"clicks": [{"fg": [[0, 0, 12]], "bg": []}]}, r"class 1 fg click \[0, 0, 12\] is not three voxel indices inside"),
    ({"clicks": [{"fg": [[0, 0]], "bg": []}]}, "is not three voxel indices"),
    ({"clicks": [{"fg": [[0, 0, 0]], "bg": []}], "clicks_order": [["bg"]]}, "names 0 fg clicks"),
    ({"clicks": [{"fg": [], "bg": []}], "clicks_order": [["up"]]}, "may hold only 'fg', 'bg' and None"),
])
def test_bad_cases_are_refused_naming_the_key(tmp_path, change, match):
    arrays = {"imgs": np.zeros((8, 10, 12), np.uint8), "spacing": [1.0, 1.0, 1.0]}
    arrays.update(change)
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(NpzError, match=match):
        cases.read_case(path)


def _FixedShift(value):
    """A generator whose first ``integers(0, 6)`` draw (the box rule's shift, 0..5) is ``value``."""
    seed = next(s for s in range(1000) if np.random.default_rng(s).integers(0, 6) == value)
    return np.random.default_rng(seed)


def test_challenge_box_rule_hand_computed():
    mask = np.zeros((12, 256, 512), bool)
    mask[[2, 3, 7], 100:110, 200:260] = True  # occupied slices 2, 3, 7 -> z_mid = the middle one, 3
    mask[3, 105, 190] = True                  # the mid slice is wider in x
    box = boxes.challenge_box(mask, _FixedShift(3))  # 3 * 256 / 256 = 3 voxels in y, 3 * 512 / 256 = 6 in x
    assert box == cases.Box(z_min=2, z_max=7, z_mid=3, z_mid_x_min=184, z_mid_y_min=97, z_mid_x_max=265,
                            z_mid_y_max=112)
    edge = np.zeros((5, 20, 40), bool)
    edge[1:3, 0:4, 38:40] = True
    box = boxes.challenge_box(edge, _FixedShift(5))  # int(5 * 20 / 256) = 0 in y, int(5 * 40 / 256) = 0 in x
    assert box.lo_hi() == ((1, 0, 38), (2, 3, 39)) and box.z_mid == 2
    big = np.zeros((5, 300, 300), bool)
    big[2, 0:10, 290:300] = True
    box = boxes.challenge_box(big, _FixedShift(5))  # 5 voxels, clipped at 0 and 299
    assert box.lo_hi() == ((2, 0, 285), (2, 14, 299))
    with pytest.raises(ValueError, match="empty class mask"):
        boxes.challenge_box(np.zeros((3, 3, 3), bool), _FixedShift(0))
    draws = {int(boxes.box_rng(0, "case_a", k).integers(0, 6)) for k in range(1, 40)}
    assert draws <= set(range(6)) and len(draws) > 3
    assert boxes.box_rng(0, "case_a", 2).integers(0, 6) == boxes.box_rng(0, "case_a", 2).integers(0, 6)


def test_challenge_axes_map_to_ours():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (z, y, x)
    ours = boxes.to_our_axes(vol)
    assert ours.shape == (4, 3, 2) and ours[3, 1, 0] == vol[0, 1, 3]
    assert np.array_equal(boxes.from_our_axes(ours), vol)
    # LPS: our axis 0 (x) points left, axis 1 (y) posterior, axis 2 (z) superior; spacing (z, y, x) = (3, 2, 1).
    geom = boxes.case_geometry((2, 3, 4), (3.0, 2.0, 1.0), "LPS")
    assert geom.shape == (4, 3, 2) and geom.orientation == ("L", "P", "S") and geom.spacing_mm == (1.0, 2.0, 3.0)
    assert boxes.case_geometry((2, 3, 4), (3.0, 2.0, 1.0), "RAS").orientation == ("R", "A", "S")
    # A RAS grid at the same spacing covering the same voxels: x and y flip, z stays.
    ras = Geometry(np.diag([1.0, 2.0, 3.0, 1.0]) @ _translate(-3, -2, 0), (4, 3, 2))
    grid_pt = boxes.zyx_to_grid(np.array([[1, 0, 3]]), geom, ras)  # challenge (z=1, y=0, x=3)
    np.testing.assert_allclose(grid_pt, [[0.0, 2.0, 1.0]])
    box = cases.Box(z_min=0, z_max=1, z_mid=1, z_mid_x_min=1, z_mid_y_min=0, z_mid_x_max=2, z_mid_y_max=1)
    lo, hi = boxes.box_to_grid(box, geom, ras)
    # x 1..2 -> ras 3-2..3-1 = 1..2; y 0..1 -> 2-1..2-0 = 1..2; z 0..1 stays: lo <= hi after the flips.
    np.testing.assert_allclose(lo, [1.0, 1.0, 0.0])
    np.testing.assert_allclose(hi, [2.0, 2.0, 1.0])


def _translate(*shift):
    t = np.eye(4)
    t[:3, 3] = shift
    return t


def test_make_cases_from_the_synthetic_dataset(tmp_path):
    data = make_synthetic_dataset(tmp_path / "synth", cases=2, shape=(24, 20, 12))
    out = tmp_path / "cases"
    made, failures = make_cases.make_cases(data, out, seed=3)
    assert failures == [] and [m.name for m in made] == ["synth_000.npz", "synth_001.npz"]
    meta = json.loads((out / "cases.json").read_text())
    assert [c["target"] for c in meta["cases"]["synth_001.npz"]["classes"]] == ["ellipsoid", "tube", "blob"]
    for name in ("synth_000.npz", "synth_001.npz"):
        raw = read_npz(out / name)
        assert set(raw) == {"imgs", "gts", "spacing", "boxes"}
        assert raw["imgs"].dtype == np.uint8 and raw["imgs"].max() == 255 and raw["imgs"].min() == 0
        assert raw["gts"].dtype == np.uint8 and sorted(np.unique(raw["gts"]).tolist()) == [0, 1, 2, 3]
        case = cases.read_case(out / name)
        for k, box in enumerate(case.boxes, 1):  # the box rule, re-derived with the same seeded draw
            assert box == boxes.challenge_box(case.gts == k, boxes.box_rng(3, name[:-4], k))
    # Case 1 is LPS in the file (synthetic kind "lps"): the array is the file's voxels transposed, no flip.
    from sammed3d_jax.data.nifti import read_image
    image, geom = read_image(data / "imagesTr" / "synth_001_0000.nii.gz")
    assert geom.orientation == ("L", "P", "S")
    stored = read_npz(out / "synth_001.npz")
    np.testing.assert_allclose(stored["spacing"], geom.spacing_mm)  # SimpleITK order (x, y, z) = our axes
    expected = make_cases.scale_to_uint8(image, "mri").transpose(2, 1, 0)
    assert np.array_equal(stored["imgs"], expected)


def test_make_cases_reorients_to_lps(tmp_path):
    img = np.zeros((4, 3, 2), np.float32)
    img[3, 0, 1] = 7.0  # RAS file: voxel (3, 0, 1) is the rightmost, most posterior, upper one
    geom = Geometry(np.diag([1.0, 2.0, 3.0, 1.0]), (4, 3, 2))
    zyx, spacing = make_cases.to_lps_zyx(img, geom)
    assert spacing == (1.0, 2.0, 3.0) and zyx.shape == (2, 3, 4)
    # LPS: x index counts leftwards (so RAS x 3 -> LPS x 0), y counts posteriorly (RAS y 0 -> LPS y 2), z kept.
    assert zyx[1, 2, 0] == 7.0


def test_scale_to_uint8():
    ct = np.linspace(-1000, 1000, 1001)
    assert make_cases.scale_to_uint8(ct, "ct", (-100, 100))[[0, 450, 500, 550, 1000]].tolist() == [0, 0, 128, 255,
                                                                                                      255]
    mr = np.r_[np.zeros(100), np.linspace(1, 200, 200)]
    scaled = make_cases.scale_to_uint8(mr, "mri")
    assert scaled[:100].max() == 0 and scaled.max() == 255  # the zero background stays 0
    with pytest.raises(ValueError, match="empty"):
        make_cases.scale_to_uint8(np.full(10, 5.0), "ct")


def test_make_cases_merges_the_targets_of_the_upstream_layout(tmp_path):
    from sammed3d_jax.data.nifti import write_nifti

    geom = Geometry(np.diag([-1.2, -1.2, 2.5, 1.0]), (16, 14, 8))  # LPS: stored arrays are the voxels transposed
    image = np.random.default_rng(0).uniform(10, 100, geom.shape).astype(np.float32)
    masks = {"liver": (slice(2, 8), slice(3, 9), slice(1, 5)), "kidney": (slice(9, 14), slice(4, 8), slice(2, 6))}
    for target, region in masks.items():
        folder = tmp_path / "root" / target / "ct_toy"
        label = np.zeros(geom.shape, np.uint8)
        label[region] = 1
        write_nifti(folder / "imagesTr" / "case7.nii.gz", image, geom)
        write_nifti(folder / "labelsTr" / "case7.nii.gz", label, geom)
    made, failures = make_cases.make_cases(tmp_path / "root", tmp_path / "out", window=(0, 100))
    assert failures == [] and [m.name for m in made] == ["case7.npz"]
    assert [c["target"] for c in made[0].classes] == ["kidney", "liver"]  # targets in name order: classes 1, 2
    case = cases.read_case(tmp_path / "out" / "case7.npz")
    for k, target in enumerate(["kidney", "liver"], 1):
        expected = np.zeros(geom.shape, bool)
        expected[masks[target]] = True
        assert np.array_equal(case.gts == k, expected.transpose(2, 1, 0))
    np.testing.assert_allclose(case.spacing, (1.2, 1.2, 2.5), rtol=1e-6)  # (x, y, z); the header is float32
    assert len(case.boxes) == 2
