"""Optimizer: AdamW groups and lr multipliers, frozen params, accumulation, non-finite skips, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax.training import optim

LR, WD, EPS = 1e-2, 0.1, 1e-8


def _tree(value):
    return {
        "image_encoder": {"w": jnp.full((2, 3), value)},
        "prompt_encoder": {"point_embeddings_0": {"embedding": jnp.full((1, 3), value)},
                           "no_mask_embed": {"embedding": jnp.full((1, 3), value)}},
        "mask_decoder": {"w": jnp.full((3,), value), "iou_prediction_head": {"layers_0": {"kernel": jnp.full((3,),
                                                                                                          value)}}},
    }


def _first_adamw_update(g, p, lr):
    # Bias-corrected first Adam step: m_hat = g, v_hat = g^2; PyTorch AdamW: -lr * (m/(sqrt(v)+eps) + wd * p).
    return -lr * (g / (abs(g) + EPS) + WD * p)


def test_groups_scale_lr_and_decay_and_frozen_params_stay():
    tx = optim.make_optimizer(optim.OptimConfig(lr=LR, weight_decay=WD, eps=EPS, schedule="constant")).tx
    params, grads = _tree(2.0), _tree(0.5)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    full = _first_adamw_update(0.5, 2.0, LR)
    np.testing.assert_allclose(updates["image_encoder"]["w"], full, rtol=1e-5)
    np.testing.assert_allclose(updates["prompt_encoder"]["point_embeddings_0"]["embedding"], 0.1 * full, rtol=1e-5)
    np.testing.assert_allclose(updates["mask_decoder"]["w"], 0.1 * full, rtol=1e-5)
    # Upstream's IoU head and no_mask_embed never get a gradient, so PyTorch's AdamW never touches them.
    assert not np.any(updates["mask_decoder"]["iou_prediction_head"]["layers_0"]["kernel"])
    assert not np.any(updates["prompt_encoder"]["no_mask_embed"]["embedding"])


def test_accumulation_averages_micro_batches_then_steps_once():
    tx = optim.make_optimizer(optim.OptimConfig(lr=LR, accum_steps=2, schedule="constant", weight_decay=0.0)).tx
    params = {"image_encoder": {"w": jnp.ones((2,))}}
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, state = update({"image_encoder": {"w": jnp.array([1.0, -3.0])}}, state, params)
    assert not np.any(u1["image_encoder"]["w"]) and int(optim.update_count(state)) == 0
    u2, state = update({"image_encoder": {"w": jnp.array([3.0, 1.0])}}, state, params)
    assert int(optim.update_count(state)) == 1
    mean = np.array([2.0, -1.0])
    np.testing.assert_allclose(u2["image_encoder"]["w"], -LR * mean / (np.abs(mean) + EPS), rtol=1e-5)


def test_non_finite_micro_batch_is_skipped_and_reported():
    tx = optim.make_optimizer(optim.OptimConfig(lr=LR, accum_steps=1, schedule="constant")).tx
    params = {"image_encoder": {"w": jnp.ones((2,))}}
    state = tx.init(params)
    bad = {"image_encoder": {"w": jnp.array([jnp.nan, 1.0])}}
    update = jax.jit(tx.update)
    updates, new_state = update(bad, state, params)
    assert not np.any(updates["image_encoder"]["w"])
    assert int(optim.skipped_this_step(new_state)) == 1 and int(optim.update_count(new_state)) == 0
    # The skipped micro-batch left no trace: the next good step is the first Adam step.
    good = {"image_encoder": {"w": jnp.array([0.5, 0.5])}}
    updates, new_state = update(good, new_state, params)
    np.testing.assert_allclose(updates["image_encoder"]["w"], _first_adamw_update(0.5, 1.0, LR), rtol=1e-5)
    assert int(optim.skipped_this_step(new_state)) == 0


@pytest.mark.parametrize("clip,expected_grad", [(1.0, [0.6, 0.8]), (0.0, [3.0, 4.0])])
def test_clipping_bounds_the_gradient_norm(clip, expected_grad):
    # eps = 1 makes the first Adam step g / (|g| + 1), which reveals the magnitude of the (clipped) gradient.
    cfg = optim.OptimConfig(lr=1.0, schedule="constant", clip_grad_norm=clip, weight_decay=0.0, eps=1.0,
                            lr_multipliers=(), frozen=())
    tx = optim.make_optimizer(cfg).tx
    params = {"w": jnp.zeros((2,))}
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    g = np.asarray(expected_grad)
    np.testing.assert_allclose(updates["w"], -g / (g + 1.0), rtol=1e-5)


@pytest.mark.parametrize("count,expected", [(0, 1.0), (9, 1.0), (10, 0.1), (29, 0.1), (30, 0.01)])
def test_multistep_schedule(count, expected):
    schedule = optim.make_schedule(optim.OptimConfig(lr=1.0, schedule="multistep", milestones=(10, 30)))
    np.testing.assert_allclose(schedule(jnp.asarray(count)), expected, rtol=1e-5)


def test_warmup_then_cosine():
    cfg = optim.OptimConfig(lr=2.0, schedule="cosine", warmup_steps=4, total_steps=14, final_lr_fraction=0.1)
    schedule = optim.make_schedule(cfg)
    np.testing.assert_allclose([schedule(jnp.asarray(c)) for c in (0, 2, 4, 14)], [0.0, 1.0, 2.0, 0.2], rtol=1e-5)
    warm_multistep = optim.make_schedule(optim.OptimConfig(lr=1.0, warmup_steps=2, milestones=(5,)))
    np.testing.assert_allclose([warm_multistep(jnp.asarray(c)) for c in (0, 1, 2, 5)], [0.0, 0.5, 1.0, 0.1],
                               rtol=1e-5)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="schedule"):
        optim.OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="accum_steps"):
        optim.OptimConfig(accum_steps=0)


def test_lr_multiplier_paths():
    cfg = optim.OptimConfig()
    assert optim.lr_multiplier("image_encoder/blocks_0/attn/qkv/kernel", cfg) == 1.0
    assert optim.lr_multiplier("mask_decoder/output_upscaling_0/kernel", cfg) == 0.1
    assert optim.lr_multiplier("mask_decoder/iou_prediction_head/layers_0/bias", cfg) == 0.0
    assert optim.lr_multiplier("prompt_encoder/no_mask_embed/embedding", cfg) == 0.0
    # Plain nested tuples, so the config hashes (a static jit argument) and equal configs hash alike.
    assert type(cfg.lr_multipliers) is tuple and all(type(r) is tuple for r in cfg.lr_multipliers)
    assert hash(cfg) == hash(optim.OptimConfig()) and cfg == optim.OptimConfig()
