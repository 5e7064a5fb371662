"""The official click rule on hand-computed cases: no error, tiny components, the largest component, ties, the EDT
maximum, fg/bg, the max-pooling branch (threshold lowered) and the fallback to the component itself."""

import numpy as np
import pytest

from sammed3d_jax.cvpr25 import clicks


def _vol(shape=(12, 12, 12)):
    return np.zeros(shape, np.uint8)


def test_no_error_no_click():
    gts = _vol()
    gts[2:5, 2:5, 2:5] = 1
    assert clicks.next_click(gts.copy(), gts, 1) is None
    assert clicks.next_clicks(gts.copy(), gts, [1, 2]) == [None, None]  # class 2 absent from both: no error


def test_single_voxel_components_fg_and_bg():
    gts, segs = _vol(), _vol()
    gts[3, 4, 5] = 1  # missed voxel
    assert clicks.next_click(segs, gts, 1) == clicks.Click((3, 4, 5), "fg")
    gts[:] = 0
    segs[7, 1, 2] = 1  # false-positive voxel
    assert clicks.next_click(segs, gts, 1) == clicks.Click((7, 1, 2), "bg")


def test_other_classes_do_not_count_as_error():
    gts, segs = _vol(), _vol()
    gts[1:4, 1:4, 1:4] = 2
    segs[1:4, 1:4, 1:4] = 2
    segs[8, 8, 8] = 1  # class 1 false positive
    assert clicks.next_click(segs, gts, 2) is None
    assert clicks.next_click(segs, gts, 1) == clicks.Click((8, 8, 8), "bg")


def test_largest_component_and_its_deepest_voxel():
    gts, segs = _vol((16, 16, 16)), _vol((16, 16, 16))
    gts[1:4, 1:4, 1:4] = 1       # 27 missed voxels: the smaller error
    gts[8:13, 8:13, 8:13] = 1    # a 5^3 cube, 125 missed voxels
    segs[8:13, 8:13, 8:13] = 1
    segs[9:11, 9:11, 9:11] = 0  # ...of which the prediction misses a 2^3 hole only
    assert clicks.next_click(segs, gts, 1) == clicks.Click((2, 2, 2), "fg")  # 27 > 8; its centre is deepest
    segs[1:4, 1:4, 1:4] = 1
    # Only the hole is left; every voxel of a 2^3 block is at distance 1: a tie among 8 candidates in C order.
    candidates = np.argwhere(np.zeros((2, 2, 2)) == 0) + 9
    expected = tuple(int(c) for c in candidates[np.random.RandomState(42).choice(8)])
    assert clicks.next_click(segs, gts, 1) == clicks.Click(expected, "fg")


def test_26_connectivity_and_equal_size_ties():
    err = _vol()
    err[1, 1, 1] = err[2, 2, 2] = 1      # diagonal neighbours: one component of 2 (26-connected)
    err[6, 6, 6] = err[6, 6, 8] = 1      # 2 apart: two components of 1
    comp = clicks.largest_error_component(err.astype(bool))
    assert comp.sum() == 2 and comp[1, 1, 1] and comp[2, 2, 2]
    tie = _vol()
    tie[9, 0, 0] = tie[9, 0, 1] = 1      # size 2, starts later in C order
    tie[0, 5, 5] = tie[0, 5, 6] = 1      # size 2, first in C order: wins the tie
    comp = clicks.largest_error_component(tie.astype(bool))
    assert comp[0, 5, 5] and comp[0, 5, 6] and comp.sum() == 2
    assert clicks.largest_error_component(_vol().astype(bool)) is None


def test_ties_pick_as_the_official_seeded_global_draw():
    values = np.zeros((4, 4, 4))
    values[0, 0, 1] = values[1, 2, 3] = values[3, 3, 0] = values[2, 0, 0] = 5.0
    candidates = np.argwhere(values == 5.0)
    saved = np.random.get_state()
    try:
        np.random.seed(42)
        official = tuple(int(c) for c in candidates[np.random.choice(len(candidates))])
    finally:
        np.random.set_state(saved)
    before = np.random.get_state()[1].copy()
    assert clicks.pick_maximum(values) == official
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is left alone
    assert clicks.pick_maximum(values) == official  # reset at every call


def test_edt_of_a_cube_hand_computed():
    comp = np.zeros((14, 14, 14), bool)
    comp[3:8, 4:9, 5:10] = True  # 5^3 cube: distance to the outside 1, 2, 3, 2, 1 along each axis
    edt = clicks.component_edt(comp)
    assert edt.max() == 3.0 and tuple(np.argwhere(edt == 3.0)[0]) == (5, 6, 7) and (edt == 3.0).sum() == 1
    assert edt[3, 6, 7] == 1.0 and edt[4, 6, 7] == 2.0 and edt[~comp].max() == 0.0
    assert clicks.next_click(np.zeros((14, 14, 14), np.uint8), comp.astype(np.uint8), 1) == clicks.Click((5, 6, 7),
                                                                                                      "fg")


def test_max_pooling_branch_hand_computed():
    comp = np.zeros((20, 20, 20), bool)
    comp[4:12, 4:12, 4:12] = True  # 8^3: pad int(0.25 * 8) = 2, crop 12^3 = 1728 voxels
    exact = clicks.component_edt(comp)
    assert exact.max() == 4.0 and np.array_equal(np.argwhere(exact == 4.0).min(0), [7, 7, 7]) and (
        exact == 4.0).sum() == 8
    # Above the (lowered) threshold the crop is pooled to 6^3 whose inner 4^3 is 1: distances 1, 2, 2, 1 per axis,
    # so the maximum 2 (pooled voxels) covers pooled 2..3, i.e. crop 4..7, i.e. volume 6..9 along every axis.
    pooled = clicks.component_edt(comp, max_voxels=1000)
    assert pooled.max() == 2.0 and (pooled == 2.0).sum() == 64
    assert np.array_equal(np.argwhere(pooled == 2.0).min(0), [6, 6, 6])
    assert np.array_equal(np.argwhere(pooled == 2.0).max(0), [9, 9, 9])
    assert pooled[4, 4, 4] == 1.0 and pooled[~comp].max() == 0.0
    # Odd crop sizes (5 + 2 * 1 = 7) are zero-padded to even before pooling and cropped back after.
    odd = np.zeros((9, 9, 9), bool)
    odd[2:7, 2:7, 2:7] = True
    e = clicks.component_edt(odd, max_voxels=10)
    assert e.shape == odd.shape and e[odd].min() >= 1.0 and e[~odd].max() == 0.0


def test_zero_edt_falls_back_to_the_component(monkeypatch):
    gts = _vol()
    gts[2:4, 5, 5] = 1
    monkeypatch.setattr(clicks, "component_edt", lambda component, max_voxels: np.zeros(component.shape))
    candidates = [(2, 5, 5), (3, 5, 5)]
    assert clicks.next_click(_vol(), gts, 1).coord == candidates[np.random.RandomState(42).choice(2)]


@pytest.mark.parametrize("seed", range(5))
def test_clicks_lie_in_the_error_with_the_right_kind(seed):
    rng = np.random.default_rng(seed)
    gts = (rng.random((10, 12, 9)) < 0.3).astype(np.uint8) * rng.integers(1, 3, (10, 12, 9)).astype(np.uint8)
    segs = (rng.random((10, 12, 9)) < 0.3).astype(np.uint8) * 2
    for c in (1, 2):
        click = clicks.next_click(segs, gts, c)
        err = (segs == c) != (gts == c)
        assert err[click.coord]
        assert click.kind == ("fg" if gts[click.coord] == c else "bg")
