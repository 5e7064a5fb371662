"""Model-level checks: released layout and size, prompt semantics (ABSENT slots, prompt-less rows), upsampling,
dtype policy, config parsing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax import shapes
from sammed3d_jax.model import ModelConfig, Sam3D, count_params, init_variables, upsample_logits


def test_vit_b_ori_size_without_memory(fixtures_dir):
    cfg = ModelConfig.variant("vit_b_ori")
    v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    assert count_params(v["params"]) == 100_509_232
    assert {k: count_params(x) for k, x in v["params"].items()} == {
        "image_encoder": 92_924_928, "prompt_encoder": 8_668, "mask_decoder": 7_575_636}
    gauss = v["buffers"]["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"]
    assert gauss.shape == (3, 128)
    layout = json.loads((fixtures_dir / "vit_b_ori_keys.json").read_text())
    assert ModelConfig.from_dict(layout["builder_args"]) == cfg
    params = [e for e in layout["keys"] if e["kind"] == "parameter"]
    assert sum(int(np.prod(e["shape"])) for e in params) == 100_509_232
    # Windowed blocks carry 27-row tables, global blocks 15-row ones.
    blocks = v["params"]["image_encoder"]
    assert blocks["blocks_0"]["attn"]["rel_pos_d"].shape == (27, 64)
    assert blocks["blocks_2"]["attn"]["rel_pos_d"].shape == (15, 64)


def test_encode_decode_shapes_vit_b_ori():
    cfg = ModelConfig.variant("vit_b_ori")
    model = Sam3D(cfg)
    v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    emb = jax.eval_shape(lambda v, x: model.apply(v, x, method=Sam3D.encode), v,
                         jax.ShapeDtypeStruct((2, 128, 128, 128, 1), jnp.float32))
    assert emb.shape == (2, 8, 8, 8, 384)
    low, iou = jax.eval_shape(
        lambda v, e: model.apply(v, e, jnp.zeros((2, 3, 3)), jnp.ones((2, 3), jnp.int32),
                                 jnp.zeros((2, 32, 32, 32, 1)), method=Sam3D.decode), v, emb)
    assert (low.shape, low.dtype, iou.shape) == ((2, 32, 32, 32, 1), jnp.float32, (2, 1))


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.variant("tiny")
    variables = init_variables(cfg, jax.random.key(0))
    # Non-zero pos/rel-pos tables so that nothing is trivially symmetric.
    variables = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), variables)
    model = Sam3D(cfg)
    vol = jax.random.normal(jax.random.key(1), (2, cfg.image_size, cfg.image_size, cfg.image_size, 1))
    emb = jax.jit(lambda v, x: model.apply(v, x, method=Sam3D.encode))(variables, vol)
    return cfg, model, variables, emb


def _decode(model, variables, emb, points, labels, mask):
    return jax.jit(lambda v, e, p, l, m: model.apply(v, e, p, l, m, method=Sam3D.decode))(
        variables, emb, points, labels, mask)


def test_absent_slots_equal_exactly_the_present_points(tiny):
    cfg, model, v, emb = tiny
    g4 = cfg.low_res_size
    mask = jax.random.normal(jax.random.key(2), (2, g4, g4, g4, 1))
    pts = jnp.array([[[3., 9., 30.], [17., 2., 5.]], [[31., 0., 12.], [8., 8., 8.]]])
    lab = jnp.array([[1, 0], [1, shapes.NOT_A_POINT]], jnp.int32)
    want, want_iou = _decode(model, v, emb, pts, lab, mask)
    # Same clicks in a 5-slot buffer, ABSENT slots interleaved.
    buf = jnp.zeros((2, 5, 3)).at[:, 1].set(pts[:, 0]).at[:, 3].set(pts[:, 1])
    buf_lab = jnp.full((2, 5), shapes.ABSENT, jnp.int32).at[:, 1].set(lab[:, 0]).at[:, 3].set(lab[:, 1])
    got, got_iou = _decode(model, v, emb, buf, buf_lab, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_iou, want_iou, rtol=1e-5, atol=1e-5)
    # ABSENT slots must not be ignored by accident: a real point there changes the result.
    other, _ = _decode(model, v, emb, buf, buf_lab.at[:, 0].set(shapes.POSITIVE), mask)
    assert float(jnp.max(jnp.abs(other - want))) > 1e-3


def test_all_absent_row_is_the_prompt_less_call(tiny):
    cfg, model, v, emb = tiny
    g4 = cfg.low_res_size
    mask = jax.random.normal(jax.random.key(3), (2, g4, g4, g4, 1))
    want, _ = jax.jit(lambda v, e, m: model.apply(v, e, None, None, m, method=Sam3D.decode))(v, emb, mask)
    pts = jnp.full((2, 2, 3), 5.0)
    lab = jnp.array([[shapes.ABSENT, shapes.ABSENT], [shapes.POSITIVE, shapes.ABSENT]], jnp.int32)
    got, _ = _decode(model, v, emb, pts, lab, mask)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got[1] - want[1]))) > 1e-3  # row 1 has a click


def test_upsampling_matches_the_trilinear_stencil():
    """torch trilinear, align_corners=False, x4: o = 4m + r uses (.375,.625), (.125,.875), (.875,.125), (.625,.375)."""
    x = np.random.default_rng(0).normal(size=(5,)).astype(np.float32)
    xp = np.concatenate([x[:1], x, x[-1:]])  # x[-1] := x[0], x[n] := x[n-1]
    want = []
    for m in range(5):
        a, b, c = xp[m], xp[m + 1], xp[m + 2]
        want += [.375 * a + .625 * b, .125 * a + .875 * b, .875 * b + .125 * c, .625 * b + .375 * c]
    vol = np.broadcast_to(x[:, None, None], (5, 2, 2)).reshape(1, 5, 2, 2, 1)
    got = upsample_logits(jnp.asarray(vol), 20)  # non-cubic input is fine for the helper; only axis 0 varies
    np.testing.assert_allclose(np.asarray(got)[0, :, 0, 0, 0], np.array(want), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = ModelConfig.variant("tiny", dtype="bfloat16")
    v = init_variables(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v))
    model = Sam3D(cfg)
    s = cfg.image_size
    vol = jnp.ones((1, s, s, s, 1))

    @jax.jit
    def run(v, vol):
        emb = model.apply(v, vol, method=Sam3D.encode)
        low, iou = model.apply(v, emb, jnp.zeros((1, 1, 3)), jnp.ones((1, 1), jnp.int32),
                               jnp.zeros((1, s // 2, s // 2, s // 2, 1)), method=Sam3D.decode)
        return emb, low, iou, model.apply(v, method=Sam3D.dense_pe)

    emb, low, iou, pe = run(v, vol)
    assert emb.dtype == jnp.bfloat16 and low.dtype == jnp.float32 and iou.dtype == jnp.float32
    assert pe.dtype == jnp.float32


def test_remat_changes_nothing_numerically(tiny):
    cfg, model, v, emb = tiny
    s = cfg.image_size
    vol = jax.random.normal(jax.random.key(1), (2, s, s, s, 1))
    remat = Sam3D(cfg.replace(remat_encoder_blocks=True))
    got = jax.jit(lambda v, x: remat.apply(v, x, method=Sam3D.encode))(v, vol)
    np.testing.assert_allclose(got, emb, rtol=1e-6, atol=1e-6)


def test_config_from_fixture_and_errors(tiny_fixture_dir, tmp_path):
    cfg = ModelConfig.from_json(tiny_fixture_dir / "config.json")
    assert (cfg.image_size, cfg.encoder_depth, cfg.encoder_global_attn_indexes, cfg.iou_head_hidden_dim) == (
        64, 4, (1, 3), 32)
    bad = json.loads((tiny_fixture_dir / "config.json").read_text()) | {"decoder_transformer_mlp_activation": "gelu"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json.*decoder_transformer_mlp_activation"):
        ModelConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"image_size": 64, "encoder_widht": 3})
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(image_size=100)
    with pytest.raises(ValueError, match="unknown model variant"):
        ModelConfig.variant("vit_g")
