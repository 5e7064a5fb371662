"""TwoWayTransformer of the mask decoder: tokens attend to image tokens and back, with optional key masks.

Token keys can be masked (``token_valid``), which is how a fixed-size point buffer with ABSENT slots gives exactly
upstream's result for the present points only. Decoder LayerNorms use torch's default eps 1e-5 (the encoder and
every LayerNorm3d use 1e-6). Imports jax/flax only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.layers import MLP, Dense, Dtype, LayerNorm


class Attention(nn.Module):
    """Multi-head attention with q/k/v/out projections; internal width ``embed_dim / downsample_rate``."""

    embed_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, key_valid=None):
        inner = self.embed_dim // self.downsample_rate
        dense = lambda n, f: Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=n)  # noqa: E731
        q, k, v = dense("q_proj", inner)(q), dense("k_proj", inner)(k), dense("v_proj", inner)(v)
        h, c = self.num_heads, inner // self.num_heads
        split = lambda t: t.reshape(t.shape[0], t.shape[1], h, c)  # noqa: E731 (head-major channel split)
        q, k, v = split(q), split(k), split(v)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(c))
        if key_valid is not None:
            logits = jnp.where(key_valid[:, None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhc->bqhc", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out = out.reshape(out.shape[0], out.shape[1], inner).astype(self.dtype)
        return dense("out_proj", self.embed_dim)(out)


class TwoWayAttentionBlock(nn.Module):
    cfg: ModelConfig
    skip_first_layer_pe: bool

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_valid):
        cfg = self.cfg
        c, heads, rate = cfg.prompt_embed_dim, cfg.decoder_transformer_num_heads, cfg.decoder_attention_downsample_rate
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda n: LayerNorm(cfg.decoder_layernorm_eps, dtype=dt, param_dtype=pdt, name=n)  # noqa: E731
        attn = lambda n, r: Attention(c, heads, r, dtype=dt, param_dtype=pdt, name=n)  # noqa: E731
        if self.skip_first_layer_pe:
            # Parity: layer 0 replaces the queries by their self-attention (no residual, no PE).
            queries = attn("self_attn", 1)(queries, queries, queries, token_valid)
        else:
            q = queries + query_pe
            queries = queries + attn("self_attn", 1)(q, q, queries, token_valid)
        queries = norm("norm1")(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = norm("norm2")(queries + attn("cross_attn_token_to_image", rate)(q, k, keys))
        mlp = MLP(cfg.decoder_transformer_mlp_dim, c, names=("lin1", "lin2"), dtype=dt, param_dtype=pdt, name="mlp")
        queries = norm("norm3")(queries + mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = norm("norm4")(keys + attn("cross_attn_image_to_token", rate)(k, q, queries, token_valid))
        return queries, keys


class TwoWayTransformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, image_tokens, image_pe, tokens, token_valid):
        """image_tokens, image_pe [b, g³, C]; tokens [b, t, C]; token_valid [b, t] bool or None."""
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        queries, keys = tokens, image_tokens
        for i in range(cfg.decoder_transformer_depth):
            queries, keys = TwoWayAttentionBlock(cfg, skip_first_layer_pe=i == 0, name=f"layers_{i}")(
                queries, keys, tokens, image_pe, token_valid)
        q, k = queries + tokens, keys + image_pe
        final = Attention(cfg.prompt_embed_dim, cfg.decoder_transformer_num_heads,
                          cfg.decoder_attention_downsample_rate, dtype=dt, param_dtype=pdt,
                          name="final_attn_token_to_image")
        queries = queries + final(q, k, keys)
        queries = LayerNorm(cfg.decoder_layernorm_eps, dtype=dt, param_dtype=pdt, name="norm_final_attn")(queries)
        return queries, keys
