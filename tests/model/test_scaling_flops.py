"""The analytic FLOP count of ``sammed3d_jax.scaling`` against upstream's numbers and against the matrix products
the traced model really performs (counted from its jaxpr, independently of the formulas)."""

import math

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import pytest

from sammed3d_jax import scaling
from sammed3d_jax.model import ModelConfig, Sam3D, init_variables


def _matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and convolution in a (closed) jaxpr, sub-jaxprs included (a scan's
    body counted ``length`` times)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            free_rhs = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
            total += 2.0 * math.prod(lhs) * math.prod(free_rhs)
        elif eqn.primitive.name == "conv_general_dilated":
            out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
            total += 2.0 * math.prod(out) * math.prod(kernel[:-1])  # kernel (k0, k1, k2, in, out), NDHWC output
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            total += mult * _matmul_flops(sub)
    return total


def test_vit_b_ori_encoder_matches_upstreams_padded_and_real_counts():
    cfg = ModelConfig.variant("vit_b_ori")
    assert round(scaling.encoder_flops(cfg, padded=True).total / 1e9, 1) == 368.6
    assert round(scaling.encoder_flops(cfg).total / 1e9, 1) == 104.5
    assert scaling.parameter_count(cfg) == 100_509_232
    # No padding when the window tiles the grid: both counts agree.
    tiled = ModelConfig.variant("tiny", window_size=2)
    assert scaling.encoder_flops(tiled, padded=True) == scaling.encoder_flops(tiled)


@pytest.mark.parametrize("variant,scan", [("vit_b_ori", False), ("vit_b", True)])
def test_analytic_count_is_what_the_traced_encoder_multiplies(variant, scan):
    """Within 1 %: our attention computes the rel-pos terms over whole window rows (a little more than the real
    tokens' share), nothing else differs. vit_b (16³ tokens, ragged windows) goes through the scanned encoder."""
    cfg = ModelConfig.variant(variant, scan_encoder_blocks=scan)
    v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    s = cfg.image_size
    vol = jax.ShapeDtypeStruct((1, s, s, s, 1), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: Sam3D(cfg).apply(v, x, method=Sam3D.encode))(v, vol)
    traced = _matmul_flops(jaxpr.jaxpr)
    analytic = scaling.encoder_flops(cfg).total
    assert analytic <= traced <= 1.01 * analytic, (traced / 1e9, analytic / 1e9)


def test_decoder_count_is_what_the_traced_decoder_multiplies():
    cfg = ModelConfig.variant("vit_b_ori")
    v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
    g, g4 = cfg.grid_size, cfg.low_res_size
    args = (jax.ShapeDtypeStruct((1, g, g, g, 384), jnp.float32), jax.ShapeDtypeStruct((1, 1, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 1), jnp.int32), jax.ShapeDtypeStruct((1, g4, g4, g4, 1), jnp.float32))
    jaxpr = jax.make_jaxpr(lambda v, *a: Sam3D(cfg).apply(v, *a, method=Sam3D.decode))(v, *args)
    traced = _matmul_flops(jaxpr.jaxpr)
    analytic = scaling.decoder_flops(cfg, num_points=1)
    assert 0.99 * analytic <= traced <= 1.01 * analytic, (traced / 1e9, analytic / 1e9)
    assert scaling.train_step_flops(cfg, 11) == 3 * (scaling.encoder_flops(cfg).total + 11 * analytic)
