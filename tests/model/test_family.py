"""Upstream's model family (vit_b, vit_l, vit_h at 256³; vit_b_ori at 128³) with 2 or 4 point embeddings: parameter
counts per component, the conversion table against the released key names, and vit_h under FSDP on 8 devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax import parallel
from sammed3d_jax.checkpoint.torch_convert import conversion_table
from sammed3d_jax.model import ModelConfig, count_params, init_variables
from sammed3d_jax.model.image_encoder import block_schedule

# Image encoder, prompt encoder (2 point embeddings), mask decoder. Totals with 4 point embeddings (768 more in the
# prompt encoder): vit_b 36,187,696, vit_l 322,787,632, vit_h 652,435,760, vit_b_ori 100,510,000.
COUNTS = {
    "vit_b": (28_602_624, 8_668, 7_575_636),
    "vit_l": (315_202_560, 8_668, 7_575_636),
    "vit_h": (644_850_688, 8_668, 7_575_636),
    "vit_b_ori": (92_924_928, 8_668, 7_575_636),
}
TOTAL_4 = {"vit_b": 36_187_696, "vit_l": 322_787_632, "vit_h": 652_435_760, "vit_b_ori": 100_510_000}
BUILDER = {  # upstream's builder numbers: (image, embed, depth, heads, global blocks)
    "vit_b": (256, 384, 12, 12, (2, 5, 8, 11)),
    "vit_l": (256, 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (256, 1280, 32, 16, (7, 15, 23, 31)),
    "vit_b_ori": (128, 768, 12, 12, (2, 5, 8, 11)),
}


def _shapes(tree, prefix=()):
    if isinstance(tree, dict):
        return {p: s for k, v in tree.items() for p, s in _shapes(v, (*prefix, k)).items()}
    return {prefix: tuple(tree.shape)}


def _table_counts(cfg):
    table = conversion_table(cfg)
    return {part: sum(int(np.prod(e.torch_shape)) for e in table
                      if e.collection == "params" and e.torch_key.startswith(part + "."))
            for part in ("image_encoder", "prompt_encoder", "mask_decoder")}


@pytest.mark.parametrize("variant", sorted(COUNTS))
def test_parameter_counts_per_component(variant):
    """The model built from each variant (4 point embeddings, traced without memory even for vit_h) has exactly
    the table's tree; both layouts have the expected counts per component."""
    image, embed, depth, heads, globals_ = BUILDER[variant]
    enc, prompt, dec = COUNTS[variant]
    for points in (2, 4):
        cfg = ModelConfig.variant(variant, num_point_embeddings=points)
        assert (cfg.image_size, cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads,
                cfg.encoder_global_attn_indexes) == (image, embed, depth, heads, globals_)
        assert (cfg.vit_patch_size, cfg.window_size, cfg.prompt_embed_dim, cfg.mask_in_chans, cfg.iou_head_depth,
                cfg.iou_head_hidden_dim) == (16, 14, 384, 16, 3, 256)
        want = {"image_encoder": enc, "prompt_encoder": prompt + 768 * (points == 4), "mask_decoder": dec}
        assert _table_counts(cfg) == want
        assert sum(want.values()) == TOTAL_4[variant] - 768 * (points == 2)
    v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    assert {k: count_params(x) for k, x in v["params"].items()} == want
    assert _shapes(v) == {e.flax_path: e.flax_shape for e in conversion_table(cfg)}


