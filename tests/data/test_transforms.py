"""Upstream preprocessing: hand-computed cases for each transform, torchio's crop rule as an oracle, inverses."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sammed3d_jax.data import transforms as T
from sammed3d_jax.data.nifti import Geometry, reorient_to_ras

V = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], np.float32)


def _line(n, axis):
    """A volume varying along `axis` only (values V[:n]); the two other axes have 3 voxels at 1.5 mm."""
    shape = [3, 3, 3]
    shape[axis] = n
    return np.broadcast_to(V[:n].reshape([n if a == axis else 1 for a in range(3)]), shape).copy()


def _geom(shape, axis, spacing, origin=(0.0, 0.0, 0.0)):
    zooms = [1.5, 1.5, 1.5]
    zooms[axis] = spacing
    affine = np.diag(zooms + [1.0])
    affine[:3, 3] = origin
    return Geometry(affine, shape)


# (n, old spacing, target, order, expected samples): x = (n-1)/2 + (j - (m-1)/2) * target/old per axis.
RESAMPLE_CASES = [
    (4, 1.0, 2.0, 1, [1.5, 6.0]),  # x = 0.5, 2.5
    (2, 2.0, 1.0, 1, [1.0, 1.25, 1.75, 2.0]),  # x = -0.25 (edge clamp), 0.25, 0.75, 1.25 (edge clamp)
    (4, 0.75, 1.5, 0, [2.0, 8.0]),  # x = 0.5, 2.5: ties round up (ITK RoundHalfIntegerUp)
    (5, 1.0, 1.5, 1, [1.5, 4.0, 12.0]),  # m = floor(5/1.5) = 3; x = 0.5, 2, 3.5
    (5, 1.0, 1.5, 0, [2.0, 4.0, 16.0]),
    (7, 1.0, 3.0, 1, [3.0, 24.0]),  # m = 2; x = 1.5, 4.5
    (7, 1.0, 3.0, 0, [4.0, 32.0]),
]


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("n, spacing, target, order, expected", RESAMPLE_CASES)
def test_resample_hand_cases(axis, n, spacing, target, order, expected):
    vol = _line(n, axis)
    geom = _geom(vol.shape, axis, spacing, origin=(10.0, -20.0, 5.0))
    tgt = [1.5, 1.5, 1.5]
    tgt[axis] = target
    out, new = T.resample_to_spacing(vol if order else vol.astype(np.int32), geom, tuple(tgt), order=order)
    assert out.dtype == (np.float32 if order else np.int32)
    m = len(expected)
    assert out.shape == new.shape == tuple(m if a == axis else 3 for a in range(3))
    np.testing.assert_allclose(np.moveaxis(out, axis, 0)[:, 1, 1], expected, rtol=1e-6)
    assert new.spacing_mm[axis] == target
    # The centre of the field of view is kept.
    centre_old = geom.affine @ np.r_[(np.array(geom.shape) - 1) / 2, 1]
    centre_new = new.affine @ np.r_[(np.array(new.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-12)


def test_resample_grid_affine_hand_case():
    geom = Geometry(np.array([[1.0, 0, 0, 10], [0, 1.5, 0, 20], [0, 0, 1.5, 30], [0, 0, 0, 1]]), (4, 3, 1))
    new = T.spacing_grid(geom, (2.0, 1.5, 1.5))
    assert new.shape == (2, 3, 1)  # a singleton axis stays 1 (torchio) although floor(1 * 1.5 / 1.5) = 1 anyway
    np.testing.assert_allclose(new.affine, [[2, 0, 0, 10.5], [0, 1.5, 0, 20], [0, 0, 1.5, 30], [0, 0, 0, 1]])
    assert T.spacing_grid(Geometry(np.eye(4), (4, 1, 3)), (1.5, 1.5, 1.5)).shape == (2, 1, 2)
    with pytest.raises(ValueError, match="no voxel"):
        T.spacing_grid(Geometry(np.diag([0.5, 1, 1, 1]), (2, 3, 3)), (1.5, 1.5, 1.5))
    with pytest.raises(ValueError, match="three positive numbers"):
        T.spacing_grid(geom, (1.5, 0.0, 1.5))


@pytest.mark.parametrize(
    "shift, order, expected",
    [
        (-0.4, 1, [1.0, 1.6, 3.2, 0.0]),  # x = -0.4 (edge), 0.6, 1.6, 2.6 (beyond n - 0.5: fill)
        (-0.6, 1, [0.0, 1.4, 2.8, 4.0]),  # x = -0.6 (fill), 0.4, 1.4, 2.4 (edge)
        (-0.4, 0, [1, 2, 4, 0]),
        (-0.5, 0, [1, 2, 4, 0]),  # x = -0.5 is inside (ITK's half-open [-0.5, n - 0.5))
    ],
)
def test_resample_border_semantics(shift, order, expected):
    vol = np.broadcast_to(np.array([1, 2, 4], np.float32)[:, None, None], (3, 2, 2)).copy()
    src = Geometry(np.eye(4), vol.shape)
    tgt_affine = np.eye(4)
    tgt_affine[0, 3] = shift
    out = T.resample_to_geometry(vol if order else vol.astype(np.uint8), src, Geometry(tgt_affine, (4, 2, 2)), order)
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


def _reference_resample(array, geom, target_geom, order):
    """Per-voxel ITK semantics, written plainly (slow), for tiny volumes."""
    out = np.zeros(target_geom.shape, np.float64)
    n = np.array(array.shape)
    to_src = np.linalg.inv(geom.affine) @ target_geom.affine
    for q in np.ndindex(*target_geom.shape):
        p = (to_src @ np.r_[q, 1])[:3]
        if np.any(p < -0.5) or np.any(p >= n - 0.5):
            continue
        if order == 0:
            out[q] = array[tuple(np.clip(np.floor(p + 0.5), 0, n - 1).astype(int))]
            continue
        base = np.clip(np.floor(p), 0, n - 1).astype(int)
        frac = np.where((p - base <= 0) | (base + 1 > n - 1), 0.0, p - base)
        for corner in np.ndindex(2, 2, 2):
            w = np.prod(np.where(corner, frac, 1 - frac))
            if w:
                out[q] += w * array[tuple(np.minimum(base + corner, n - 1))]
    return out


@pytest.mark.parametrize("order", [0, 1])
def test_resample_oblique_and_permuted_match_reference(order):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 9, (5, 4, 6)).astype(np.float32)
    src = Geometry(np.array([[0, -1.2, 0, 3], [0.9, 0, 0, -2], [0, 0, 1.1, 1], [0, 0, 0, 1]]), vol.shape)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = np.array([[c, -s, 0, -1.0], [s, c, 0, 0.5], [0, 0, 1.3, 0.2], [0, 0, 0, 1]])
    permuted = np.array([[0.0, 0, 1.0, -2.5], [-0.7, 0, 0, 2.0], [0, 1.4, 0, 0.3], [0, 0, 0, 1]])
    for affine in (oblique, permuted):
        tgt = Geometry(affine, (4, 6, 5))
        out = T.resample_to_geometry(vol, src, tgt, order)
        np.testing.assert_allclose(out, _reference_resample(vol, src, tgt, order), atol=1e-5)
    # The general (map_coordinates) path agrees with the separable one on a separable case, channels included.
    both = np.stack([vol, 2 * vol], -1)
    index_map = np.linalg.solve(src.affine, permuted)
    general = T._resample_general(both, index_map, (4, 6, 5), order, 0)
    separable = T.resample_to_geometry(both, src, Geometry(permuted, (4, 6, 5)), order)
    np.testing.assert_allclose(general, separable, atol=1e-5)


@pytest.mark.parametrize("order", [0, 1])
def test_resample_commutes_with_reorientation(order):
    rng = np.random.default_rng(2)
    vol = rng.random((9, 7, 9)).astype(np.float32)
    geom = Geometry(np.array([[0, 0, -0.9, 40], [1.1, 0, 0, -3], [0, -2.1, 0, 7], [0, 0, 0, 1]]), vol.shape)
    # Sizes and ratios avoid exact nearest ties (an even n with an odd new size ties at the centre), which a
    # flipped axis rounds the other way.
    target = (1.3, 1.7, 1.9)
    a, ga = T.resample_to_spacing(vol, geom, target, order)
    a_ras, ga_ras = reorient_to_ras(a, ga)
    ras, gras = reorient_to_ras(vol, geom)
    b, gb = T.resample_to_spacing(ras, gras, tuple(target[i] for i in (2, 0, 1)), order)  # RAS axes = L, A, I
    np.testing.assert_allclose(a_ras, b, rtol=1e-6)
    np.testing.assert_allclose(ga_ras.affine, gb.affine, atol=1e-9)


def test_resample_inverse_restores_blocky_labels():
    rng = np.random.default_rng(3)
    label = np.kron(rng.integers(0, 4, (5, 4, 3)), np.ones((2, 2, 2), np.int64)).astype(np.uint8)  # 2-voxel blocks
    geom = Geometry(np.diag([0.75, 0.75, 0.75, 1.0]), label.shape)
    small, small_geom = T.resample_to_spacing(label, geom, (1.5, 1.5, 1.5), order=0)
    assert small.shape == (5, 4, 3) and small.dtype == np.uint8
    back = T.resample_to_geometry(small, small_geom, geom, order=0)
    np.testing.assert_array_equal(back, label)


def test_resample_identity_returns_a_copy_and_rejects_bad_args():
    vol = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out, _ = T.resample_to_spacing(vol, Geometry(np.diag([1.5, 1.5, 1.5, 1]), vol.shape))
    np.testing.assert_array_equal(out, vol)
    assert out is not vol
    with pytest.raises(ValueError, match="order"):
        T.resample_to_spacing(vol, Geometry(np.eye(4), vol.shape), order=3)
    with pytest.raises(ValueError, match="does not start with"):
        T.resample_to_spacing(vol, Geometry(np.eye(4), (3, 3, 4)))


# ----------------------------------------------------------------------------------------------------------


def _mask_1d(n, lo, hi):
    mask = np.zeros((n, 2, 2), bool)
    mask[lo:hi] = True
    return mask


@pytest.mark.parametrize(
    "n, box, target, start",
    [
        (20, (10, 13), 8, 7),  # odd extent: centre 11.5 -> 11, begin 11 - 4
        (20, (10, 14), 8, 8),  # even extent: centre 12
        (20, (10, 13), 7, 8),  # odd target, half-integral centre: 11.5 - 3.5
        (20, (10, 14), 7, 8),  # odd target, integral centre: 12 - 0.5 - 3.5
        (20, (0, 2), 8, -3),  # box at the start border: pad 3 before
        (20, (18, 20), 8, 15),  # box at the end border: pad 3 after
        (5, (1, 3), 8, -2),  # volume smaller than the target
        (300, (100, 251), 128, 111),  # 128-voxel target, odd extent 151: centre 175.5 -> 175
        (300, (250, 300), 128, 211),  # runs past the end: begin 275 - 64, pad 39 after
    ],
)
def test_crop_or_pad_box_hand_cases(n, box, target, start):
    cp = T.crop_or_pad_box(_mask_1d(n, *box), (target, 2, 2))
    assert cp.start[0] == start and cp.start[1:] == (0, 0)
    assert cp.pad_before[0] == max(-start, 0) and cp.pad_after[0] == max(start + target - n, 0)
    assert cp.crop_before[0] == max(start, 0) and cp.crop_after[0] == max(n - start - target, 0)


@pytest.mark.parametrize(
    "n, target, start", [(5, 8, -2), (20, 8, 6), (11, 8, 2), (8, 8, 0), (130, 128, 1), (131, 128, 2), (125, 128, -2)]
)
def test_empty_mask_centre_crop_or_pad(n, target, start):
    assert T.crop_or_pad_box(np.zeros((n, 3, 3), np.uint8), (target, 3, 3)).start == (start, 0, 0)


def _torchio_oracle(mask, target):
    """torchio's pad-then-crop bounds, followed literally: centre shift by the XOR rule, int() conversions."""
    if not mask.any():
        return None
    pads, crops = [], []
    for axis, t in enumerate(target):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        centre = (hits[0] + hits[-1] + 1) / 2
        if (t % 2 == 0) ^ (centre % 1 == 0):
            centre -= 0.5
        begin, end = centre - t / 2, centre + t / 2
        pads.append((int(max(-begin, 0)), int(max(end - mask.shape[axis], 0))))
        crops.append((int(max(begin, 0)), int(max(mask.shape[axis] - end, 0))))
    return pads, crops


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_crop_or_pad_matches_torchio_and_inverts(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 12), min_size=3, max_size=3)))
    target = tuple(data.draw(st.lists(st.integers(1, 10), min_size=3, max_size=3)))
    lo = [data.draw(st.integers(0, s - 1)) for s in shape]
    hi = [data.draw(st.integers(a + 1, s)) for a, s in zip(lo, shape)]
    mask = np.zeros(shape, np.uint8)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    image = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)
    cp = T.crop_or_pad_box(mask, target)
    pads, crops = _torchio_oracle(mask, target)
    padded = np.pad(image, pads)
    expected = padded[tuple(slice(c0, padded.shape[a] - c1) for a, (c0, c1) in enumerate(crops))]
    roi = T.apply_crop_or_pad(image, cp)
    np.testing.assert_array_equal(roi, expected)


