"""The naive padded windowed attention, exactly as upstream computes it. Test and benchmark reference only.

Pads the (normed) token grid with zeros at the end of every axis to a multiple of the window, runs qkv on every
token of every full window (padded ones included), attends over whole windows with the full relative-position
tables and no mask, projects, and crops. The model never uses this; ``EncoderAttention`` computes the same values
from the real tokens only. ``NaiveEncoderAttention`` has the same parameters, so it can be swapped into the image
encoder (``ImageEncoder(attention_cls=NaiveEncoderAttention)``) for end-to-end comparisons.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sammed3d_jax.model.attention import EncoderAttention, attend, rel_pos_matrix
from sammed3d_jax.model.layers import Dense


class NaiveEncoderAttention(EncoderAttention):
    """Same fields and parameters as :class:`EncoderAttention`; upstream's padded computation."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, g0, g1, g2, dim = x.shape
        h, c = self.num_heads, dim // self.num_heads
        w = self.window_size
        if w:
            pads = [(-g) % w for g in (g0, g1, g2)]
            x = jnp.pad(x, ((0, 0), (0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)))
            p0, p1, p2 = g0 + pads[0], g1 + pads[1], g2 + pads[2]
            x = x.reshape(b, p0 // w, w, p1 // w, w, p2 // w, w, dim).transpose(0, 1, 3, 5, 2, 4, 6, 7)
            x = x.reshape(-1, w, w, w, dim)
        n, s0, s1, s2, _ = x.shape
        qkv = Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        qkv = qkv.reshape(n, s0 * s1 * s2, 3, h, c)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        bias = None
        if self.use_rel_pos:
            shape = (2 * self.rel_size - 1, c)
            tables = [self.param(f"rel_pos_{a}", nn.initializers.zeros, shape, self.param_dtype) for a in "dhw"]
            if not s0 == s1 == s2:
                raise ValueError(f"upstream's rel-pos broadcast needs cubic windows/grids, got {(s0, s1, s2)}")
            qg = q.reshape(n, s0, s1, s2, h, c).transpose(0, 4, 1, 2, 3, 5)  # [n, h, d, h, w, c] like torch
            f32 = jnp.float32
            rel_d = jnp.einsum("nkdhwc,dtc->nkdhwt", qg, rel_pos_matrix(tables[0], s0).astype(q.dtype),
                               preferred_element_type=f32)
            rel_h = jnp.einsum("nkdhwc,htc->nkdhwt", qg, rel_pos_matrix(tables[1], s1).astype(q.dtype),
                               preferred_element_type=f32)
            rel_w = jnp.einsum("nkdhwc,wtc->nkdhwt", qg, rel_pos_matrix(tables[2], s2).astype(q.dtype),
                               preferred_element_type=f32)
            # Upstream's literal indexing (torch's (B, d, h, w, t) terms, with our extra head axis after B):
            # rel_d[:, :, :, :, None, None], rel_h[:, :, :, None, :, None], rel_w[:, :, :, None, None, :].
            bias = (rel_d[:, :, :, :, :, None, None] + rel_h[:, :, :, :, None, :, None]
                    + rel_w[:, :, :, :, None, None, :])
            bias = bias.reshape(n, h, s0 * s1 * s2, s0 * s1 * s2)
        y = attend(q, k, v, bias, None, None, c ** -0.5, self.impl).astype(self.dtype)
        y = Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(y.reshape(n, s0, s1, s2, dim))
        if w:
            y = y.reshape(b, p0 // w, p1 // w, p2 // w, w, w, w, dim).transpose(0, 1, 4, 2, 5, 3, 6, 7)
            y = y.reshape(b, p0, p1, p2, dim)[:, :g0, :g1, :g2]
        return y


@functools.partial(jax.jit, static_argnames="scale")
def perturbed(variables, key: jax.Array, scale: float):
    """``variables`` plus N(0, scale²) noise on every leaf: upstream zero-initialises pos_embed and the rel-pos
    tables, which would hide errors in the stages that use them (tests and benchmarks)."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