@pytest.mark.parametrize("points", [2, 4])
@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_conversion_table_uses_the_released_key_names(variant, points, fixtures_dir):
    """Same names as the released vit_b_ori state dict, with the variant's block count and shapes."""
    released = json.loads((fixtures_dir / "vit_b_ori_keys.json").read_text())["keys"]
    block = [k["name"].split(".", 3)[3] for k in released if k["name"].startswith("image_encoder.blocks.0.")]
    others = [k["name"] for k in released if not k["name"].startswith("image_encoder.blocks.")]
    cfg = ModelConfig.variant(variant, num_point_embeddings=points)
    want = set(others) | {f"image_encoder.blocks.{i}.{name}" for i in range(cfg.encoder_depth) for name in block}
    want |= {f"prompt_encoder.point_embeddings.{i}.weight" for i in range(points)}
    table = {e.torch_key: e.torch_shape for e in conversion_table(cfg)}
    assert set(table) == want
    e, heads = cfg.encoder_embed_dim, cfg.encoder_num_heads
    g, hd = 16, e // heads
    assert table["image_encoder.pos_embed"] == (1, g, g, g, e)
    assert table["image_encoder.patch_embed.proj.weight"] == (e, 1, 16, 16, 16)
    assert table["image_encoder.blocks.0.attn.qkv.weight"] == (3 * e, e)
    assert table["image_encoder.blocks.0.mlp.lin1.weight"] == (4 * e, e)
    glob = cfg.encoder_global_attn_indexes[0]
    assert table["image_encoder.blocks.0.attn.rel_pos_d"] == (27, hd)  # window 14
    assert table[f"image_encoder.blocks.{glob}.attn.rel_pos_w"] == (2 * g - 1, hd)  # global over the 16³ grid
    assert table["image_encoder.neck.0.weight"] == (384, e, 1, 1, 1)


def test_block_schedules():
    assert block_schedule(ModelConfig.variant("vit_b_ori")) == (((14, 2), (0, 1)), 4)
    assert block_schedule(ModelConfig.variant("vit_l")) == (((14, 5), (0, 1)), 4)
    assert block_schedule(ModelConfig.variant("vit_h")) == (((14, 7), (0, 1)), 4)
    assert block_schedule(ModelConfig.variant("tiny")) == (((14, 1), (0, 1)), 1)
    irregular = ModelConfig.variant("tiny", encoder_depth=5, encoder_global_attn_indexes=(0, 3))
    assert block_schedule(irregular) == (((0, 1), (14, 2), (0, 1), (14, 1)), 1)


@pytest.mark.slow
def test_vit_h_initialises_and_trains_under_fsdp_on_8_devices():
    """vit_h at 256³ (652 M parameters; params + AdamW state 7.8 GB, far beyond this machine) is initialised with
    sharded outputs and stepped once, both evaluated abstractly (``jax.eval_shape`` of the jitted functions, so
    the whole step is traced with its shardings), with the FSDP rule on an 8-device mesh: every large leaf of the
    params and of the optimizer state is split 8 ways and the step hands back the same shardings."""
    from sammed3d_jax.training import optim, state as state_lib, step as step_lib

    cfg = ModelConfig.variant("vit_h", scan_encoder_blocks=True, remat_policy="full")
    mesh = parallel.make_mesh(devices=jax.devices()[:8])
    optimizer = optim.make_optimizer(optim.OptimConfig(accum_steps=1))

    def fresh(key):
        return state_lib.create_train_state(init_variables(cfg, key), optimizer.tx)

    abstract = jax.eval_shape(fresh, jax.random.key(0))
    shardings = state_lib.state_shardings(abstract, ((".*", "fsdp"),), mesh)
    state = jax.eval_shape(jax.jit(fresh, out_shardings=shardings), jax.random.key(0))
    assert count_params(state.params) == TOTAL_4["vit_h"] - 768
    big = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
           if x.size >= 8 * 1280]
    assert len(big) > 3 * 32 * 6  # params, both Adam moments (and the accumulated gradients) of every block
    for path, x in big:
        assert x.sharding.shard_shape(x.shape) != x.shape, jax.tree_util.keystr(path)
        assert np.prod(x.sharding.shard_shape(x.shape)) * 8 == x.size, jax.tree_util.keystr(path)

    s = cfg.image_size
    data = parallel.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((8, s, s, s, 1), jnp.float32, sharding=data),
             "label": jax.ShapeDtypeStruct((8, s, s, s), jnp.uint8, sharding=data),
             "element": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=data)}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    step = step_lib.jit_train_step(cfg, optimizer, step_lib.StepConfig(max_clicks=2, min_clicks=2), mesh, shardings)
    new_state, metrics = jax.eval_shape(step, state, batch, key)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    assert metrics["loss"].shape == ()