def test_crop_or_pad_channels_fill_and_geometry():
    image = np.ones((4, 4, 4, 2), np.float32)
    cp = T.CropPad(source_shape=(4, 4, 4), start=(-1, 2, 0), target_shape=(3, 3, 3))
    roi = T.apply_crop_or_pad(image, cp, fill=-5.0)
    assert roi.shape == (3, 3, 3, 2)
    assert (roi[0] == -5).all() and (roi[:, 2] == -5).all() and (roi[1:, :2] == 1).all()
    geom = Geometry(np.diag([2.0, 3.0, 4.0, 1.0]), (4, 4, 4))
    roi_geom = cp.roi_geometry(geom)
    np.testing.assert_allclose(roi_geom.affine @ [0, 0, 0, 1], geom.affine @ [-1, 2, 0, 1])
    with pytest.raises(ValueError, match="source shape"):
        T.apply_crop_or_pad(np.ones((4, 4, 5)), cp)


# ----------------------------------------------------------------------------------------------------------


def test_z_normalize_hand_cases():
    img = np.array([0.0, 1.0, 2.0, 3.0], np.float32).reshape(1, 1, 4)
    np.testing.assert_allclose(T.z_normalize(img), [[[-2.0, -1.0, 0.0, 1.0]]])  # mean 2, unbiased std 1
    mask = np.array([True, True, False, False]).reshape(1, 1, 4)
    s = np.sqrt(0.5)
    np.testing.assert_allclose(T.z_normalize(img, mask), [[[-0.5 / s, 0.5 / s, 1.5 / s, 2.5 / s]]], rtol=1e-6)
    batch = np.array([[0.0, 1.0, 3.0], [0.0, 5.0, 7.0]], np.float32).reshape(2, 1, 1, 3)
    per_volume = T.z_normalize(batch)  # (1, 3): mean 2, std sqrt(2); (5, 7): mean 6, std sqrt(2)
    np.testing.assert_allclose(per_volume.ravel(), np.array([-2, -1, 1, -6, -1, 1]) / np.sqrt(2), rtol=1e-6)
    pooled = T.z_normalize(batch, batch_pooled=True)  # values 1, 3, 5, 7: mean 4, std sqrt(20 / 3)
    np.testing.assert_allclose(pooled.ravel(), (np.array([0, 1, 3, 0, 5, 7]) - 4) / np.sqrt(20 / 3), rtol=1e-6)
    assert pooled.dtype == np.float32


