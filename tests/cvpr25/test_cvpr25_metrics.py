"""The challenge's scores, hand-computed: multi-class DSC, NSD at 2 mm with the stored spacing and its DSC > 0.2 rule,
the AUC over steps 2-6 and the CSV row."""

import numpy as np
import pytest

from sammed3d_jax.cvpr25 import metrics


def _two_classes():
    gts = np.zeros((10, 10, 10), np.uint8)
    gts[1:3, 1:3, 1:3] = 1         # 8 voxels
    gts[5:9, 5:9, 5:6] = 2         # 16 voxels
    segs = np.zeros_like(gts)
    segs[1:3, 1:3, 1:3] = 1        # class 1 exact
    segs[5:9, 5:7, 5:6] = 2        # class 2: 8 of 16 found, nothing extra
    return gts, segs


def test_multiclass_dsc_hand_computed():
    gts, segs = _two_classes()
    # class 1: 1; class 2: 2*8 / (8 + 16) = 2/3
    assert metrics.multiclass_dsc(gts, segs) == pytest.approx((1.0 + 2.0 / 3.0) / 2.0, abs=1e-15)
    segs[segs == 2] = 3  # a predicted class that is not in the ground truth does not enter the mean
    assert metrics.multiclass_dsc(gts, segs) == pytest.approx(0.5, abs=1e-15)
    assert np.isnan(metrics.multiclass_dsc(np.zeros_like(gts), segs))


def test_nsd_only_above_dsc_0_2():
    gts = np.zeros((12, 12, 12), np.uint8)
    gts[2:6, 2:6, 2:6] = 1
    assert metrics.step_scores(gts, gts.copy(), (1.0, 1.0, 1.0)) == (1.0, 1.0)
    far = np.zeros_like(gts)
    far[8:12, 8:12, 8:12] = 1  # DSC 0: NSD is not computed
    assert metrics.step_scores(gts, far, (1.0, 1.0, 1.0)) == (0.0, 0.0)
    tiny = np.zeros_like(gts)
    tiny[2:6, 2:6, 2] = 1  # DSC 2*16/(64+16) = 0.4 > 0.2: NSD computed and > 0
    dsc, nsd = metrics.step_scores(gts, tiny, (1.0, 1.0, 1.0))
    assert dsc == pytest.approx(0.4) and 0.0 < nsd < 1.0


def test_nsd_tolerance_and_stored_spacing_hand_computed():
    # The same box shifted by one voxel along axis 0: no surface point is farther than one axis-0 voxel from the
    # other surface, and the faces across axis 0 are exactly that far.
    gts = np.zeros((12, 12, 12), np.uint8)
    gts[3:8, 2:10, 2:10] = 1
    shifted = np.zeros_like(gts)
    shifted[4:9, 2:10, 2:10] = 1
    # Spacing 1.5 mm along axis 0: every shifted face lies within 1.5 mm <= 2 mm: NSD 1.
    assert metrics.multiclass_nsd(gts, shifted, (1.5, 1.0, 1.0)) == pytest.approx(1.0)
    # 2.5 mm along axis 0: the two faces across axis 0 are now 2.5 mm from the other surface, the side faces
    # (on the same planes, overlapping) stay within tolerance, so NSD < 1. The spacing is used as given along
    # the array axes (the order the file stores is not reinterpreted).
    lower = metrics.multiclass_nsd(gts, shifted, (2.5, 1.0, 1.0))
    assert 0.0 < lower < 1.0
    assert metrics.multiclass_nsd(gts, shifted, (1.0, 1.0, 2.5)) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package imports scipy's deprecated namespaces
def test_nsd_matches_deepmind_surface_distance(dev_package):
    sd = dev_package("surface_distance")
    rng = np.random.default_rng(0)
    gts = np.zeros((20, 18, 16), np.uint8)
    gts[4:14, 3:12, 5:11] = 1
    gts[12:18, 10:16, 2:8] = 2
    segs = gts.copy()
    segs[rng.random(gts.shape) < 0.05] = 0
    segs[8:16, 2:6, 9:14] = 2
    spacing = (0.8, 1.2, 2.5)
    expected = np.mean([sd.compute_surface_dice_at_tolerance(
        sd.compute_surface_distances(gts == c, segs == c, spacing), 2.0) for c in (1, 2)])
    assert metrics.multiclass_nsd(gts, segs, spacing) == pytest.approx(expected, abs=1e-9)


def test_auc_over_steps_2_to_6_with_unit_spacing():
    scores = [0.9, 0.2, 0.4, 0.6, 0.8, 1.0]  # step 1 (the box) does not count
    assert metrics.auc(scores) == pytest.approx(0.3 + 0.5 + 0.7 + 0.9)
    assert metrics.auc([0.0] + [1.0] * 5) == 4.0


def test_case_row_columns_and_values():
    dscs, nsds = [0.5, 0.2, 0.4, 0.6, 0.8, 1.0], [0.0, 0.0, 0.3, 0.3, 0.3, 0.9]
    row = metrics.case_row("CT_x.npz", dscs, nsds, [1.0, 2.0, 0.5, 0.5, 0.5, 0.5], num_class=3)
    assert list(row) == metrics.CSV_COLUMNS
    assert metrics.CSV_COLUMNS[:3] == ["CaseName", "TotalRunningTime", "RunningTime_1"]
    assert metrics.CSV_COLUMNS[-2:] == ["num_class", "runtime_upperbound"]
    assert row["TotalRunningTime"] == 5.0 and row["runtime_upperbound"] == 270 and row["num_class"] == 3
    assert row["DSC_Final"] == 1.0 and row["NSD_Final"] == 0.9 and row["DSC_1"] == 0.5 and row["NSD_3"] == 0.3
    assert row["DSC_AUC"] == pytest.approx(2.4) and row["NSD_AUC"] == pytest.approx(0.15 + 0.3 + 0.3 + 0.6)
    with pytest.raises(ValueError, match="6 steps"):
        metrics.case_row("x", dscs[:5], nsds, [0.0] * 6, 1)
