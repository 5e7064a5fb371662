"""Box prompts (the 4-point-embedding layout of upstream's challenge branch): parity with the box fixture, absent
box rows in a fixed-size prompt buffer, and the refusal of boxes by a 2-embedding model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax import parity, shapes
from sammed3d_jax.model import ModelConfig, Sam3D, init_variables

BOX_STAGES = {f"{k}_{s}" for k in ("sparse_embeddings", "low_res_masks", "iou") for s in ("pb", "b", "b_nomask", "p")}


@pytest.fixture(scope="module")
def box_rows(fixtures_dir):
    return parity.check_fixture(str(fixtures_dir / "upstream_box_tiny"))


def test_box_fixture_every_array_compared(box_rows, fixtures_dir):
    rows, unknown = box_rows
    assert unknown == []
    with np.load(fixtures_dir / "upstream_box_tiny" / "golden.npz") as g:
        outputs = set(g.files) - set(parity.INPUTS)
    assert {r.name for r in rows} == outputs == BOX_STAGES | {"image_embeddings"}


@pytest.mark.parametrize("name", sorted(BOX_STAGES | {"image_embeddings"}))
def test_box_stage_within_fixture_tolerance(box_rows, name):
    row = {r.name: r for r in box_rows[0]}[name]
    assert (row.rtol, row.atol) == parity.TOL  # the fixture README's tolerances; never loosen
    assert row.ok, f"{name}: max abs err {row.max_abs_err:.3e}"


@pytest.fixture(scope="module")
def tiny4():
    cfg = ModelConfig.variant("tiny", num_point_embeddings=4)
    variables = init_variables(cfg, jax.random.key(0))
    variables = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), variables)
    model = Sam3D(cfg)
    s, g4 = cfg.image_size, cfg.low_res_size
    vol = jax.random.normal(jax.random.key(2), (3, s, s, s, 1))
    emb = jax.jit(lambda v, x: model.apply(v, x, method=Sam3D.encode))(variables, vol)
    mask = jax.random.normal(jax.random.key(3), (3, g4, g4, g4, 1))
    return cfg, model, variables, emb, mask


@jax.jit
def _decode(variables, emb, points, labels, mask, boxes, present):
    cfg = ModelConfig.variant("tiny", num_point_embeddings=4)
    return Sam3D(cfg).apply(variables, emb, points, labels, mask, boxes=boxes, box_present=present,
                            method=Sam3D.decode)


def _one(model, variables, emb, points, labels, mask, boxes):
    """Upstream-style call for one row: points (None = no points) and box (None = no box) as given."""
    return jax.jit(lambda v: model.apply(v, emb, points, labels, mask, boxes=boxes, method=Sam3D.decode))(variables)


def test_absent_box_rows_mix_prompt_types_in_one_program(tiny4):
    """Row 0: clicks + box; row 1: clicks only (box absent); row 2: box only (all clicks absent). One call, one
    compiled program, each row equal to upstream's call for its own prompt type."""
    cfg, model, v, emb, mask = tiny4
    pts = jnp.array([[[3., 9., 30.], [17., 2., 5.], [0., 0., 0.]],
                     [[31., 0., 12.], [8., 8., 8.], [4., 4., 4.]],
                     [[1., 2., 3.], [5., 6., 7.], [9., 9., 9.]]])
    lab = jnp.array([[1, 0, shapes.ABSENT], [1, shapes.ABSENT, 0], [shapes.ABSENT] * 3], jnp.int32)
    boxes = jnp.array([[2., 3., 4., 20., 25., 30.], [0., 0., 0., 0., 0., 0.], [5., 1., 2., 28., 17., 31.]])
    present = jnp.array([True, False, True])
    got, got_iou = _decode(v, emb, pts, lab, mask, boxes, present)

    row = lambda r, x: x[r:r + 1]  # noqa: E731
    want0, _ = _one(model, v, row(0, emb), pts[0:1, :2], lab[0:1, :2], row(0, mask), boxes[0:1])
    want1, _ = _one(model, v, row(1, emb), pts[1:2, [0, 2]], lab[1:2, [0, 2]], row(1, mask), None)
    want2, want2_iou = _one(model, v, row(2, emb), None, None, row(2, mask), boxes[2:3])
    for r, want in enumerate((want0, want1, want2)):
        np.testing.assert_allclose(got[r], want[0], rtol=1e-5, atol=1e-5, err_msg=f"row {r}")
    np.testing.assert_allclose(got_iou[2], want2_iou[0], rtol=1e-5, atol=1e-5)
    # The box is really used where present, and really ignored where absent.
    other, _ = _decode(v, emb, pts, lab, mask, boxes.at[0, 3].add(9.0).at[1, 3].add(9.0), present)
    assert float(jnp.max(jnp.abs(other[0] - got[0]))) > 1e-3
    np.testing.assert_array_equal(other[1], got[1])


def test_no_box_and_no_clicks_is_the_prompt_less_call(tiny4):
    cfg, model, v, emb, mask = tiny4
    want, _ = jax.jit(lambda v: model.apply(v, emb, None, None, mask, method=Sam3D.decode))(v)
    pts = jnp.zeros((3, 2, 3))
    lab = jnp.full((3, 2), shapes.ABSENT, jnp.int32)
    got, _ = _decode(v, emb, pts, lab, mask, jnp.ones((3, 6)), jnp.zeros((3,), bool))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_box_corners_follow_the_challenge_branch(tiny4):
    """Corner tokens: PE of (box + 0.5) / size per corner plus point_embeddings 2 and 3; no padding point."""
    cfg, model, v, emb, mask = tiny4
    boxes = jnp.array([[2., 3., 4., 20., 25., 30.]] * 3)
    pts = jnp.array([[[5., 6., 7.]]] * 3)
    lab = jnp.ones((3, 1), jnp.int32)
    (_, _), inter = jax.jit(lambda v: model.apply(v, emb, pts, lab, mask, boxes=boxes, method=Sam3D.decode,
                                                  mutable=["intermediates"]))(v)
    sparse = inter["intermediates"]["sparse_embeddings"][0]
    valid = inter["intermediates"]["sparse_valid"][0]
    assert sparse.shape == (3, 4, cfg.prompt_embed_dim)  # point, padding point (masked), two corners
    np.testing.assert_array_equal(valid, [[True, False, True, True]] * 3)
    pe = v["params"]["prompt_encoder"]
    gauss = v["buffers"]["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"]
    for corner, coords in enumerate((boxes[0, :3], boxes[0, 3:])):
        p = 2 * np.pi * ((2 * (np.asarray(coords) + 0.5) / cfg.image_size - 1) @ np.asarray(gauss))
        want = np.concatenate([np.sin(p), np.cos(p), np.sin(p)]) + pe[f"point_embeddings_{2 + corner}"]["embedding"][0]
        np.testing.assert_allclose(sparse[0, 2 + corner], want, rtol=1e-5, atol=1e-5)


def test_two_embedding_model_refuses_boxes():
    cfg = ModelConfig.variant("tiny")
    v = init_variables(cfg, jax.random.key(0))
    assert "point_embeddings_2" not in v["params"]["prompt_encoder"]
    g = cfg.grid_size
    emb = jnp.zeros((1, g, g, g, cfg.prompt_embed_dim))
    with pytest.raises(ValueError, match="num_point_embeddings=4"):
        Sam3D(cfg).apply(v, emb, None, None, None, boxes=jnp.zeros((1, 6)), method=Sam3D.decode)
    with pytest.raises(ValueError, match="num_point_embeddings must be 2"):
        ModelConfig.variant("tiny", num_point_embeddings=3)