@pytest.mark.parametrize(
    "values, match",
    [
        ([0.0, -1.0, 0.0], "no voxel > 0"),
        ([0.0, 2.0, 2.0], "standard deviation is 0"),
        ([0.0, 2.0, 0.0], "standard deviation is 0"),  # one voxel: no unbiased std (torch would give NaN)
    ],
)
def test_z_normalize_errors_name_the_case(values, match):
    with pytest.raises(ValueError, match=f"{match}.* in case_007"):
        T.z_normalize(np.array(values, np.float32).reshape(1, 1, 3), name="case_007")


def test_clip_flip_and_foreground_rule():
    np.testing.assert_array_equal(T.clip_intensity(np.array([-3000.0, -5, 2500], np.float32)), [-1000, -5, 1000])
    np.testing.assert_array_equal(T.clip_intensity(np.array([0.0, 9.0], np.float32), 1, 2), [1, 2])
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    label = (image % 5 == 0).astype(np.uint8)
    for seed in range(8):
        draws = np.random.default_rng(seed).random(3) < 0.5
        img_f, lab_f = T.random_flip(np.random.default_rng(seed), image, label)
        axes = tuple(np.flatnonzero(draws))
        np.testing.assert_array_equal(img_f, np.flip(image, axes))
        np.testing.assert_array_equal(lab_f, np.flip(label, axes))  # the same flips on image and label
        assert img_f.flags.c_contiguous
    # Each axis flips about half of the time, independently: read the flips off the corner voxel's value.
    counts = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(400):
        corner = int(T.random_flip(rng, image)[0][0, 0, 0])
        counts += [corner >= 12, (corner % 12) // 4 == 2, corner % 4 == 3]
    assert np.all((counts > 160) & (counts < 240)), counts
    with pytest.raises(ValueError, match="spatial shapes differ"):
        T.random_flip(rng, image, label[:1])
    label = np.zeros((20, 10, 10), np.uint8)
    label.reshape(-1)[:1000] = 1
    assert not T.has_enough_foreground(label)
    label.reshape(-1)[1000] = 3
    assert T.has_enough_foreground(label)


def test_inference_roi_chain_and_paste_back():
    """Upstream inference order: resample -> RAS -> crop around the target; paste back = one nearest resample of the ROI
    onto the original grid (outside the ROI: 0). Blocky labels on a 0.75 mm LPS grid come back exactly."""
    rng = np.random.default_rng(4)
    coarse = np.zeros((10, 9, 8), np.uint8)
    coarse[3:7, 2:6, 2:5] = rng.integers(1, 3, (4, 4, 3))
    label = np.kron(coarse, np.ones((2, 2, 2), np.uint8))  # (20, 18, 16) at 0.75 mm
    affine = np.diag([-0.75, -0.75, 0.75, 1.0])
    affine[:3, 3] = [30.0, 12.0, -7.5]
    geom = Geometry(affine, label.shape)
    image = rng.random(label.shape).astype(np.float32)
    target = (label == 2).astype(np.uint8)
    img_r, grid = T.resample_to_spacing(image, geom, order=1)
    lab_r, _ = T.resample_to_spacing(target, geom, order=0)
    img_ras, ras_geom = reorient_to_ras(img_r, grid)
    lab_ras, _ = reorient_to_ras(lab_r, grid)
    assert ras_geom.shape == (10, 9, 8) and ras_geom.orientation == ("R", "A", "S")
    crop = T.crop_or_pad_box(lab_ras, (8, 8, 8))
    roi_label = T.apply_crop_or_pad(lab_ras, crop)
    roi_image = T.z_normalize(T.apply_crop_or_pad(img_ras, crop))
    assert roi_image.shape == (8, 8, 8) and roi_label.sum() == target.sum() // 8
    back = T.resample_to_geometry(roi_label, crop.roi_geometry(ras_geom), geom, order=0)
    np.testing.assert_array_equal(back, target)
