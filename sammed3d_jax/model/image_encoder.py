"""ImageEncoder: the 3-D ViT of SAM-Med3D (patch embedding, absolute PE, windowed/global blocks, neck).

Channels-last: ``[b, S, S, S, 1]`` volume -> ``[b, g, g, g, C]`` embedding (g = S / patch, C = prompt_embed_dim).
Intermediates are sown into the "intermediates" collection for stage-by-stage parity checks. Imports jax/flax only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sammed3d_jax.model.attention import EncoderAttention
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.layers import MLP, Conv3x3, Dtype, LayerNorm, StridedConv, gelu


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def resolve_attention_impl(cfg: ModelConfig) -> str:
    """``auto`` -> cuDNN fused attention for half-precision compute where the default backend is a GPU, else XLA.

    cuDNN's fused attention supports only bf16/fp16 inputs; float32 (parity) runs always use XLA.
    """
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    if jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


class PatchEmbed(nn.Module):
    """Conv3d(kernel = stride = patch) as a patchify + matmul; params under ``patch_embed/proj`` as upstream."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, volume: jax.Array) -> jax.Array:
        return StridedConv(self.features, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="proj")(volume)


class Block(nn.Module):
    """Pre-norm transformer block: ``y = x + attn(norm1(x)); out = y + mlp(norm2(y))`` (exact GELU MLP)."""

    cfg: ModelConfig
    window_size: int
    attention_cls: type = EncoderAttention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype, pdtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        rel_size = self.window_size or cfg.grid_size
        y = LayerNorm(cfg.encoder_layernorm_eps, dtype=dtype, param_dtype=pdtype, name="norm1")(x)
        y = self.attention_cls(
            num_heads=cfg.encoder_num_heads, window_size=self.window_size, rel_size=rel_size,
            use_rel_pos=cfg.use_rel_pos, qkv_bias=cfg.qkv_bias, impl=resolve_attention_impl(cfg),
            dtype=dtype, param_dtype=pdtype, name="attn")(y)
        x = x + y
        y = LayerNorm(cfg.encoder_layernorm_eps, dtype=dtype, param_dtype=pdtype, name="norm2")(x)
        y = MLP(cfg.encoder_mlp_dim, x.shape[-1], activation=lambda t: gelu(t, cfg.gelu_approximate),
                names=("lin1", "lin2"), dtype=dtype, param_dtype=pdtype, name="mlp")(y)
        return x + y


class ImageEncoder(nn.Module):
    cfg: ModelConfig
    attention_cls: type = EncoderAttention

    @nn.compact
    def __call__(self, volume: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype, pdtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        if volume.ndim != 5 or volume.shape[-1] != cfg.in_chans:
            raise ValueError(f"volume must be [b, h, w, d, {cfg.in_chans}], got {volume.shape}")
        if any(s % cfg.vit_patch_size for s in volume.shape[1:4]):
            raise ValueError(f"volume spatial shape {volume.shape[1:4]} not a multiple of {cfg.vit_patch_size}")
        x = PatchEmbed(cfg.encoder_embed_dim, cfg.vit_patch_size, dtype=dtype, param_dtype=pdtype,
                       name="patch_embed")(volume)
        if cfg.use_abs_pos:
            g = cfg.grid_size
            pos = self.param("pos_embed", nn.initializers.zeros, (1, g, g, g, cfg.encoder_embed_dim), pdtype)
            if pos.shape[1:4] != x.shape[1:4]:
                raise ValueError(f"token grid {x.shape[1:4]} != pos_embed grid {pos.shape[1:4]}; "
                                 f"use a volume of side {cfg.image_size}")
            x = x + pos.astype(dtype)
        self.sow("intermediates", "enc_patch_embed_pos", x)
        block_cls = nn.remat(Block, static_argnums=()) if cfg.remat_encoder_blocks else Block
        for i in range(cfg.encoder_depth):
            x = block_cls(cfg, cfg.block_window_size(i), self.attention_cls, name=f"blocks_{i}")(x)
            self.sow("intermediates", f"enc_block{i}_out", x)
        x = StridedConv(cfg.prompt_embed_dim, 1, use_bias=False, dtype=dtype, param_dtype=pdtype, name="neck_0")(x)
        x = LayerNorm(cfg.layernorm3d_eps, dtype=dtype, param_dtype=pdtype, name="neck_1")(x)
        x = Conv3x3(cfg.prompt_embed_dim, dtype=dtype, param_dtype=pdtype, name="neck_2")(x)
        x = LayerNorm(cfg.layernorm3d_eps, dtype=dtype, param_dtype=pdtype, name="neck_3")(x)
        return x
