"""Execution options of the encoder change nothing computed: the scan over block groups (outer scan over repeats,
inner scans over runs of identical blocks) and every named remat policy give the unrolled outputs, intermediates
and per-block gradients; the attention implementation comes from the config only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax.model import ModelConfig, Sam3D, init_variables
from sammed3d_jax.model.config import REMAT_POLICIES, resolve_attention_impl
from sammed3d_jax.model.image_encoder import block_schedule

# Blocks (window, window, global) x 2: an outer scan over 2 repeats holding an inner scan over 2 windowed blocks.
CFG = ModelConfig.variant("tiny", encoder_depth=6, encoder_global_attn_indexes=(2, 5), encoder_embed_dim=16,
                          encoder_num_heads=2)


def _setup(cfg):
    variables = init_variables(cfg, jax.random.key(0))
    # Non-zero pos/rel-pos tables (upstream zero-initialises them), cheaply and deterministically.
    variables = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), variables)
    s, g = cfg.image_size, cfg.grid_size
    vol = jax.random.normal(jax.random.key(2), (2, s, s, s, 1))
    probe = jax.random.normal(jax.random.key(3), (2, g, g, g, cfg.prompt_embed_dim))
    return variables, vol, probe


@pytest.fixture(scope="module")
def setup():
    assert block_schedule(CFG) == (((14, 2), (0, 1)), 2)
    return _setup(CFG)


def _encode_and_grad(cfg, variables, vol, probe):
    model = Sam3D(cfg)

    def loss(params):
        emb, inter = model.apply({**variables, "params": params}, vol, method=Sam3D.encode,
                                 mutable=["intermediates"])
        return jnp.sum(emb * probe), (emb, inter["intermediates"]["image_encoder"])

    (_, (emb, inter)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return emb, inter, grads


@pytest.fixture(scope="module")
def unrolled(setup):
    return _encode_and_grad(CFG, *setup)


def _assert_same(got, want, tol=2e-5):
    emb, inter, grads = got
    emb0, inter0, grads0 = want
    np.testing.assert_allclose(emb, emb0, rtol=tol, atol=tol)
    assert sorted(inter) == sorted(inter0) and len(inter) == len([k for k in inter0 if k.startswith("enc_block")]) + 1
    for k in inter0:
        np.testing.assert_allclose(inter[k][0], inter0[k][0], rtol=tol, atol=tol, err_msg=k)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads0)  # per-block layout kept
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads0)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


def test_scan_gives_the_unrolled_outputs_and_gradients(setup, unrolled):
    _assert_same(_encode_and_grad(CFG.replace(scan_encoder_blocks=True), *setup), unrolled)


def test_scan_with_remat(setup, unrolled):
    cfg = CFG.replace(scan_encoder_blocks=True, remat_policy="save_qkv_attention_out")
    _assert_same(_encode_and_grad(cfg, *setup), unrolled)


# One windowed and one global block (the tiny variant): cheap to compile once per policy.
SMALL = ModelConfig.variant("tiny")


@pytest.fixture(scope="module")
def small_setup():
    args = _setup(SMALL)
    return args, _encode_and_grad(SMALL, *args)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "save_qkv_attention_out"])
def test_remat_policies_change_nothing(small_setup, policy):
    """One policy of each kind (save nothing, JAX's matmul rule, our named tags); every name builds below."""
    args, want = small_setup
    _assert_same(_encode_and_grad(SMALL.replace(remat_policy=policy), *args), want)


def test_every_policy_name_builds():
    from sammed3d_jax.model.image_encoder import checkpoint_policy

    assert checkpoint_policy("none") is None
    assert all(callable(checkpoint_policy(p)) for p in REMAT_POLICIES if p != "none")
    with pytest.raises(ValueError, match="unknown remat policy"):
        checkpoint_policy("all")


def test_the_scan_is_really_a_scan_and_blocks_are_tagged(setup):
    variables, vol, _ = setup
    jaxpr = lambda cfg: str(jax.make_jaxpr(  # noqa: E731
        lambda v, x: Sam3D(cfg).apply(v, x, method=Sam3D.encode))(variables, vol))
    unrolled, scanned = jaxpr(CFG), jaxpr(CFG.replace(scan_encoder_blocks=True))
    assert "scan[" not in unrolled and scanned.count("scan[") >= 2  # the outer scan and the inner one
    assert len(scanned) < len(unrolled) * 0.75
    for tag in ("qkv", "attention_out", "mlp_hidden"):
        assert f"name={tag}" in unrolled


def test_remat_saves_what_the_policy_names(small_setup):
    """``save_qkv`` keeps the qkv projections as residuals of the backward pass, ``full`` keeps none of them."""
    (variables, vol, probe), _ = small_setup
    from jax.ad_checkpoint import print_saved_residuals

    def residuals(policy):
        model = Sam3D(SMALL.replace(remat_policy=policy))
        f = lambda p: jnp.sum(model.apply({**variables, "params": p}, vol, method=Sam3D.encode) * probe)  # noqa
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(f, variables["params"])
        return out.getvalue()

    saved_qkv, saved_none = residuals("save_qkv"), residuals("full")
    shape = f"f32[2,4,4,4,{3 * SMALL.encoder_embed_dim}]"  # [b, g, g, g, 3E]
    assert saved_qkv.count(shape) == SMALL.encoder_depth
    assert shape not in saved_none


def test_legacy_remat_bool_is_the_full_policy():
    cfg = ModelConfig.variant("tiny", remat_encoder_blocks=True)
    assert (cfg.remat_policy, cfg.remat_encoder_blocks) == ("full", False)
    assert ModelConfig.from_dict(cfg.to_dict() | {"remat_encoder_blocks": True}) == cfg
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        ModelConfig.variant("tiny", remat_policy="everything")
    assert cfg.architecture() == ModelConfig.variant("tiny", scan_encoder_blocks=True, dtype="bfloat16").architecture()


def test_attention_impl_is_resolved_by_the_caller_not_the_model():
    auto = ModelConfig.variant("tiny")
    assert auto.attention_impl == "auto"
    assert resolve_attention_impl(auto.replace(dtype="bfloat16"), "gpu").attention_impl == "cudnn"
    assert resolve_attention_impl(auto, "gpu").attention_impl == "xla"  # cuDNN takes half precision only
    assert resolve_attention_impl(auto.replace(dtype="bfloat16"), "cpu").attention_impl == "xla"
    assert resolve_attention_impl(auto.replace(dtype="bfloat16"), "tpu").attention_impl == "xla"
    assert resolve_attention_impl(auto.replace(attention_impl="cudnn"), "cpu").attention_impl == "cudnn"
    import inspect

    from sammed3d_jax.model import image_encoder
    assert "default_backend" not in inspect.getsource(image_encoder)
