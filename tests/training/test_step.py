"""The train step: learning on a fixed batch, click masking without recompiles, the random prompt-less step, the
uniform click-count draw, per-sample clicks, 8-device and FSDP equivalence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import BATCH, FAST_COMPILE, STEP, TINY, build_step, run_steps
from sammed3d_jax.model.sam import Sam3D
from sammed3d_jax.training import step as step_lib


def _assert_states_close(a, b, atol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_loss_falls_on_a_fixed_batch(single_device_step, tiny_batch):
    mesh, fn, new_state, key = single_device_step
    state, history = run_steps(fn, new_state(), key, mesh, tiny_batch, 20)
    losses = np.array([m["loss"] for m in history])
    assert np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.8 * losses[:3].mean(), np.round(losses, 3)
    assert int(state.step) == 20 and int(history[-1]["updates"]) == 20 and int(state.skipped) == 0
    assert history[0]["dice_per_click"].shape == (STEP.max_clicks,)


def _loss_fn(cfg):
    return jax.jit(functools.partial(step_lib.interactive_loss, model=Sam3D(TINY), cfg=cfg),
                   compiler_options=FAST_COMPILE)


def _keys(batch, seed=3):
    return step_lib.sample_keys(jax.random.key(seed), jnp.asarray(batch["element"]))


def test_click_count_is_traced_and_masks_later_steps(tiny_batch, tiny_variables):
    variables = tiny_variables
    batch = {k: jnp.asarray(v[:2]) for k, v in tiny_batch.items()}
    keys = _keys(batch)
    long = _loss_fn(step_lib.StepConfig(max_clicks=3, min_clicks=1))
    short = _loss_fn(step_lib.StepConfig(max_clicks=2, min_clicks=1))
    none = jnp.int32(-1)
    results = {n: long(variables["params"], variables["buffers"], batch, keys, jnp.int32(n), none) for n in (1, 2, 3)}
    assert long._cache_size() == 1  # Three click counts, one compilation.
    loss2, aux2 = results[2]
    ref_loss, ref_aux = short(variables["params"], variables["buffers"], batch, keys, jnp.int32(2), none)
    np.testing.assert_allclose(loss2, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(aux2["loss_per_click"][:2], ref_aux["loss_per_click"], rtol=1e-6)
    assert aux2["loss_per_click"][2] == 0 and np.isnan(aux2["dice_per_click"][2])
    # One click = the last step = prompt-less: a different loss than the 2-click run's first step.
    assert results[1][0] != pytest.approx(float(aux2["loss_per_click"][0]))
    np.testing.assert_allclose(results[3][0], np.sum(results[3][1]["loss_per_click"]), rtol=1e-6)
    assert list(results[3][1]["prompt_less"]) == [False, False, True]


def test_random_prompt_less_step_fires_where_drawn(tiny_batch, tiny_variables):
    # Upstream's random prompt-less pass: with the insert step drawn at 1, step 1 runs without points. It must equal
    # a run whose click buffer is empty at that step, and differ from the same run without the insertion.
    v = tiny_variables
    batch = {k: jnp.asarray(v_[:2]) for k, v_ in tiny_batch.items()}
    keys = _keys(batch)
    cfg = step_lib.StepConfig(max_clicks=3, min_clicks=3, random_insert=(1, 1), prompt_less_last=False)
    fn = _loss_fn(cfg)
    _, with_insert = fn(v["params"], v["buffers"], batch, keys, jnp.int32(3), jnp.int32(1))
    _, without = fn(v["params"], v["buffers"], batch, keys, jnp.int32(3), jnp.int32(-1))
    assert list(with_insert["prompt_less"]) == [False, True, False]
    assert not np.any(without["prompt_less"])
    np.testing.assert_allclose(with_insert["loss_per_click"][0], without["loss_per_click"][0], rtol=1e-6)
    assert abs(float(with_insert["loss_per_click"][1]) - float(without["loss_per_click"][1])) > 1e-4
    # Step 1 prompt-less = the decoder called with an all-absent point row on step 0's mask.
    model = Sam3D(TINY)
    emb = model.apply(v, batch["image"], method=Sam3D.encode)
    low0 = jnp.zeros((2, TINY.low_res_size, TINY.low_res_size, TINY.low_res_size, 1))
    pts = jnp.zeros((2, 1, 3))
    pt0, lb0 = jax.vmap(lambda k, g: tuple(x[0] for x in step_lib.sample_click(
        jax.random.fold_in(k, 0), g[None] > 0, jnp.zeros_like(g[None], bool))))(keys, batch["label"])
    low1, _ = model.apply(v, emb, pt0[:, None], lb0[:, None], low0, method=Sam3D.decode)
    low2, _ = model.apply(v, emb, pts, jnp.full((2, 1), -2), low1, method=Sam3D.decode)
    from sammed3d_jax.model.sam import upsample_logits
    from sammed3d_jax.training import losses
    full = upsample_logits(low2.astype(jnp.float32), TINY.image_size)[..., 0]
    np.testing.assert_allclose(with_insert["loss_per_click"][1], losses.dice_ce_loss(full, batch["label"] > 0),
                               rtol=1e-4)


def test_click_count_and_insert_step_are_uniform():
    cfg = step_lib.StepConfig(max_clicks=11, min_clicks=3, random_insert=(2, 8))
    draws = jax.jit(jax.vmap(lambda k: step_lib.draw_interaction(k, cfg)))(
        jax.random.split(jax.random.key(0), 9000))
    counts = np.bincount(np.asarray(draws[0]), minlength=12)
    inserts = np.bincount(np.asarray(draws[1]), minlength=9)
    assert counts[:3].sum() == 0 and inserts[:2].sum() == 0
    # 9 values x 1000 expected draws each; 5 sigma of a binomial(9000, 1/9) is about 150.
    assert np.all(np.abs(counts[3:] - 1000) < 150), counts
    assert np.all(np.abs(inserts[2:] - 9000 / 7) < 160), inserts
    fixed = step_lib.StepConfig(max_clicks=4, min_clicks=4, random_insert=())
    assert [int(x) for x in step_lib.draw_interaction(jax.random.key(1), fixed)] == [4, -1]


def test_clicks_follow_the_sample_not_its_row(tiny_batch, tiny_variables):
    # Per-sample keys come from the global element index: permuting the rows permutes the results exactly, so
    # N-process training (other rows per process) draws the same clicks per sample as one process.
    v = tiny_variables
    batch = {k: jnp.asarray(x[:4]) for k, x in tiny_batch.items()}
    perm = np.array([2, 0, 3, 1])
    permuted = {k: x[perm] for k, x in batch.items()}
    fn = _loss_fn(step_lib.StepConfig(max_clicks=3, min_clicks=3, random_insert=()))
    _, a = fn(v["params"], v["buffers"], batch, _keys(batch), jnp.int32(3), jnp.int32(-1))
    _, b = fn(v["params"], v["buffers"], permuted, _keys(permuted), jnp.int32(3), jnp.int32(-1))
    # Drawn by row, the permuted batch would click elsewhere and the per-click losses (batch means) would move.
    np.testing.assert_allclose(b["loss_per_click"], a["loss_per_click"], rtol=1e-5)
    # The same rows with other element indices draw other clicks.
    other = {**batch, "element": batch["element"] + 100}
    _, c = fn(v["params"], v["buffers"], other, _keys(other), jnp.int32(3), jnp.int32(-1))
    assert np.max(np.abs(c["loss_per_click"] - a["loss_per_click"])) > 1e-4


def test_eight_devices_equal_one_device(single_device_step, replicated_8_device_run, tiny_batch):
    mesh1, fn1, new_state1, key1 = single_device_step
    ref_state, ref_hist = run_steps(fn1, new_state1(), key1, mesh1, tiny_batch, 2)
    mesh8, out_state, hist = replicated_8_device_run
    assert mesh8.size == 8 and BATCH % 8 == 0
    assert out_state.params["image_encoder"]["pos_embed"].sharding.mesh.size == 8
    for ref, got in zip(ref_hist, hist):
        for k in ("loss", "grad_norm", "dice_last"):
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    _assert_states_close(out_state, ref_state)


def test_fsdp_equals_replicated(replicated_8_device_run, tiny_batch, tiny_variables):
    mesh, out_r, hist_r = replicated_8_device_run
    fn_f, new_f, key = build_step(mesh, tiny_variables, rules=((".*", "fsdp"),))
    state_f = new_f()
    kernel = state_f.params["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # Really sharded: one eighth per device.
    assert {s.data.size for s in kernel.addressable_shards} == {kernel.size // 8}
    mu = state_f.opt_state.inner_opt_state[0].mu["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec  # Adam moments follow their parameter.
    out_f, hist_f = run_steps(fn_f, state_f, key, mesh, tiny_batch, 2)
    np.testing.assert_allclose([h["loss"] for h in hist_f], [h["loss"] for h in hist_r], rtol=1e-5)
    _assert_states_close(out_f, out_r)


def test_accumulated_clicks_differ_from_newest_only_after_the_first(tiny_batch, tiny_variables):
    batch = {k: jnp.asarray(v[:2]) for k, v in tiny_batch.items()}
    args = (tiny_variables["params"], tiny_variables["buffers"], batch, _keys(batch, 5), jnp.int32(2), jnp.int32(-1))
    per_click = []
    for accumulate in (False, True):
        cfg = step_lib.StepConfig(max_clicks=2, min_clicks=1, random_insert=(), prompt_less_last=False,
                                  accumulate_clicks=accumulate)
        fn = jax.jit(functools.partial(step_lib.interactive_loss, model=Sam3D(TINY), cfg=cfg),
                     compiler_options=FAST_COMPILE)
        per_click.append(fn(*args)[1]["loss_per_click"])
    newest, acc = per_click
    np.testing.assert_allclose(acc[0], newest[0], rtol=1e-6)  # One click so far: the same prompt.
    assert abs(float(acc[1]) - float(newest[1])) > 1e-6  # Both clicks vs the newest one.
