"""Metrics against hand-computed cases: Dice, surfel areas, surface distances, normalised surface Dice, summaries; and
against DeepMind's surface-distance package (a [dev] dependency: required when CI=true, skipped elsewhere if absent)."""

import importlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from sammed3d_jax.evaluation import metrics

SQRT2, SQRT3 = math.sqrt(2.0), math.sqrt(3.0)


def _box(shape, lo, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = True
    return mask


def _ball(shape, centre, radius):
    grid = np.indices(shape, sparse=True)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _corner_area(s):
    # Marching-cubes corner triangle (one voxel of 2x2x2 inside): vertices at the three half edges.
    s0, s1, s2 = s
    return math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8


def _edge_area(along, across_a, across_b):
    # Two voxels sharing an edge: a quad, length `along` by the half-diagonal across the two other axes.
    return along * math.hypot(across_a, across_b) / 2


# --- Dice ---------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(a=hnp.arrays(bool, (3, 4, 5)), b=hnp.arrays(bool, (3, 4, 5)))
def test_dice_symmetric_bounded_and_counted(a, b):
    d = metrics.dice(a, b)
    if not (a.any() or b.any()):
        assert math.isnan(d)
        return
    assert 0.0 <= d <= 1.0 and d == metrics.dice(b, a)
    assert d == 2 * int((a & b).sum()) / (int(a.sum()) + int(b.sum()))
    assert metrics.dice(a | b, a | b) == 1.0


def test_dice_hand_case():
    pred = np.array([1, 1, 1, 0, 0], np.uint8)
    gt = np.array([0, 1, 1, 1, 1], np.uint8)
    assert metrics.dice(pred, gt) == pytest.approx(2 * 2 / 7)


# --- NaN policy -----------------------------------------------------------------------------------------------------


def test_nan_policy():
    empty = np.zeros((6, 6, 6), bool)
    full = _box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    sp = (1.0, 1.0, 1.0)
    assert math.isnan(metrics.dice(empty, empty))
    assert math.isnan(metrics.normalized_surface_dice(empty, empty, sp))
    # gt empty, prediction non-empty -> 0 (upstream); gt non-empty, prediction empty -> 0 as well.
    for pred, gt in ((full, empty), (empty, full)):
        assert metrics.dice(pred, gt) == 0.0
        assert metrics.normalized_surface_dice(pred, gt, sp) == 0.0
        distances = metrics.surface_distances(pred, gt, sp)  # the other surface is missing: infinitely far
        assert np.all(np.concatenate([distances.gt_to_pred, distances.pred_to_gt]) == math.inf)


# --- surfel areas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 2.0, 3.0)])
def test_surfel_areas_of_a_voxel_and_a_box(spacing):
    one = _box((3, 3, 3), (1, 1, 1), (1, 1, 1))
    area = metrics.surface_distances(one, one, spacing).gt_areas.sum()
    assert area == pytest.approx(8 * _corner_area(spacing))  # an octahedron; sqrt(3) at unit spacing
    n = 5  # a 5^3 box: 6 flat faces of (n-1)^2 unit squares, 12 chamfered edges of n-1 quads, 8 corner triangles
    box = _box((9, 9, 9), (2, 2, 2), (n, n, n))
    s0, s1, s2 = spacing
    expected = (
        2 * (n - 1) ** 2 * (s1 * s2 + s0 * s2 + s0 * s1)
        + 4 * (n - 1) * (_edge_area(s0, s1, s2) + _edge_area(s1, s0, s2) + _edge_area(s2, s0, s1))
        + 8 * _corner_area(spacing)
    )
    assert metrics.surface_distances(box, box, spacing).gt_areas.sum() == pytest.approx(expected)
    if spacing == (1.0, 1.0, 1.0):
        assert expected == pytest.approx(6 * 16 + 48 * SQRT2 / 2 + SQRT3)


def test_area_table_is_complement_symmetric_and_empty_codes_have_no_area():
    table = metrics.surfel_area_table((0.7, 1.3, 2.9))
    np.testing.assert_allclose(table, table[::-1], rtol=1e-12)
    assert table[0] == 0 and table[255] == 0 and np.all(table[1:255] > 0)


def test_non_planar_pentagon_uses_the_classic_split():
    # Voxels (0,0,0), (1,0,0), (0,1,0) of a neighbourhood (bits 0, 4, 2): a non-planar pentagon. The classic
    # marching-cubes split fans out from a vertex on an axis-2 edge: 1/2 + √3/8 + √3/4 (other splits are smaller).
    unit = metrics.surfel_area_table((1.0, 1.0, 1.0))
    assert unit[1 + 16 + 4] == pytest.approx(0.5 + 3 * SQRT3 / 8, rel=1e-12)
    assert unit[255 - (1 + 16 + 4)] == unit[1 + 16 + 4]


# --- normalised surface Dice ----------------------------------------------------------------------------------------


def test_identical_masks_and_far_disjoint_masks():
    sp = (1.2, 0.8, 2.5)
    ball = _ball((20, 20, 20), (9, 10, 8), 5)
    assert metrics.normalized_surface_dice(ball, ball, sp) == 1.0
    same = metrics.surface_distances(ball, ball, sp)
    assert same.gt_to_pred.max() == 0.0 and same.pred_to_gt.max() == 0.0
    a, b = _box((30, 8, 8), (1, 2, 2), (4, 4, 4)), _box((30, 8, 8), (22, 2, 2), (4, 4, 4))
    assert metrics.dice(a, b) == 0.0
    assert metrics.normalized_surface_dice(a, b, sp, tolerance_mm=5.0) == 0.0
    # Surfels sit on the 2x2x2 neighbourhoods straddling the faces (voxels 4|5 and 21|22): 17 voxels apart at least.
    apart = metrics.surface_distances(a, b, sp)
    assert apart.gt_to_pred.min() == apart.pred_to_gt.min() == pytest.approx(17 * sp[0])


def _shifted_cube_nsd(spacing, n=5):
    """NSD of an n^3 cube vs. the cube shifted one voxel along axis 0 when every spacing exceeds the tolerance.

    Only coincident surfels count (distance 0). For each cube those are the surfels whose neighbourhood lies on a
    side (axis 1 or 2 boundary) within the overlapping axis-0 range: the 4 side faces, the 4 edges along axis 0,
    the 4 edges of the far end face and its 4 corners. Not: both end faces, the near end's edges and corners.
    """
    s0, s1, s2 = spacing
    within = (
        2 * (n - 1) ** 2 * (s0 * s2 + s0 * s1)
        + 4 * (n - 1) * _edge_area(s0, s1, s2)
        + 2 * (n - 1) * (_edge_area(s1, s0, s2) + _edge_area(s2, s0, s1))
        + 4 * _corner_area(spacing)
    )
    total = (
        2 * (n - 1) ** 2 * (s1 * s2 + s0 * s2 + s0 * s1)
        + 4 * (n - 1) * (_edge_area(s0, s1, s2) + _edge_area(s1, s0, s2) + _edge_area(s2, s0, s1))
        + 8 * _corner_area(spacing)
    )
    return within / total


@pytest.mark.parametrize(
    ("spacing", "tolerance", "expected"),
    [
        ((1.0, 1.0, 1.0), 1.0, 1.0),  # the shift is 1 mm: every surfel is within 1 mm
        ((2.0, 2.0, 2.0), 2.0, 1.0),  # 2 mm shift, 2 mm tolerance
        ((2.0, 2.0, 2.0), 1.0, _shifted_cube_nsd((2.0, 2.0, 2.0))),  # 2 mm shift: only coincident surfels
        ((1.0, 3.0, 3.0), 1.0, 1.0),  # anisotropic: shifted along the fine 1 mm axis
        ((2.0, 1.5, 3.0), 1.0, _shifted_cube_nsd((2.0, 1.5, 3.0))),  # anisotropic, all axes coarser than 1 mm
    ],
)
def test_cube_shifted_by_one_voxel(spacing, tolerance, expected):
    gt = _box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    pred = np.roll(gt, 1, axis=0)
    assert metrics.normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(expected, rel=1e-12)
    assert metrics.normalized_surface_dice(gt, pred, spacing, tolerance) == pytest.approx(expected, rel=1e-12)


def test_hand_value_of_the_isotropic_2mm_shift():
    # 4·16 + 32·√2/2 + 4·√3/8 over 6·16 + 48·√2/2 + 8·√3/8 (areas ×4 cancel).
    value = (64 + 16 * SQRT2 + SQRT3 / 2) / (96 + 24 * SQRT2 + SQRT3)
    assert _shifted_cube_nsd((2.0, 2.0, 2.0)) == pytest.approx(value)
    assert value == pytest.approx(0.66448, abs=1e-5)


def test_anisotropy_changes_the_answer():
    gt = _box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    sp = (3.0, 3.0, 1.0)
    assert metrics.normalized_surface_dice(np.roll(gt, 1, axis=2), gt, sp, 1.0) == 1.0  # 1 mm shift
    assert metrics.normalized_surface_dice(np.roll(gt, 1, axis=0), gt, sp, 1.0) < 0.9  # 3 mm shift
    assert metrics.normalized_surface_dice(np.roll(gt, 1, axis=0), gt, (1.0, 1.0, 1.0), 1.0) == 1.0


def test_sphere_vs_slightly_larger_sphere():
    gt = _ball((24, 24, 24), (12, 12, 12), 6)
    pred = _ball((24, 24, 24), (12, 12, 12), 7)
    values = [metrics.normalized_surface_dice(pred, gt, (1.0, 1.0, 1.0), t) for t in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)]
    assert all(a <= b for a, b in zip(values[:-1], values[1:], strict=True)) and values[0] < values[2] < values[-2]
    assert values[-2] == values[-1] == 1.0  # every surfel is within 2 mm
    # Distances scale with the spacing: halving it halves the tolerance that gives the same score.
    for t, v in zip((0.5, 1.0, 1.5), values[1:4], strict=True):
        assert metrics.normalized_surface_dice(pred, gt, (0.5, 0.5, 0.5), t / 2) == pytest.approx(v, rel=1e-12)


