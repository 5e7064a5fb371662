"""Exact unpadded windowed attention == upstream's naive padded formulation (an independent implementation in
``model/reference.py``), outputs and gradients, for both backends' constructions; bf16 error bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sammed3d_jax.model.attention import EncoderAttention, attend, fused_attention, split_log_mass, window_groups
from sammed3d_jax.model.reference import NaiveEncoderAttention


def _random_params(key, dim, heads, rel_size, rel_scale=0.3):
    """Every parameter non-zero (upstream zero-inits the rel-pos tables, which would hide errors)."""
    c = dim // heads
    ks = jax.random.split(key, 7)
    n = lambda k, s, sc: sc * jax.random.normal(k, s, jnp.float32)  # noqa: E731
    return {
        "qkv": {"kernel": n(ks[0], (dim, 3 * dim), dim ** -0.5), "bias": n(ks[1], (3 * dim,), 0.5)},
        "proj": {"kernel": n(ks[2], (dim, dim), dim ** -0.5), "bias": n(ks[3], (dim,), 0.1)},
        "rel_pos_d": n(ks[4], (2 * rel_size - 1, c), rel_scale),
        "rel_pos_h": n(ks[5], (2 * rel_size - 1, c), rel_scale),
        "rel_pos_w": n(ks[6], (2 * rel_size - 1, c), rel_scale),
    }


def _both(grid, window, heads, head_dim, batch, seed, dtype=jnp.float32, rel_scale=0.3, impl="xla"):
    dim = heads * head_dim
    rel_size = window or grid[0]
    kw = dict(num_heads=heads, window_size=window, rel_size=rel_size, dtype=dtype)
    exact, naive = EncoderAttention(**kw, impl=impl), NaiveEncoderAttention(**kw)
    key_p, key_x = jax.random.split(jax.random.key(seed))
    params = _random_params(key_p, dim, heads, rel_size, rel_scale)
    x = jax.random.normal(key_x, (batch, *grid, dim), jnp.float32)
    return exact, naive, params, x


def _check(grid, window, heads, head_dim, batch, seed, impl="xla"):
    exact, naive, params, x = _both(grid, window, heads, head_dim, batch, seed, impl=impl)
    probe = jax.random.normal(jax.random.key(seed + 1), x.shape)

    def outputs_and_grads(module):
        # One program per formulation: the outputs, and the gradients of sum(outputs * probe) (a generic scalar)
        # w.r.t. every parameter and the input.
        def both(p, x, probe):
            y, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), p, x)
            return y, vjp(probe)

        return jax.jit(both)(params, x, probe)

    with jax.transfer_guard("disallow"):  # the jitted paths must not copy anything implicitly
        (y_exact, g_exact), (y_naive, g_naive) = outputs_and_grads(exact), outputs_and_grads(naive)
    np.testing.assert_allclose(y_exact, y_naive, rtol=2e-5, atol=2e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_exact), jax.tree_util.tree_leaves(g_naive)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("grid,window,impl", [
    ((4, 4, 4), 14, "xla"),   # the tiny fixture: one window, grid smaller than the window
    ((7, 5, 3), 4, "xla"),    # ragged: full and partial windows on different axes
    ((6, 6, 6), 3, "xla"),    # several full windows, no padding
    ((5, 5, 5), 0, "xla"),    # global attention
    # The cuDNN construction through XLA: padded keys as split columns, odd query/key counts padded to even.
    ((4, 4, 4), 14, "fused_xla"),
    ((7, 5, 3), 4, "fused_xla"),
    ((3, 3, 3), 0, "fused_xla"),
])
def test_exact_equals_naive_cases(grid, window, impl):
    _check(grid, window, heads=2, head_dim=4, batch=2, seed=0, impl=impl)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grid=st.tuples(*[st.integers(1, 6)] * 3),
    window=st.integers(0, 5),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 8]),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2 ** 16),
)
def test_exact_equals_naive_property(grid, window, heads, head_dim, batch, seed):
    if window == 0:
        grid = (grid[0],) * 3  # global attention is defined on cubic grids only (as upstream)
    _check(grid, window, heads, head_dim, batch, seed)


def test_window_groups_cover_grid_once():
    for grid, window in [((7, 5, 3), 4), ((8, 8, 8), 14), ((28, 28, 28), 14), ((9, 1, 20), 3)]:
        covered = np.zeros(grid, int)
        for (s0, n0, z0), (s1, n1, z1), (s2, n2, z2) in window_groups(grid, window):
            covered[s0:s0 + n0 * z0, s1:s1 + n1 * z1, s2:s2 + n2 * z2] += 1
        assert (covered == 1).all()


def test_global_attention_rejects_non_cubic_grid():
    exact, _, params, _ = _both((4, 4, 4), 0, 2, 4, 1, 0)
    with pytest.raises(ValueError, match="cubic"):
        exact.apply({"params": params}, jnp.zeros((1, 4, 3, 4, 8)))


@pytest.mark.parametrize("rel_scale", [0.3, 6.0])
def test_bfloat16_is_stable(rel_scale):
    """bf16 compute on the released geometry (8³ in a 14³ window), up to very large relative-position logits:
    finite outputs and gradients, and no less accurate than upstream's padded formulation in bf16 (both measured
    against the padded formulation in float32)."""
    grid, window = (8, 8, 8), 14
    exact, naive, params, x = _both(grid, window, 2, 8, 1, 3, dtype=jnp.bfloat16, rel_scale=rel_scale)
    y16 = exact.apply({"params": params}, x)
    y16_naive = naive.apply({"params": params}, x)
    y32 = NaiveEncoderAttention(num_heads=2, window_size=window, rel_size=window).apply({"params": params}, x)
    assert y16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y16.astype(jnp.float32))))
    rel_err = lambda y: float(jnp.max(jnp.abs(y.astype(jnp.float32) - y32)) / jnp.max(jnp.abs(y32)))  # noqa: E731
    assert rel_err(y16) <= 1.1 * rel_err(y16_naive) + 1e-3, (rel_err(y16), rel_err(y16_naive))
    grads = jax.grad(lambda p: jnp.sum(exact.apply({"params": p}, x).astype(jnp.float32)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in jax.tree_util.tree_leaves(grads))


def _core_inputs(seed, b=2, nq=64, nk=64, h=2, c=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 7)
    q, k, v = (jax.random.normal(kk, (b, n, h, c)).astype(dtype) for kk, n in zip(ks[:3], (nq, nk, nk)))
    bias = jax.random.normal(ks[3], (b, h, nq, nk))
    log_mass = math.log(2232.0) + 0.5 * jax.random.normal(ks[4], (b, h, nq))  # the released window's padded mass
    pad = (log_mass, jax.random.normal(ks[5], (h, c)).astype(dtype), jax.random.normal(ks[6], (h, c)).astype(dtype))
    return q, k, v, bias, pad


@pytest.mark.parametrize("nq,nk", [(64, 64), (5, 7)])
def test_fused_construction_equals_attend_float32(nq, nk):
    """The cuDNN path's inputs (split padded-key columns, even padding of odd counts) give the XLA path's result
    and gradients, run through XLA here (no GPU in CI)."""
    q, k, v, bias, pad = _core_inputs(0, nq=nq, nk=nk)
    scale = 16 ** -0.5
    for p in (pad, None):
        want = attend(q, k, v, bias, p, scale, "xla")
        np.testing.assert_allclose(fused_attention(q, k, v, bias, p, scale, "xla"), want, rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(jax.random.key(9), (2, nq, 2, 16))
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums=(0, 1, 2, 3, 4))  # noqa: E731
    g_xla = grad(lambda q, k, v, b, lm: attend(q, k, v, b, (lm, pad[1], pad[2]), scale, "xla"))(q, k, v, bias, pad[0])
    g_fused = grad(lambda q, k, v, b, lm: fused_attention(q, k, v, b, (lm, pad[1], pad[2]), scale, "xla"))(
        q, k, v, bias, pad[0])
    for a, b in zip(g_fused, g_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_split_log_mass_is_exact_in_bfloat16():
    """hi is representable, e^hi + e^lo = e^t; after both are rounded to bf16 the padded mass moves by < 0.2 %
    (rounding t itself moves it by up to 1.6 % near log 2232), and d(mass)/dt is exact."""
    t = math.log(2232.0) + jnp.linspace(-3.0, 3.0, 4001)
    hi, lo = split_log_mass(t, jnp.bfloat16)
    np.testing.assert_array_equal(hi, hi.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(jnp.logaddexp(hi, lo), t, rtol=0, atol=1e-5)
    as_bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    split_err = float(jnp.max(jnp.abs(jnp.logaddexp(as_bf16(hi), as_bf16(lo)) - t)))
    cast_err = float(jnp.max(jnp.abs(as_bf16(t) - t)))
    assert split_err < 2e-3 and cast_err > 1.5e-2, (split_err, cast_err)
    grads = jax.vmap(jax.grad(lambda t: jnp.logaddexp(*split_log_mass(t, jnp.bfloat16))))(t)
    np.testing.assert_allclose(grads, 1.0, atol=1e-6)


def test_fused_construction_bfloat16_within_bound():
    """bf16 inputs on the released window geometry (512 real queries/keys, the padded keys' log-mass near
    log 2232): the cuDNN construction (through XLA) stays within 2x the error of merely rounding the float32 result
    to bf16, in RMS over the output; casting the whole padded-key logit to bf16, as before, exceeds it."""
    q, k, v, bias, pad = _core_inputs(1, b=1, nq=512, nk=512, dtype=jnp.bfloat16)
    bias = bias.astype(jnp.bfloat16).astype(jnp.float32)  # representable: isolate the padded-key handling
    scale = 16 ** -0.5
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = np.asarray(attend(f32(q), f32(k), f32(v), bias, (pad[0], f32(pad[1]), f32(pad[2])), scale, "xla"))
    rms = lambda y: float(np.sqrt(np.mean((np.asarray(y, np.float64) - want) ** 2) / np.mean(want ** 2)))  # noqa: E731
    floor = rms(want.astype(jnp.bfloat16))
    fused = rms(fused_attention(q, k, v, bias, pad, scale, "xla"))
    assert fused <= 2 * floor, (fused, floor)
    # The earlier construction: one extra column with s·q·b_k + log-mass cast to bf16.
    extra = jnp.einsum("bqhc,hc->bhq", q, pad[1], preferred_element_type=jnp.float32) * scale + pad[0]
    k2 = jnp.concatenate([k, jnp.broadcast_to(jnp.zeros_like(pad[1]), (1, 2, 2, 16))], axis=1)
    v2 = jnp.concatenate([v, jnp.broadcast_to(jnp.stack([pad[2], jnp.zeros_like(pad[2])]), (1, 2, 2, 16))], axis=1)
    b2 = jnp.concatenate([bias, extra[..., None], jnp.full(extra.shape, -1e30)[..., None]], axis=-1)
    cast = rms(jax.nn.dot_product_attention(q, k2, v2, bias=b2.astype(jnp.bfloat16), scale=scale,
                                            implementation="xla"))
    assert cast > 2 * floor, (cast, floor)


def test_cudnn_refuses_float32_with_a_clear_error():
    q, k, v, bias, pad = _core_inputs(0, nq=4, nk=4)
    with pytest.raises(ValueError, match="'cudnn' needs bfloat16 or float16 compute, got float32; use 'xla'"):
        attend(q, k, v, bias, pad, 0.25, "cudnn")
