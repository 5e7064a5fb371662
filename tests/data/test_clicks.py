"""Click simulation: the label rule, exact uniformity, fallbacks, determinism, jit/vmap, the "ritm" rule and its EDT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp
from scipy import ndimage, stats

from sammed3d_jax.data import clicks
from sammed3d_jax.shapes import ABSENT, NEGATIVE, POSITIVE

SHAPE = (3, 4, 5, 3)  # one fixed shape, so every hypothesis example reuses one compilation
_sample = jax.jit(clicks.sample_click)
_ritm = jax.jit(clicks.sample_click_ritm)
N_DRAWS = 3000  # one vmapped compilation serves both uniformity tests
_draw_many = jax.jit(jax.vmap(clicks.sample_click, in_axes=(0, None, None)))  # many keys, one (gt, pred)


def _padded_edt(mask, spacing=(1.0, 1.0, 1.0)):
    """scipy reference: EDT with background outside the volume (pad one zero voxel, crop back)."""
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]


def _check_random_rule(gt, pred, points, labels):
    for row in range(gt.shape[0]):
        g, p = gt[row], pred[row]
        error = g ^ p
        point = tuple(int(v) for v in points[row])
        assert np.array_equal(points[row], np.array(point, np.float32))
        if error.any():
            assert error[point], "click outside the error region"
            assert labels[row] == (POSITIVE if g[point] else NEGATIVE)
        elif g.any():
            assert g[point] and labels[row] == POSITIVE
        else:
            assert labels[row] == ABSENT
            assert point == tuple(s // 2 for s in g.shape)


@settings(max_examples=60, deadline=None)
@given(gt=hnp.arrays(bool, SHAPE), pred=hnp.arrays(bool, SHAPE), seed=hnp.from_dtype(np.dtype(np.uint32)))
def test_random_click_lies_in_error_and_label_is_gt(gt, pred, seed):
    points, labels = _sample(jax.random.key(int(seed)), jnp.asarray(gt), jnp.asarray(pred))
    assert points.dtype == jnp.float32 and labels.dtype == jnp.int32
    _check_random_rule(gt, pred, np.asarray(points), np.asarray(labels))


@settings(max_examples=40, deadline=None)
@given(gt=hnp.arrays(bool, SHAPE), pred=hnp.arrays(bool, SHAPE), seed=hnp.from_dtype(np.dtype(np.uint32)))
def test_ritm_click_lies_in_interior_of_larger_error(gt, pred, seed):
    points, labels = map(np.asarray, _ritm(jax.random.key(int(seed)), jnp.asarray(gt), jnp.asarray(pred)))
    for row in range(SHAPE[0]):
        g, p = gt[row], pred[row]
        fn, fp = g & ~p, p & ~g
        point = tuple(int(v) for v in points[row])
        if not (fn | fp).any():
            assert (labels[row] == POSITIVE and g[point]) if g.any() else labels[row] == ABSENT
            continue
        # At unit spacing squared distances are integers, so float32 (JAX) and float64 (scipy) order them alike.
        dt_fn, dt_fp = _padded_edt(fn), _padded_edt(fp)
        positive = dt_fn.max() > dt_fp.max()
        chosen = dt_fn if positive else dt_fp
        assert chosen[point] > max(dt_fn.max(), dt_fp.max()) / 2
        assert labels[row] == (POSITIVE if positive else NEGATIVE) == (POSITIVE if fn[point] else NEGATIVE)


def _chi_square_p(draws, support):
    counts = np.array([np.sum(np.all(draws == np.array(v), axis=1)) for v in support])
    assert counts.sum() == len(draws), "a draw fell outside the support"
    return stats.chisquare(counts).pvalue


def test_random_click_is_uniform_over_error_region():
    # On 3x5x7 the sampler uses 15 blocks of 7 voxels; the 20 error voxels spread over many of them.
    rng = np.random.default_rng(0)
    gt = rng.random((1, 3, 5, 7)) < 0.5
    pred = gt.copy()
    flip = rng.choice(105, size=20, replace=False)
    pred.reshape(-1)[flip] ^= True
    points, labels = _draw_many(jax.random.split(jax.random.key(1234), N_DRAWS), jnp.asarray(gt), jnp.asarray(pred))
    points, labels = np.asarray(points)[:, 0].astype(int), np.asarray(labels)[:, 0]
    support = [tuple(v) for v in np.argwhere(gt[0] ^ pred[0])]
    assert len(support) == 20
    assert _chi_square_p(points, support) > 1e-3
    assert np.array_equal(labels, gt[0][tuple(points.T)].astype(np.int32))


def test_first_click_is_uniform_over_target():
    gt = np.zeros((1, 3, 5, 7), bool)
    gt[0, 1:3, 2:5, 3:7] = True
    # Upstream's first step: zero logits, i.e. an empty prediction under either threshold.
    pred = jnp.zeros((1, 3, 5, 7), bool)
    points, labels = _draw_many(jax.random.split(jax.random.key(7), N_DRAWS), jnp.asarray(gt), pred)
    assert np.all(np.asarray(labels) == POSITIVE)
    assert _chi_square_p(np.asarray(points)[:, 0].astype(int), [tuple(v) for v in np.argwhere(gt[0])]) > 1e-3


def test_fallbacks_and_absent():
    gt = np.zeros(SHAPE, bool)
    gt[0, 1, 2, 2] = True  # perfect prediction: the only gt voxel, positive
    pred = gt.copy()
    pred[2, 0, 0, 1] = True  # empty gt, one false positive: negative click there
    for fn in (_sample, _ritm):
        points, labels = fn(jax.random.key(0), jnp.asarray(gt), jnp.asarray(pred))
        np.testing.assert_array_equal(np.asarray(points), [[1, 2, 2], [2, 2, 1], [0, 0, 1]])
        np.testing.assert_array_equal(np.asarray(labels), [POSITIVE, ABSENT, NEGATIVE])


def test_deterministic_for_a_key():
    rng = np.random.default_rng(5)
    gt, pred = (jnp.asarray(rng.random(SHAPE) < 0.3) for _ in range(2))
    key = jax.random.key(11)
    first = _sample(key, gt, pred)
    # A second call and a fresh compilation give the same click for the same key.
    for out in (_sample(key, gt, pred), jax.jit(lambda k, g, p: clicks.sample_click(k, g, p))(key, gt, pred)):
        for a, b in zip(out, first, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    others = {tuple(np.asarray(_sample(jax.random.key(s), gt, pred)[0]).ravel()) for s in range(8)}
    assert len(others) > 1, "different keys must give different clicks"


def test_vmap_over_leading_axis_matches_single_calls():
    rng = np.random.default_rng(6)
    gt, pred = (jnp.asarray(rng.random((2, *SHAPE)) < 0.4) for _ in range(2))
    keys = jax.random.split(jax.random.key(2), 2)
    for fn, single in ((clicks.sample_click, _sample), (clicks.sample_click_ritm, _ritm)):
        points, labels = jax.jit(jax.vmap(fn))(keys, gt, pred)
        for i in range(2):
            p, lab = single(keys[i], gt[i], pred[i])
            np.testing.assert_array_equal(np.asarray(points[i]), np.asarray(p))
            np.testing.assert_array_equal(np.asarray(labels[i]), np.asarray(lab))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 2.5, 0.7), (3.0, 1.0, 1.5)])
def test_edt_matches_scipy(spacing):
    rng = np.random.default_rng(int(spacing[1] * 10))
    masks = np.stack(
        [
            ndimage.binary_dilation(rng.random((9, 11, 7)) < 0.03, iterations=2),
            rng.random((9, 11, 7)) < 0.8,
            np.ones((9, 11, 7), bool),
            np.zeros((9, 11, 7), bool),
        ]
    )
    out = np.asarray(jax.jit(clicks.euclidean_distance_transform, static_argnums=1)(jnp.asarray(masks), spacing))
    for mask, dt in zip(masks, out, strict=True):
        np.testing.assert_allclose(dt, _padded_edt(mask, spacing), rtol=1e-6, atol=1e-6)


def test_edt_rejects_bad_spacing():
    with pytest.raises(ValueError, match="spacing_mm"):
        clicks.euclidean_distance_transform(jnp.ones((1, 2, 2, 2), bool), (1.0, 0.0, 1.0))


@pytest.mark.parametrize("larger", ["fn", "fp"])
def test_ritm_clicks_centre_of_largest_error(larger):
    big = np.zeros((2, 24, 24, 24), bool)
    big[:, 5:16, 5:16, 5:16] = True  # 11^3 block, max dt 6 at its centre voxel (10, 10, 10)
    small = np.zeros_like(big)
    small[:, 20:22, 3:5, 3:5] = True  # 2^3 block, max dt 1
    gt, pred = (big, small) if larger == "fn" else (small, big)
    points, labels = _ritm(jax.random.key(9), jnp.asarray(gt), jnp.asarray(pred))
    expected = POSITIVE if larger == "fn" else NEGATIVE
    np.testing.assert_array_equal(np.asarray(labels), [expected, expected])
    # dt > 6/2 inside the block keeps only voxels at offset <= 2 from its centre along every axis.
    offsets = np.abs(np.asarray(points) - 10)
    assert np.all(offsets <= 2)
    assert np.all(_padded_edt(big[0])[tuple(np.asarray(points, int).T)] > 3)


_ritm_many = jax.jit(jax.vmap(clicks.sample_click_ritm, in_axes=(0, None, None)))


def test_ritm_ties_go_to_the_false_positives_and_the_threshold_is_strict():
    """Equal largest distances pick the false positives (upstream's strict '>'); dt == max/2 is not interior."""
    gt = np.zeros((1, 14, 14, 14), bool)
    pred = np.zeros_like(gt)
    gt[0, 1:4, 1:4, 1:4] = True  # false negatives: a 3^3 block, max dt 2 at its centre (2, 2, 2)
    pred[0, 8:11, 8:11, 8:11] = True  # false positives: the same block elsewhere, centre (9, 9, 9)
    keys = jax.random.split(jax.random.key(0), 64)
    points, labels = map(np.asarray, _ritm_many(keys, jnp.asarray(gt), jnp.asarray(pred)))
    # Every voxel but the centre has dt == 1 == max/2 exactly, so the strict threshold leaves only the centre.
    assert np.all(labels == NEGATIVE)
    np.testing.assert_array_equal(points[:, 0], np.tile([9.0, 9.0, 9.0], (64, 1)))
    # A larger false-negative error (a 5^3 block, max dt 3 > 2) takes the click back.
    gt[0, 1:6, 1:6, 1:6] = True
    points, labels = map(np.asarray, _ritm_many(keys, jnp.asarray(gt), jnp.asarray(pred)))
    assert np.all(labels == POSITIVE)
    # dt > 3/2 inside the 5^3 block: the 3^3 core around (3, 3, 3) (core voxels have dt >= 2).
    assert np.all(np.abs(points[:, 0] - 3) <= 1) and len({tuple(p) for p in points[:, 0]}) > 4
