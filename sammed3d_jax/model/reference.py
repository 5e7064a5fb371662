"""Upstream's naive padded windowed attention, written independently of ``model/attention.py``. Tests and
benchmarks only; the model never uses it.

Pads the (normed) token grid with zeros at the end of every axis to a multiple of the window, runs qkv on every
token of every window (padded ones included), attends over whole windows with the decomposed relative position
added literally as upstream broadcasts it, projects, and crops. Nothing here comes from ``model/attention.py``:
the relative-position gather, the table interpolation and the softmax are this module's own, so a bug planted
there is caught by comparing the two. Parameters have the same names and shapes as ``EncoderAttention``'s, so
this module can be swapped into the image encoder (``Sam3D(cfg, attention_cls=NaiveEncoderAttention)``).

Precision follows PyTorch autocast, i.e. upstream's mixed-precision path: with a half-precision ``dtype`` the
projections, logits and relative-position terms are computed and added in that dtype, the softmax in float32, and
its probabilities cast back for the product with the values. In float32 it is upstream's float32 computation.
Imports jax/flax/numpy, and ``model/initialization.py`` for the noise of :func:`perturbed`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.model import initialization


def interpolation_matrix(src_len: int, dst_len: int) -> np.ndarray:
    """``(dst_len, src_len)`` weights of 1-D linear resampling with half-pixel centres and edge clamping (torch
    ``F.interpolate(mode="linear", align_corners=False)``), built element by element."""
    w = np.zeros((dst_len, src_len))
    for i in range(dst_len):
        x = max((i + 0.5) * src_len / dst_len - 0.5, 0.0)
        lo = min(int(np.floor(x)), src_len - 1)
        hi = min(lo + 1, src_len - 1)
        frac = x - lo
        w[i, lo] += 1.0 - frac
        w[i, hi] += frac
    return w


def relative_table(table: jax.Array, q_size: int, k_size: int) -> jax.Array:
    """``(q_size, k_size, c)`` embeddings of relative offsets (upstream ``get_rel_pos``).

    The table is resampled to ``2·max(q, k) − 1`` rows when its length differs; entry ``[i, j]`` is table row
    ``i·sq − j·sk + (k−1)·sk`` with ``sq = max(k/q, 1)``, ``sk = max(q/k, 1)``.
    """
    rows = 2 * max(q_size, k_size) - 1
    if table.shape[0] != rows:
        table = jnp.asarray(interpolation_matrix(table.shape[0], rows), table.dtype) @ table
    sq, sk = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    index = np.array([[int(i * sq - j * sk + (k_size - 1) * sk) for j in range(k_size)] for i in range(q_size)])
    return table[index]


class NaiveEncoderAttention(nn.Module):
    """Upstream's encoder attention over zero-padded windows; fields and parameters as ``EncoderAttention``
    (``impl`` is accepted for swapping and ignored: this is always the plain formulation)."""

    num_heads: int
    window_size: int
    rel_size: int
    use_rel_pos: bool = True
    qkv_bias: bool = True
    impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, g0, g1, g2, dim = x.shape
        heads, c = self.num_heads, dim // self.num_heads
        w = self.window_size
        if w:
            p0, p1, p2 = (-(-g // w) * w for g in (g0, g1, g2))
            x = jnp.pad(x, ((0, 0), (0, p0 - g0), (0, p1 - g1), (0, p2 - g2), (0, 0)))
            x = x.reshape(b, p0 // w, w, p1 // w, w, p2 // w, w, dim).transpose(0, 1, 3, 5, 2, 4, 6, 7)
            x = x.reshape(-1, w, w, w, dim)
        n, s0, s1, s2, _ = x.shape
        tokens = s0 * s1 * s2
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * dim, use_bias=self.qkv_bias, name="qkv")(x.astype(self.dtype))
        # torch: qkv.reshape(B, N, 3, heads, c).permute(2, 0, 3, 1, 4).reshape(3, B * heads, N, c)
        q, k, v = qkv.reshape(n, tokens, 3, heads, c).transpose(2, 0, 3, 1, 4).reshape(3, n * heads, tokens, c)
        attn = (q * jnp.asarray(c ** -0.5, q.dtype)) @ jnp.swapaxes(k, -1, -2)  # [B·heads, N, N]
        if self.use_rel_pos:
            if not s0 == s1 == s2:
                raise ValueError(f"upstream's rel-pos broadcast needs cubic windows/grids, got {(s0, s1, s2)}")
            shape = (2 * self.rel_size - 1, c)
            tables = [self.param(f"rel_pos_{a}", nn.initializers.zeros, shape, self.param_dtype) for a in "dhw"]
            r_d, r_h, r_w = (relative_table(t, s, s).astype(q.dtype) for t, s in zip(tables, (s0, s1, s2)))
            r_q = q.reshape(n * heads, s0, s1, s2, c)
            rel_d = jnp.einsum("bdhwc,dkc->bdhwk", r_q, r_d)
            rel_h = jnp.einsum("bdhwc,hkc->bdhwk", r_q, r_h)
            rel_w = jnp.einsum("bdhwc,wkc->bdhwk", r_q, r_w)
            # Parity: image_encoder3D.py add_decomposed_rel_pos, indexed literally.
            attn = (attn.reshape(n * heads, s0, s1, s2, s0, s1, s2) + rel_d[:, :, :, :, None, None]
                    + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]).reshape(n * heads, tokens, tokens)
        attn = attn.astype(jnp.float32)
        attn = jnp.exp(attn - jnp.max(attn, axis=-1, keepdims=True))
        attn = (attn / jnp.sum(attn, axis=-1, keepdims=True)).astype(v.dtype)
        y = (attn @ v).reshape(n, heads, s0, s1, s2, c).transpose(0, 2, 3, 4, 1, 5).reshape(n, s0, s1, s2, dim)
        y = dense(dim, name="proj")(y)
        if w:
            y = y.reshape(b, p0 // w, p1 // w, p2 // w, w, w, w, dim).transpose(0, 1, 4, 2, 5, 3, 6, 7)
            y = y.reshape(b, p0, p1, p2, dim)[:, :g0, :g1, :g2]
        return y


def perturbed(variables, key: jax.Array, scale: float):
    """``variables`` plus N(0, scale²) noise on every leaf: upstream zero-initialises pos_embed and the rel-pos
    tables, which would hide errors in the stages that use them (tests and benchmarks). The noise is drawn per leaf
    as ``init_variables`` draws (threefry, folded in by path); eagerly, the sum is formed on the host and put back."""
    noise = initialization.draw(initialization.plan_for_tree(variables, ("normal", scale)), key)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((variables, key))):
        return jax.tree_util.tree_map(lambda x, n: x + n.astype(x.dtype), variables, noise)
    host = jax.device_get((variables, noise))
    return jax.device_put(jax.tree_util.tree_map(lambda x, n: np.asarray(x + n.astype(x.dtype)), *host))
