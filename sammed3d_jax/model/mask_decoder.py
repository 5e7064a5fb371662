"""MaskDecoder: output tokens, two-way transformer, output upscaling, hypernetwork MLPs, IoU head, selection.

Mask logits and IoU predictions are returned in float32 whatever the compute dtype. There is no IoU-based
selection (upstream has none; its IoU head was never trained). Imports jax/flax only.
"""

import flax.linen as nn
import jax.numpy as jnp

from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.layers import MLP, DepthToSpaceConvTranspose, Embedding, LayerNorm, gelu
from sammed3d_jax.model.two_way_transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, image_embedding, image_pe, sparse, token_valid, dense, multimask_output: bool):
        """image_embedding, dense [b, g, g, g, C]; image_pe [1, g, g, g, C]; sparse [b, n, C] or None.

        Returns (mask logits [b, 4g, 4g, 4g, m] float32, iou [b, m] float32), m = num_multimask_outputs or 1.
        """
        cfg = self.cfg
        c, nm = cfg.prompt_embed_dim, cfg.num_mask_tokens
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b = dense.shape[0]
        out_tokens = jnp.concatenate([Embedding(1, c, pdt, name="iou_token")(),
                                      Embedding(nm, c, pdt, name="mask_tokens")()], axis=0)
        tokens = jnp.broadcast_to(out_tokens, (b, 1 + nm, c)).astype(dt)
        valid = None
        if sparse is not None:
            tokens = jnp.concatenate([tokens, sparse.astype(dt)], axis=1)
            valid = jnp.concatenate([jnp.ones((b, 1 + nm), bool), token_valid], axis=1)
        # Parity: mask_decoder3D.py repeats the image embedding (and PE) along the batch of the tokens.
        src = (jnp.broadcast_to(image_embedding, dense.shape) + dense).astype(dt)
        g = src.shape[1:4]
        pos = jnp.broadcast_to(image_pe, dense.shape).astype(dt)
        flat = lambda t: t.reshape(b, g[0] * g[1] * g[2], c)  # noqa: E731 (row-major over axes 0, 1, 2)
        hs, keys = TwoWayTransformer(cfg, name="transformer")(flat(src), flat(pos), tokens, valid)
        self.sow("intermediates", "dec_transformer_queries", hs)
        self.sow("intermediates", "dec_transformer_keys", keys)

        act = lambda t: gelu(t, cfg.gelu_approximate)  # noqa: E731
        x = keys.reshape(b, *g, c)
        x = DepthToSpaceConvTranspose(c // 4, dtype=dt, param_dtype=pdt, name="output_upscaling_0")(x)
        x = act(LayerNorm(cfg.layernorm3d_eps, dtype=dt, param_dtype=pdt, name="output_upscaling_1")(x))
        x = act(DepthToSpaceConvTranspose(c // 8, dtype=dt, param_dtype=pdt, name="output_upscaling_3")(x))
        self.sow("intermediates", "dec_upscaled_embedding", x)

        hyper_in = jnp.stack([
            MLP(c, c // 8, num_layers=3, dtype=dt, param_dtype=pdt, name=f"output_hypernetworks_mlps_{m}")(
                hs[:, 1 + m]) for m in range(nm)], axis=1)  # [b, nm, C/8]
        masks = jnp.einsum("bmc,bxyzc->bxyzm", hyper_in, x, preferred_element_type=jnp.float32)
        iou = MLP(cfg.iou_head_hidden_dim, nm, num_layers=cfg.iou_head_depth, dtype=dt, param_dtype=pdt,
                  name="iou_prediction_head")(hs[:, 0]).astype(jnp.float32)
        # Parity: multimask_output=False -> mask token 0; True -> tokens 1..num_multimask_outputs.
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[..., sel], iou[:, sel]
