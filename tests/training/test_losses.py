"""Loss and training-metric values against hand computations (MONAI DiceCELoss semantics, spec §4.3)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax.training import losses


def _volume(values, dtype=jnp.float32, shape=(2, 2, 2)):
    return jnp.asarray(np.asarray(values, np.float32).reshape((1, *shape)), dtype)


def test_zero_logits_by_hand():
    # p = 0.5 everywhere; 3 of 8 voxels are foreground.
    gt = _volume([1, 1, 1, 0, 0, 0, 0, 0], jnp.uint8)
    logits = jnp.zeros((1, 2, 2, 2))
    dice = (2 * 0.5 * 3 + 1e-5) / (8 * 0.25 + 3 + 1e-5)
    np.testing.assert_allclose(losses.dice_loss(logits, gt), [1 - dice], rtol=1e-6)
    np.testing.assert_allclose(losses.bce_with_logits(logits, gt), [math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(losses.dice_ce_loss(logits, gt), 1 - dice + math.log(2), rtol=1e-6)
    np.testing.assert_allclose(losses.dice_ce_loss(logits, gt, use_bce=False), 1 - dice, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_mean_matches_formula(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=4.0, size=(3, 4, 3, 5)).astype(np.float32)
    gt = (rng.random((3, 4, 3, 5)) > 0.6).astype(np.uint8)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    per_sample_dice = [1 - (2 * (p[i] * gt[i]).sum() + 1e-5) / ((p[i] ** 2).sum() + gt[i].sum() + 1e-5)
                       for i in range(3)]
    bce = -(gt * np.log(p) + (1 - gt) * np.log(1 - p)).mean()  # PyTorch BCEWithLogits, mean over all voxels.
    np.testing.assert_allclose(losses.dice_ce_loss(jnp.asarray(logits), jnp.asarray(gt)),
                               np.mean(per_sample_dice) + bce, rtol=1e-5)


def test_bce_is_finite_for_huge_logits():
    gt = _volume([1, 0, 1, 0, 1, 0, 1, 0], jnp.uint8)
    logits = _volume([1e4, -1e4, -1e4, 1e4, 50, -50, 0, 0])
    expected = (0 + 0 + 1e4 + 1e4 + 0 + 0 + 2 * math.log(2)) / 8
    np.testing.assert_allclose(losses.bce_with_logits(logits, gt), [expected], rtol=1e-5)


def test_dice_score_thresholds_logits_like_upstream_training():
    gt = _volume([1, 1, 0, 0, 0, 0, 0, 0], bool)
    # Logit 0.3 is probability 0.57 but below upstream's 0.5 *logit* threshold (quirk 8).
    logits = _volume([2.0, 0.3, 0.7, -1, -1, -1, -1, -1])
    np.testing.assert_allclose(losses.dice_score(logits, gt), [2 * 1 / (2 + 2)])
    np.testing.assert_allclose(losses.dice_score(logits, gt, threshold=0.0), [2 * 2 / (3 + 2)])
    empty = jnp.zeros((1, 2, 2, 2), bool)
    np.testing.assert_allclose(losses.dice_score(jnp.full((1, 2, 2, 2), -5.0), empty), [1.0])
