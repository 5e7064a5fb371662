"""The conversion table: full vit_b_ori layout, agreement with the model's tree, exact transforms and round trips,
and one error listing every problem."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sammed3d_jax.checkpoint.pth_reader import read_state_dict
from sammed3d_jax.checkpoint.torch_convert import (ConversionError, conversion_table, count_parameters,
                                                   flax_to_torch, torch_to_flax)
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.sam import init_variables


@pytest.fixture(scope="module")
def tiny_cfg(tiny_fixture_dir):
    return ModelConfig.from_json(tiny_fixture_dir / "config.json")


@pytest.fixture(scope="module")
def weights(tiny_fixture_dir):
    with np.load(tiny_fixture_dir / "weights.npz") as z:
        return {k: z[k] for k in z.files}


def _flat_shapes(tree, prefix=()):
    if isinstance(tree, dict):
        return {p: s for k, v in tree.items() for p, s in _flat_shapes(v, (*prefix, k)).items()}
    return {prefix: (tuple(tree.shape), np.dtype(tree.dtype))}


def _model_shapes(cfg):
    return _flat_shapes(jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0))))


def _table_shapes(cfg):
    return {e.flax_path: (e.flax_shape, np.dtype(np.float32)) for e in conversion_table(cfg)}


def test_vit_b_ori_table_is_the_released_layout(fixtures_dir):
    spec = json.loads((fixtures_dir / "vit_b_ori_keys.json").read_text())
    table = conversion_table(ModelConfig.variant("vit_b_ori"))
    assert [(e.torch_key, list(e.torch_shape)) for e in table] == [(k["name"], k["shape"]) for k in spec["keys"]]
    assert len(table) == spec["num_entries"] == 324
    params = sum(int(np.prod(e.torch_shape)) for e in table if e.collection == "params")
    buffers = sum(int(np.prod(e.torch_shape)) for e in table if e.collection == "buffers")
    assert (params, buffers) == (100_509_232, 384) == (spec["total_parameters"], spec["total_buffer_elements"])
    assert {e.torch_key for e in table if e.collection == "buffers"} == {
        k["name"] for k in spec["keys"] if k["kind"] == "buffer"}


@pytest.mark.parametrize("variant", ["vit_b_ori", "fixture", "box_fixture", "tiny"])
def test_table_matches_the_model_tree(variant, tiny_cfg, fixtures_dir):
    # eval_shape: the full vit_b_ori tree is checked without allocating its 400 MB.
    if variant == "box_fixture":
        cfg = ModelConfig.from_json(fixtures_dir / "upstream_box_tiny" / "config.json")
        assert cfg.num_point_embeddings == 4
    else:
        cfg = tiny_cfg if variant == "fixture" else ModelConfig.variant(variant)
    assert _model_shapes(cfg) == _table_shapes(cfg)


def test_box_fixture_table_is_its_state_dict(fixtures_dir):
    box = fixtures_dir / "upstream_box_tiny"
    cfg = ModelConfig.from_json(box / "config.json")
    with np.load(box / "weights.npz") as z:
        want = [(k, z[k].shape) for k in z.files]
    assert [(e.torch_key, e.torch_shape) for e in conversion_table(cfg)] == want  # names, shapes and order
    state = read_state_dict(box / "checkpoint.pth")
    back = flax_to_torch(torch_to_flax(state, cfg), cfg)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)


def test_fixture_converts_with_exact_transforms(tiny_cfg, weights):
    variables = torch_to_flax(weights, tiny_cfg)
    p = variables["params"]
    assert count_parameters(variables) == {"parameters": 1_389_274, "buffer_elements": 48, "leaves": 204}
    leaves = jax.tree_util.tree_leaves(variables)
    assert all(x.dtype == np.float32 and x.flags.c_contiguous for x in leaves)
    qkv = weights["image_encoder.blocks.0.attn.qkv.weight"]
    assert np.array_equal(p["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"], qkv.T)
    # Conv3d (out, in, k0, k1, k2) -> (k0, k1, k2, in, out), no spatial permutation or flip.
    conv = weights["image_encoder.neck.2.weight"]
    kernel = p["image_encoder"]["neck_2"]["kernel"]
    assert kernel[0, 1, 2, 5, 7] == conv[7, 5, 0, 1, 2] and kernel[2, 0, 1, 3, 4] == conv[4, 3, 2, 0, 1]
    # ConvTranspose3d (in, out, k0, k1, k2) -> (k0, k1, k2, in, out), no flip.
    convt = weights["mask_decoder.output_upscaling.0.weight"]
    kernel = p["mask_decoder"]["output_upscaling_0"]["kernel"]
    assert kernel[1, 0, 1, 9, 3] == convt[9, 3, 1, 0, 1] and kernel[0, 1, 1, 40, 11] == convt[40, 11, 0, 1, 1]
    assert np.array_equal(p["image_encoder"]["neck_1"]["scale"], weights["image_encoder.neck.1.weight"])
    assert np.array_equal(p["mask_decoder"]["mask_tokens"]["embedding"], weights["mask_decoder.mask_tokens.weight"])
    assert np.array_equal(variables["buffers"]["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"],
                          weights["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])


def test_checkpoint_pth_converts_to_the_same_tree_as_weights_npz(tiny_fixture_dir, tiny_cfg, weights):
    from_pth = torch_to_flax(read_state_dict(tiny_fixture_dir / "checkpoint.pth"), tiny_cfg)
    from_npz = torch_to_flax(weights, tiny_cfg)
    assert jax.tree_util.tree_structure(from_pth) == jax.tree_util.tree_structure(from_npz)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(from_pth),
                                                    jax.tree_util.tree_leaves(from_npz)))


def test_round_trip_is_bit_exact_in_upstream_order(tiny_cfg, weights):
    back = flax_to_torch(torch_to_flax(weights, tiny_cfg), tiny_cfg)
    assert list(back) == list(weights)
    for k, want in weights.items():
        assert back[k].dtype == np.float32 and back[k].flags.c_contiguous and np.array_equal(back[k], want), k


def test_one_error_lists_every_problem(tiny_cfg, weights):
    bad = dict(weights)
    del bad["image_encoder.neck.0.weight"]
    bad["image_encoder.blocks.9.norm1.weight"] = np.zeros(96, np.float32)
    bad["mask_decoder.iou_token.weight"] = np.zeros((2, 48), np.float32)
    bad["prompt_encoder.no_mask_embed.weight"] = bad["prompt_encoder.no_mask_embed.weight"].astype(np.float64)
    with pytest.raises(ConversionError) as err:
        torch_to_flax(bad, tiny_cfg)
    assert len(err.value.problems) == 4
    msg = str(err.value)
    assert "missing: image_encoder.neck.0.weight [48, 96, 1, 1, 1] (for params/image_encoder/neck_0/kernel)" in msg
    assert "unexpected: image_encoder.blocks.9.norm1.weight [96]" in msg
    assert "wrong shape: mask_decoder.iou_token.weight: got [2, 48], expected [1, 48]" in msg
    assert "wrong dtype: prompt_encoder.no_mask_embed.weight: float64" in msg


def test_half_precision_sources_upcast_exactly(tiny_cfg, weights):
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    back = flax_to_torch(torch_to_flax(half, tiny_cfg), tiny_cfg)
    assert all(back[k].dtype == np.float32 and np.array_equal(back[k], half[k].astype(np.float32)) for k in half)


def test_flax_side_errors_name_paths(tiny_cfg, weights):
    variables = torch_to_flax(weights, tiny_cfg)
    del variables["params"]["mask_decoder"]["iou_token"]
    variables["params"]["image_encoder"]["neck_1"]["scale"] = np.zeros(3, np.float32)
    variables["params"]["extra"] = {"kernel": np.zeros(2, np.float32)}
    with pytest.raises(ConversionError) as err:
        flax_to_torch(variables, tiny_cfg)
    assert sorted(p.split(":")[0] for p in err.value.problems) == ["missing", "unexpected", "wrong shape"]
    assert "params/mask_decoder/iou_token/embedding" in str(err.value)
    assert "params/extra/kernel" in str(err.value) and "params/image_encoder/neck_1/scale" in str(err.value)


@settings(max_examples=6, deadline=None)
@given(depth=st.integers(1, 3), globals_mask=st.integers(0, 7), iou_depth=st.integers(1, 4),
       multimask=st.integers(1, 3), use_rel_pos=st.booleans(), window=st.sampled_from([0, 3, 14]),
       points=st.sampled_from([2, 4]))
def test_every_key_consumed_and_every_leaf_filled(depth, globals_mask, iou_depth, multimask, use_rel_pos, window,
                                                  points):
    cfg = ModelConfig.variant(
        "tiny", encoder_depth=depth, encoder_global_attn_indexes=tuple(i for i in range(depth) if globals_mask >> i & 1),
        iou_head_depth=iou_depth, num_multimask_outputs=multimask, use_rel_pos=use_rel_pos, window_size=window,
        num_point_embeddings=points)
    assert _model_shapes(cfg) == _table_shapes(cfg)
    rng = np.random.default_rng(depth * 100 + globals_mask)
    state = {e.torch_key: rng.standard_normal(e.torch_shape).astype(np.float32) for e in conversion_table(cfg)}
    variables = torch_to_flax(state, cfg)
    assert _flat_shapes(variables) == _table_shapes(cfg)
    back = flax_to_torch(variables, cfg)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)
