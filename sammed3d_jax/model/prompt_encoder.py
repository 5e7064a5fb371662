"""PromptEncoder: random-Fourier positional encoding, point/label and box-corner embeddings, mask-prompt downscaler.

Reproduces upstream's quirks bit for bit (each marked ``# Parity:``): the ``[sin, cos, sin]`` feature layout, the
+0.5 voxel-centre shift of points and boxes, and the dense-grid PE whose first two coordinates are swapped relative
to the array axes while points are encoded in array-axis order. The Gaussian matrix is a constant buffer (variable
collection "buffers"), never trained. Boxes follow upstream's challenge branch (four point embeddings). Every
sparse token comes with a validity flag, so a fixed-size prompt buffer can hold absent points and absent boxes
without changing the result. Imports jax/flax only.
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
        if cfg.supports_boxes:
            self.point_embeddings_2 = Embedding(1, c, pdtype)  # box corner 0 (the min corner)
            self.point_embeddings_3 = Embedding(1, c, pdtype)  # box corner 1 (the max corner)
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

    def embed_points(self, points: jax.Array, labels: jax.Array,
                     box_present: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Sparse tokens for ``points`` [b, n, 3] / ``labels`` [b, n] plus upstream's appended padding point.

        Returns (tokens [b, n+1, C] float32, valid [b, n+1] bool). ABSENT slots are invalid (masked out of
        attention); the padding point is invalid when every slot of its row is ABSENT (= upstream's points=None)
        or when the row has a box (``box_present`` [b] bool): upstream pads the points only when no box is given.
        """
        b = points.shape[0]
        present = labels != shapes.ABSENT
        # Parity: prompt_encoder3D.py _embed_points(pad=boxes is None) appends point (0, 0, 0) with label -1.
        points = jnp.concatenate([points.astype(jnp.float32), jnp.zeros((b, 1, 3), jnp.float32)], axis=1)
        labels = jnp.concatenate([labels, jnp.full((b, 1), shapes.NOT_A_POINT, labels.dtype)], axis=1)
        pad_valid = jnp.any(present, axis=1, keepdims=True)
        if box_present is not None:
            pad_valid &= ~box_present[:, None]
        valid = jnp.concatenate([present, pad_valid], axis=1)
        # Parity: +0.5 to the voxel centre, then divide by the input size of that axis.
        emb = self.pe_layer((points + 0.5) / self.cfg.image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == shapes.NOT_A_POINT, self.not_a_point_embed()[0], emb)
        emb = emb + jnp.where(lab == shapes.NEGATIVE, self.point_embeddings_0()[0], 0.0)
        emb = emb + jnp.where(lab == shapes.POSITIVE, self.point_embeddings_1()[0], 0.0)
        emb = jnp.where(valid[..., None], emb, 0.0)
        return emb, valid

    def embed_boxes(self, boxes: jax.Array, box_present: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Two corner tokens per box: ``boxes`` [b, 6] = (d0min, d1min, d2min, d0max, d1max, d2max) voxel indices in
        point order, ``box_present`` [b] bool. Returns (tokens [b, 2, C] float32, valid [b, 2] bool)."""
        if not self.cfg.supports_boxes:
            raise ValueError("box prompts need a model with num_point_embeddings=4 (box-corner embeddings, as "
                             "sam_med3d_turbo_bbox_*.pth); this model has 2")
        b = boxes.shape[0]
        # Parity: the challenge branch's _embed_boxes shifts by +0.5, views [b, 6] as two corners [b, 2, 3] and
        # encodes them like points; corner 0 gets point_embeddings[2], corner 1 point_embeddings[3].
        corners = (boxes.astype(jnp.float32) + 0.5).reshape(b, 2, 3)
        emb = self.pe_layer(corners / self.cfg.image_size)
        emb = emb + jnp.stack([self.point_embeddings_2()[0], self.point_embeddings_3()[0]])[None]
        valid = jnp.broadcast_to(box_present[:, None], (b, 2))
        return jnp.where(valid[..., None], emb, 0.0), valid

    def embed_mask(self, mask_logits: jax.Array) -> jax.Array:
        """[b, 4g, 4g, 4g, 1] previous low-res logits (raw, no sigmoid) -> [b, g, g, g, C]."""
        act = lambda t: gelu(t, self.cfg.gelu_approximate)  # noqa: E731
        x = act(self.mask_downscaling_1(self.mask_downscaling_0(mask_logits)))
        x = act(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(self, points, labels, mask_logits, batch: int, boxes=None, box_present=None):
        """Sparse and dense prompt embeddings.

        Args:
            points, labels: ``[b, n, 3]`` / ``[b, n]`` or both None.
            mask_logits: ``[b, 4g, 4g, 4g, 1]`` or None (the no-mask embedding).
            batch: the batch size when neither points nor boxes nor a mask are given.
            boxes: ``[b, 6]`` or None; needs ``num_point_embeddings == 4``.
            box_present: ``[b]`` bool, which rows of ``boxes`` hold a box (None: all of them).

        Returns:
            (sparse [b, t, C] or None, token_valid [b, t] or None, dense [b, g, g, g, C]): t = n + 1 for points,
            plus 2 for a box. Token order: points, the padding point, box corner 0, box corner 1.
        """
        cfg = self.cfg
        sparse = valid = None
        if boxes is not None:
            box_present = jnp.ones((boxes.shape[0],), bool) if box_present is None else box_present.astype(bool)
        if points is not None:
            sparse, valid = self.embed_points(points, labels, box_present)
        if boxes is not None:
            corners, corners_valid = self.embed_boxes(boxes, box_present)
            if sparse is None:
                sparse, valid = corners, corners_valid
            else:
                sparse = jnp.concatenate([sparse, corners], axis=1)
                valid = jnp.concatenate([valid, corners_valid], axis=1)
        if mask_logits is not None:
            dense = self.embed_mask(mask_logits)
        else:
            g = cfg.grid_size
            dense = jnp.broadcast_to(self.no_mask_embed()[0], (batch, g, g, g, cfg.prompt_embed_dim))
        return sparse, valid, dense