def test_concentric_spheres_far_apart():
    # A surfel lies within sqrt(3)/2 voxel of its mask's boundary sphere: radius-4 and radius-9 surfels are
    # more than 5 - sqrt(3) ≈ 3.27 mm apart and every one has a partner within 5 + sqrt(3) + 1 < 8 mm.
    gt = _ball((24, 24, 24), (12, 12, 12), 4)
    pred = _ball((24, 24, 24), (12, 12, 12), 9)
    assert metrics.normalized_surface_dice(pred, gt, (1.0, 1.0, 1.0), 3.2) == 0.0
    assert metrics.normalized_surface_dice(pred, gt, (1.0, 1.0, 1.0), 8.0) == 1.0
    distances = metrics.surface_distances(pred, gt, (1.0, 1.0, 1.0))
    both = np.concatenate([distances.gt_to_pred, distances.pred_to_gt])
    assert 3.2 < both.min() and both.max() < 8.0


def test_bad_input_is_named():
    a = np.zeros((4, 4, 4), bool)
    # The tests run with jaxtyping's checker, which rejects these shapes first (naming the parameter); without
    # it the functions' own checks raise ValueError. Both must name the offending argument.
    named = r"pred and gt must have the same shape|parameter 'gt'"
    with pytest.raises((ValueError, TypeError), match=named):
        metrics.dice(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match=r"pred and gt must have the same shape, got pred \(4, 4, 4\)"):
        metrics._as_masks(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="must be 3-D volumes"):
        metrics._as_masks(a[0], a[0], ndim=3)
    with pytest.raises((ValueError, TypeError), match=r"3-D|parameter 'pred'"):
        metrics.normalized_surface_dice(a[0], a[0], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        metrics.normalized_surface_dice(a, a, (1.0, 1.0))


# --- cross-check against the reference package (test-only, when installed) ------------------------------------------


@pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # the package's old scipy namespaces
def test_matches_surface_distance_package(dev_package):
    sd = dev_package("surface_distance")
    lookup_tables = importlib.import_module("surface_distance.lookup_tables")

    # The package codes corner (a, b, c) with bit 7 - (4a + 2b + c): the bit-reversed code.
    reverse = [int(f"{c:08b}"[::-1], 2) for c in range(256)]
    for spacing in ((1.0, 1.0, 1.0), (1.0, 2.0, 3.0), (0.7, 1.9, 3.3), (2.5, 0.4, 1.1)):
        reference = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)[reverse]
        np.testing.assert_allclose(metrics.surfel_area_table(spacing), reference, rtol=1e-12, atol=1e-15)
    rng = np.random.default_rng(0)
    for _ in range(8):
        shape = tuple(int(s) for s in rng.integers(6, 16, 3))
        gt = rng.random(shape) < 0.15
        pred = gt ^ (rng.random(shape) < 0.1)
        spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))
        reference = sd.compute_surface_distances(gt, pred, spacing)
        for tolerance in (0.0, 0.6, 1.0, 2.0):
            ours = metrics.normalized_surface_dice(pred, gt, spacing, tolerance)
            assert ours == pytest.approx(sd.compute_surface_dice_at_tolerance(reference, tolerance), rel=1e-12)
        # The same surfels: (distance, area) of every one, in both directions (the package sorts by distance).
        ours = metrics.surface_distances(pred, gt, spacing)
        for d, a, ref_d, ref_a in ((ours.gt_to_pred, ours.gt_areas, "distances_gt_to_pred", "surfel_areas_gt"),
                                   (ours.pred_to_gt, ours.pred_areas, "distances_pred_to_gt", "surfel_areas_pred")):
            mine, theirs = np.stack([d, a]), np.stack([reference[ref_d], reference[ref_a]])
            mine, theirs = mine[:, np.lexsort(mine[::-1])], theirs[:, np.lexsort(theirs[::-1])]
            np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)


