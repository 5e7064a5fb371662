"""PromptEncoder: random-Fourier positional encoding, point/label embeddings, mask-prompt downscaler.

Reproduces upstream's quirks bit for bit (each marked ``# Parity:``): the ``[sin, cos, sin]`` feature layout, the
+0.5 voxel-centre shift of points, and the dense-grid PE whose first two coordinates are swapped relative to the
array axes while points are encoded in array-axis order. The Gaussian matrix is a constant buffer (variable
collection "buffers"), never trained. Imports jax/flax only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sammed3d_jax import shapes
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.layers import Embedding, LayerNorm, StridedConv, gelu


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^3; all math in float32."""

    num_pos_feats: int

    @nn.compact
    def __call__(self, coords01: jax.Array) -> jax.Array:
        gauss = self.variable(
            "buffers", "positional_encoding_gaussian_matrix",
            lambda: jax.random.normal(self.make_rng("params"), (3, self.num_pos_feats), jnp.float32)).value
        v = 2.0 * coords01.astype(jnp.float32) - 1.0
        p = 2.0 * jnp.pi * jnp.matmul(v, gauss.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        # Parity: prompt_encoder3D.py concatenates [sin, cos, sin]; the third block repeats the first.
        return jnp.concatenate([jnp.sin(p), jnp.cos(p), jnp.sin(p)], axis=-1)


def dense_grid_coords(grid: int) -> jax.Array:
    """[g, g, g, 3] coordinates in [0, 1] that upstream's dense PE encodes for each embedding cell."""
    c = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid
    i, j, k = jnp.meshgrid(c, c, c, indexing="ij")
    # Parity: prompt_encoder3D.py builds "x" from the axis-1 ramp and "y" from the axis-0 ramp (2-D SAM's habit),
    # so cell (i, j, k) encodes (j, i, k). Points are encoded in array order; the weights were trained this way.
    return jnp.stack([j, i, k], axis=-1)


class PromptEncoder(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        c, pdtype = cfg.prompt_embed_dim, jnp.dtype(cfg.param_dtype)
        self.pe_layer = PositionEmbeddingRandom(cfg.pe_num_pos_feats)
        self.point_embeddings_0 = Embedding(1, c, pdtype)  # negative click
        self.point_embeddings_1 = Embedding(1, c, pdtype)  # positive click
        self.not_a_point_embed = Embedding(1, c, pdtype)
        self.no_mask_embed = Embedding(1, c, pdtype)
        d = jnp.dtype(cfg.dtype)
        eps = cfg.layernorm3d_eps
        self.mask_downscaling_0 = StridedConv(cfg.mask_in_chans // 4, 2, dtype=d, param_dtype=pdtype)
        self.mask_downscaling_1 = LayerNorm(eps, dtype=d, param_dtype=pdtype)
        self.mask_downscaling_3 = StridedConv(cfg.mask_in_chans, 2, dtype=d, param_dtype=pdtype)
        self.mask_downscaling_4 = LayerNorm(eps, dtype=d, param_dtype=pdtype)
        self.mask_downscaling_6 = StridedConv(c, 1, dtype=d, param_dtype=pdtype)

    def dense_pe(self) -> jax.Array:
        """[1, g, g, g, C] positional encoding of the image-embedding grid (float32)."""
        return self.pe_layer(dense_grid_coords(self.cfg.grid_size))[None]

    def embed_points(self, points: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Sparse tokens for ``points`` [b, n, 3] / ``labels`` [b, n] plus upstream's appended padding point.

        Returns (tokens [b, n+1, C] float32, valid [b, n+1] bool). ABSENT slots are invalid (masked out of
        attention); the padding point is invalid when every slot of its row is ABSENT (= upstream's points=None).
        """
        b = points.shape[0]
        present = labels != shapes.ABSENT
        # Parity: prompt_encoder3D.py _embed_points(pad=True) appends point (0, 0, 0) with label -1.
        points = jnp.concatenate([points.astype(jnp.float32), jnp.zeros((b, 1, 3), jnp.float32)], axis=1)
        labels = jnp.concatenate([labels, jnp.full((b, 1), shapes.NOT_A_POINT, labels.dtype)], axis=1)
        valid = jnp.concatenate([present, jnp.any(present, axis=1, keepdims=True)], axis=1)
        # Parity: +0.5 to the voxel centre, then divide by the input size of that axis.
        emb = self.pe_layer((points + 0.5) / self.cfg.image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == shapes.NOT_A_POINT, self.not_a_point_embed()[0], emb)
        emb = emb + jnp.where(lab == shapes.NEGATIVE, self.point_embeddings_0()[0], 0.0)
        emb = emb + jnp.where(lab == shapes.POSITIVE, self.point_embeddings_1()[0], 0.0)
        emb = jnp.where(valid[..., None], emb, 0.0)
        return emb, valid

    def embed_mask(self, mask_logits: jax.Array) -> jax.Array:
        """[b, 4g, 4g, 4g, 1] previous low-res logits (raw, no sigmoid) -> [b, g, g, g, C]."""
        act = lambda t: gelu(t, self.cfg.gelu_approximate)  # noqa: E731
        x = act(self.mask_downscaling_1(self.mask_downscaling_0(mask_logits)))
        x = act(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(self, points, labels, mask_logits, batch: int):
        """Returns (sparse [b, n+1, C] or None, token_valid or None, dense [b, g, g, g, C])."""
        cfg = self.cfg
        sparse = valid = None
        if points is not None:
            sparse, valid = self.embed_points(points, labels)
        if mask_logits is not None:
            dense = self.embed_mask(mask_logits)
        else:
            g = cfg.grid_size
            dense = jnp.broadcast_to(self.no_mask_embed()[0], (batch, g, g, g, cfg.prompt_embed_dim))
        return sparse, valid, dense
