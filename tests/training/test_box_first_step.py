"""The box-prompted first step (``clicks.box_first_step``): box rows decode exactly as a box-only prompt, the other
rows exactly as today's click, in one program; and the option's config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from train_helpers import FAST_COMPILE, make_batch
from sammed3d_jax.data.clicks import sample_click
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.sam import Sam3D, init_variables, upsample_logits
from sammed3d_jax.training import losses, run_config, step as step_lib

TINY4 = ModelConfig.variant("tiny", num_point_embeddings=4)


def _numpy_boxes(label):
    out = []
    for row in label:
        idx = np.argwhere(row > 0)
        out.append(np.concatenate([idx.min(0), idx.max(0)]))  # inclusive corners, point order
    return np.asarray(out, np.float32)


def _with_box_corners(variables):
    """The session's tiny variables plus the two box-corner embeddings (N(0, 1), as the model initialises them)."""
    params = jax.tree.map(lambda x: x, variables["params"])
    corners = np.random.default_rng(0).standard_normal((2, 1, TINY4.prompt_embed_dim)).astype(np.float32)
    prompt = dict(params["prompt_encoder"])
    prompt["point_embeddings_2"] = {"embedding": jnp.asarray(corners[0])}
    prompt["point_embeddings_3"] = {"embedding": jnp.asarray(corners[1])}
    params["prompt_encoder"] = prompt
    return {"params": params, "buffers": variables["buffers"]}


def test_box_rows_decode_as_a_box_prompt_and_the_others_as_a_click(tiny_variables):
    variables = _with_box_corners(tiny_variables)
    # The tree matches a freshly initialised 4-embedding model's.
    fresh = jax.eval_shape(functools.partial(init_variables, TINY4), jax.random.key(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    host = make_batch(n=6, seed=1)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    keys = step_lib.sample_keys(jax.random.key(7), batch["element"])
    cfg = step_lib.StepConfig(max_clicks=1, min_clicks=1, random_insert=(), prompt_less_last=False,
                              box_first_step=0.5)
    model = Sam3D(TINY4)

    def both(params, buffers, batch, keys):
        loss, aux = step_lib.interactive_loss(params, buffers, batch, keys, jnp.int32(1), jnp.int32(-1),
                                              model=model, cfg=cfg)
        # The reference: every row decoded twice, from its first click as today and from a box-only prompt.
        v = {"params": params, "buffers": buffers}
        gt = batch["label"] > 0
        emb = model.apply(v, batch["image"], method=Sam3D.encode)
        low0 = jnp.zeros((gt.shape[0],) + (TINY4.low_res_size,) * 3 + (1,), jnp.float32)
        pt, lb = jax.vmap(lambda k, g: jax.tree.map(
            lambda x: x[0], sample_click(jax.random.fold_in(k, 0), g[None], jnp.zeros_like(g)[None])))(keys, gt)
        click, _ = model.apply(v, emb, pt[:, None].astype(jnp.float32), lb[:, None].astype(jnp.int32), low0,
                               method=Sam3D.decode)
        box, _ = model.apply(v, emb, None, None, low0, boxes=jnp.asarray(_numpy_boxes(host["label"])),
                             method=Sam3D.decode)
        return loss, aux, click, box

    loss, aux, click, box = jax.jit(both, compiler_options=FAST_COMPILE)(
        variables["params"], variables["buffers"], batch, keys)
    rows = np.asarray(aux["box_rows"])
    assert rows.any() and not rows.all(), rows  # a mixed batch: both kinds of row in one program
    np.testing.assert_array_equal(rows, step_lib.box_rows(keys, jnp.ones(6, bool), 0.5))
    boxes, present = step_lib.target_boxes(batch["label"] > 0)
    np.testing.assert_array_equal(boxes, _numpy_boxes(host["label"]))
    assert bool(present.all())
    # The two prompts give clearly different logits, so picking the wrong one per row would fail below.
    assert float(jnp.max(jnp.abs(click - box))) > 1e-2
    mixed = jnp.where(jnp.asarray(rows)[:, None, None, None, None], box, click)
    full = upsample_logits(mixed, host["image"].shape[1])[..., 0]
    expected = losses.dice_ce_loss(full, batch["label"] > 0, True)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_per_click"][0], expected, rtol=1e-5)


def test_target_boxes_of_an_empty_target_are_absent():
    gt = np.zeros((2, 8, 8, 8), bool)
    gt[0, 2:5, 3, 1:8] = True
    boxes, present = step_lib.target_boxes(jnp.asarray(gt))
    np.testing.assert_array_equal(boxes, [[2, 3, 1, 4, 3, 7], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(present, [True, False])


def _default_config(**overrides):
    c = load_config("default")
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def test_config_errors():
    run_config.validate(_default_config())  # the demo: both options on
    assert run_config.step_config(_default_config()).box_first_step == 0.25
    upstream = {"data.target_offset": 0.0, "clicks.box_first_step": 0.0, "model.num_point_embeddings": 2}
    run_config.validate(_default_config(**upstream))  # README's flags for the demo as upstream trains
    on = {"model.num_point_embeddings": 4, "clicks.box_first_step": 0.5, "data.target_offset": 1.0}
    run_config.validate(_default_config(**on))  # the README's off-centre run
    assert run_config.step_config(_default_config(**on)).box_first_step == 0.5
    with pytest.raises(ValueError, match=r"^bad config: --config.clicks.box_first_step=0.5 needs a box-capable model "
                                         r"\(--config.model.num_point_embeddings=4\); this model has 2") as err:
        run_config.validate(_default_config(**{**on, "model.num_point_embeddings": 2}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"box_first_step is a probability in \[0, 1\], got 1.5"):
        run_config.validate(_default_config(**{"clicks.box_first_step": 1.5}))
    with pytest.raises(ValueError, match=r"--config.data.target_offset: must be in \[0, 1\]"):
        run_config.validate(_default_config(**{"data.target_offset": -0.1}))
    with pytest.raises(ValueError, match=r"--config.data.target_offset_prob: must be in \[0, 1\]"):
        run_config.validate(_default_config(**{"data.target_offset": 1.0, "data.target_offset_prob": 2.0}))
    with pytest.raises(ValueError, match=r"--config.data.offset_mode: must be one of 'uniform', 'target_voxel'"):
        run_config.validate(_default_config(**{"data.offset_mode": "gaussian"}))
    loss = functools.partial(step_lib.interactive_loss, model=Sam3D(ModelConfig.variant("tiny")),
                             cfg=step_lib.StepConfig(max_clicks=1, min_clicks=1, box_first_step=0.5))
    batch = {k: jnp.asarray(v) for k, v in make_batch(n=1).items()}
    with pytest.raises(ValueError, match="box_first_step needs a model with num_point_embeddings=4"):
        jax.eval_shape(loss, {}, {}, batch, jax.random.split(jax.random.key(0), 1), jnp.int32(1), jnp.int32(-1))
