"""Sam3D: the whole model, with ``encode`` (once per volume) and ``decode`` (once per click), and helpers.

    model = Sam3D(cfg)
    variables = init_variables(cfg, key)                 # {"params": ..., "buffers": ...}
    emb = model.apply(variables, volume, method=Sam3D.encode)
    low, iou = model.apply(variables, emb, points, labels, mask_logits, method=Sam3D.decode)
    low, iou = model.apply(variables, emb, points, labels, mask_logits, boxes=boxes, box_present=present,
                           method=Sam3D.decode)          # 4-point-embedding models only
    full = upsample_logits(low, cfg.image_size)

Shapes and label values are those of ``sammed3d_jax.shapes``. There is no jit in here: callers jit at the top.
Imports jax/flax only.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sammed3d_jax.model import initialization
from sammed3d_jax.model.attention import EncoderAttention
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.image_encoder import ImageEncoder
from sammed3d_jax.model.mask_decoder import MaskDecoder
from sammed3d_jax.model.prompt_encoder import PromptEncoder


class Sam3D(nn.Module):
    cfg: ModelConfig
    attention_cls: type = EncoderAttention

    def setup(self):
        self.image_encoder = ImageEncoder(self.cfg, self.attention_cls)
        self.prompt_encoder = PromptEncoder(self.cfg)
        self.mask_decoder = MaskDecoder(self.cfg)

    def encode(self, volume: Float[Array, "b h w d 1"]) -> Float[Array, "b g0 g1 g2 c"]:
        """Image embedding of z-normalised volumes ``[b, S, S, S, 1]`` -> ``[b, g, g, g, C]`` (compute dtype)."""
        return self.image_encoder(volume)

    def dense_pe(self) -> jax.Array:
        """``[1, g, g, g, C]`` float32 positional encoding of the embedding grid (upstream ``get_dense_pe``)."""
        return self.prompt_encoder.dense_pe()

    def prompt(self, points, labels, mask_logits, batch: int, boxes=None, box_present=None):
        """(sparse [b, t, C] | None, token_valid [b, t] | None, dense [b, g, g, g, C]); see PromptEncoder."""
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together")
        if box_present is not None and boxes is None:
            raise ValueError("box_present given without boxes")
        return self.prompt_encoder(points, labels, mask_logits, batch, boxes, box_present)

    def decode(self, image_embedding: Float[Array, "#b g0 g1 g2 c"], points: Float[Array, "b n 3"] | None,
               labels: Int[Array, "b n"] | None, mask_logits: Float[Array, "b x y z 1"] | None,
               multimask_output: bool = False, *, boxes: Float[Array, "b 6"] | None = None,
               box_present: Bool[Array, "b"] | None = None
               ) -> tuple[Float[Array, "b x y z m"], Float[Array, "b m"]]:
        """Masks for one round of prompts.

        Args:
            image_embedding: ``[b, g, g, g, C]`` from ``encode`` (or ``[1, ...]``, shared by every prompt row).
            points: ``[b, n, 3]`` voxel indices in array-axis order, or None for a prompt-less call.
            labels: ``[b, n]`` int: 1 positive, 0 negative, -1 not-a-point, -2 absent (masked).
            mask_logits: ``[b, 4g, 4g, 4g, 1]`` previous low-res logits (zeros on the first click, as upstream),
                or None for the no-mask embedding (never used by upstream's training or inference).
            multimask_output: False -> mask token 0 (what upstream always uses); True -> the other tokens.
            boxes: ``[b, 6]`` 3-D boxes ``(d0min, d1min, d2min, d0max, d1max, d2max)``, voxel indices in point
                order (upstream's challenge branch); only for ``num_point_embeddings == 4`` models. A row with a box
                gets the two corner tokens and no padding point, as upstream; ``points=None`` with boxes is a
                box-only prompt.
            box_present: ``[b]`` bool, which rows hold a box (None: every row). A row without a box decodes exactly
                as if ``boxes`` were None for it, so one compiled program serves clicks, boxes and both.

        Returns:
            (low-res mask logits ``[b, 4g, 4g, 4g, m]`` float32, IoU predictions ``[b, m]`` float32).
        """
        if points is not None:
            batch = points.shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        else:
            batch = mask_logits.shape[0] if mask_logits is not None else image_embedding.shape[0]
        sparse, valid, dense = self.prompt(points, labels, mask_logits, batch, boxes, box_present)
        self.sow("intermediates", "sparse_embeddings", sparse)
        self.sow("intermediates", "sparse_valid", valid)
        self.sow("intermediates", "dense_embeddings", dense)
        return self.mask_decoder(image_embedding, self.dense_pe(), sparse, valid, dense, multimask_output)

    def __call__(self, volume, points, labels, mask_logits, multimask_output: bool = False, *, boxes=None,
                 box_present=None):
        return self.decode(self.encode(volume), points, labels, mask_logits, multimask_output, boxes=boxes,
                           box_present=box_present)

    def _init_all(self, volume, points, labels, mask_logits):
        """Touches every parameter (the no-mask path and the box corners too) so ``init`` creates the full tree."""
        emb = self.encode(volume)
        self.decode(emb, points, labels, mask_logits)
        self.prompt(None, None, None, volume.shape[0])
        if self.cfg.supports_boxes:
            self.prompt(None, None, None, volume.shape[0], boxes=jnp.zeros((volume.shape[0], 6), jnp.float32))


def init_variables(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh variables ``{"params", "buffers"}`` with upstream's from-scratch initialisation (PyTorch defaults).

    The same ``key`` gives the same weights on every platform (threefry draws per leaf, folded in by path; see
    ``model/initialization.py``), eagerly or under the caller's ``jax.jit`` (e.g. with ``out_shardings`` to create
    the state already placed). Works under ``jax.eval_shape`` too.

    Args:
        cfg: the model configuration.
        key: a PRNG key (``jax.random.key(seed)``; a legacy uint32 key is accepted).

    Returns:
        ``{"params": ..., "buffers": ...}``, leaves of ``cfg.param_dtype``.
    """
    return initialization.draw(_init_plan(cfg), key)


@functools.lru_cache(maxsize=16)
def _init_plan(cfg: ModelConfig) -> initialization.InitPlan:
    s, g4 = cfg.image_size, cfg.low_res_size
    args = (jax.ShapeDtypeStruct((1, s, s, s, cfg.in_chans), jnp.float32), jax.ShapeDtypeStruct((1, 1, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 1), jnp.int32), jax.ShapeDtypeStruct((1, g4, g4, g4, 1), jnp.float32))
    # Only the tree matters here: the portable attention path, no rematerialisation wrapper.
    model = Sam3D(cfg.replace(attention_impl="xla", remat_encoder_blocks=False))
    return initialization.make_plan(model, Sam3D._init_all, *args)


def upsample_logits(low_res_logits: Float[Array, "b x y z m"], size: int) -> Float[Array, "b s0 s1 s2 m"]:
    """Trilinear resize of low-res logits to ``size``³, float32, as torch ``interpolate(mode="trilinear",
    align_corners=False)`` (jax.image.resize's linear method uses the same half-pixel centres and edge clamp)."""
    b, _, _, _, m = low_res_logits.shape
    return jax.image.resize(low_res_logits.astype(jnp.float32), (b, size, size, size, m), method="linear")


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
