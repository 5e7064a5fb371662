"""Exact unpadded windowed attention == upstream's naive padded formulation, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sammed3d_jax.model.attention import EncoderAttention, window_groups
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


def _both(grid, window, heads, head_dim, batch, seed, dtype=jnp.float32, rel_scale=0.3):
    dim = heads * head_dim
    rel_size = window or grid[0]
    kw = dict(num_heads=heads, window_size=window, rel_size=rel_size, dtype=dtype)
    exact, naive = EncoderAttention(**kw), NaiveEncoderAttention(**kw)
    key_p, key_x = jax.random.split(jax.random.key(seed))
    params = _random_params(key_p, dim, heads, rel_size, rel_scale)
    x = jax.random.normal(key_x, (batch, *grid, dim), jnp.float32)
    return exact, naive, params, x


def _check(grid, window, heads, head_dim, batch, seed):
    exact, naive, params, x = _both(grid, window, heads, head_dim, batch, seed)
    f_exact = lambda p, x: exact.apply({"params": p}, x)  # noqa: E731
    f_naive = lambda p, x: naive.apply({"params": p}, x)  # noqa: E731
    y_exact, y_naive = jax.jit(f_exact)(params, x), jax.jit(f_naive)(params, x)
    np.testing.assert_allclose(y_exact, y_naive, rtol=2e-5, atol=2e-5)
    # Gradients of a generic scalar w.r.t. every parameter and the input.
    probe = jax.random.normal(jax.random.key(seed + 1), y_exact.shape)
    loss = lambda f: lambda p, x: jnp.sum(f(p, x) * probe)  # noqa: E731
    g_exact = jax.jit(jax.grad(loss(f_exact), argnums=(0, 1)))(params, x)
    g_naive = jax.jit(jax.grad(loss(f_naive), argnums=(0, 1)))(params, x)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_exact), jax.tree_util.tree_leaves(g_naive)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("grid,window", [
    ((4, 4, 4), 14),   # the tiny fixture: one window, grid smaller than the window
    ((7, 5, 3), 4),    # ragged: full and partial windows on different axes
    ((6, 6, 6), 3),    # several full windows, no padding
    ((5, 5, 5), 0),    # global attention
])
def test_exact_equals_naive_cases(grid, window):
    _check(grid, window, heads=2, head_dim=4, batch=2, seed=0)


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


def test_fused_attention_extra_column_construction():
    """The cuDNN path's extra-column encoding of the padded keys, run through XLA here (no GPU in CI)."""
    from sammed3d_jax.model.attention import attend, fused_attention
    ks = jax.random.split(jax.random.key(0), 6)
    b, nq, nk, h, c = 2, 5, 7, 3, 8
    q, k, v = (jax.random.normal(kk, (b, n, h, c)) for kk, n in zip(ks[:3], (nq, nk, nk)))
    bias = jax.random.normal(ks[3], (b, h, nq, nk))
    extra = 2.0 + jax.random.normal(ks[4], (b, h, nq))
    bv = jax.random.normal(ks[5], (h, c))
    want = attend(q, k, v, bias, extra, bv, c ** -0.5, "xla")
    got = fused_attention(q, k, v, bias, extra, bv, c ** -0.5, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused_attention(q, k, v, bias, None, None, c ** -0.5, implementation="xla"),
                               attend(q, k, v, bias, None, None, c ** -0.5, "xla"), rtol=1e-5, atol=1e-5)