# --- aggregation ----------------------------------------------------------------------------------------------------


def test_summarize_per_target_and_pooled():
    summary = metrics.summarize({"liver": [0.8, float("nan"), 0.6], "kidney": [0.9], "empty": [float("nan")]})
    liver = summary["per_target"]["liver"]
    assert liver == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "n": 2, "n_nan": 1}
    assert summary["per_target"]["kidney"] == {"mean": 0.9, "std": 0.0, "n": 1, "n_nan": 0}
    assert math.isnan(summary["per_target"]["empty"]["mean"]) and summary["per_target"]["empty"]["n"] == 0
    overall = summary["overall"]  # pooled over (case, target) values, not a mean of per-target means
    assert overall["mean"] == pytest.approx(np.mean([0.8, 0.6, 0.9]))
    assert overall["std"] == pytest.approx(np.std([0.8, 0.6, 0.9]))
    assert (overall["n"], overall["n_nan"]) == (3, 2)


def test_dice_auc():
    clicks = [1, 3, 5, 10]
    assert metrics.dice_auc(clicks, [0.7, 0.7, 0.7, 0.7]) == pytest.approx(0.7)
    # x = 0, 2/9, 4/9, 1: trapezoids 1/9·(0.2+0.4) + 1/9·(0.4+0.6) + 5/18·(0.6+0.8)
    assert metrics.dice_auc(clicks, [0.2, 0.4, 0.6, 0.8]) == pytest.approx((0.6 + 1.0) / 9 + 5 * 1.4 / 18)
    assert metrics.dice_auc([5], [0.3]) == 0.3
    batch = metrics.dice_auc(clicks, np.array([[0.7] * 4, [0.2, 0.4, 0.6, 0.8], [0.1, float("nan"), 0.2, 0.3]]))
    np.testing.assert_allclose(batch[:2], [0.7, (0.6 + 1.0) / 9 + 5 * 1.4 / 18])
    assert math.isnan(batch[2])
    with pytest.raises(ValueError, match="n_clicks"):
        metrics.dice_auc([3, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores"):
        metrics.dice_auc([1, 3], [0.1, 0.2, 0.3])
