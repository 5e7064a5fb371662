"""Analytic size and compute of a SAM-Med3D configuration: parameters and FLOPs, real tokens vs upstream's padding.

FLOPs count matrix products only (a multiply-add is 2 FLOPs), the usual convention for model FLOPs and MFU:
linear layers, convolutions, attention scores and values, and the relative-position terms. ``padded=True`` counts
what upstream computes: every windowed block runs qkv, attention and the output projection over whole zero-padded
windows (at 128³, 8³ real tokens in one 14³ window of 2,744); ``padded=False`` counts only real tokens, which is
what our exact attention computes. For ``vit_b_ori`` at 128³ the encoder costs 368.6 GFLOP padded and 104.5 GFLOP
real per volume. A training step costs 3x its forward (forward + backward): the encoder once per volume and the
decoder once per click.

Owns: ``encoder_flops``, ``decoder_flops``, ``train_step_flops``, ``parameter_count``. Imports the model config and
the conversion table only (no jax), so the sweep tool can size a configuration before building it.
"""

import dataclasses
import math

from sammed3d_jax.checkpoint.torch_convert import conversion_table
from sammed3d_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EncoderFlops:
    """Per-volume forward FLOPs of the image encoder, by part."""

    patch_embed: float
    projections: float  # qkv + output projection
    attention: float  # scores (q k^T) + weighted values
    rel_pos: float  # q · R for the three decomposed relative-position tables
    mlp: float
    neck: float

    @property
    def total(self) -> float:
        return self.patch_embed + self.projections + self.attention + self.rel_pos + self.mlp + self.neck


def _windows(grid: int, window: int) -> list[tuple[int, int]]:
    """Per axis: ``(count, real extent)`` of the windows covering ``grid`` tokens (window 0: one global window)."""
    if window == 0:
        return [(1, grid)]
    full, rem = divmod(grid, window)
    return ([(full, window)] if full else []) + ([(1, rem)] if rem else [])


def encoder_flops(cfg: ModelConfig, padded: bool = False) -> EncoderFlops:
    """Forward FLOPs of the image encoder for one volume of side ``cfg.image_size``.

    Args:
        cfg: the architecture.
        padded: count upstream's padded windows (True) or only real tokens (False).
    """
    g, e = cfg.grid_size, cfg.encoder_embed_dim
    n = g ** 3
    c = cfg.prompt_embed_dim
    patch = 2.0 * n * cfg.vit_patch_size ** 3 * cfg.in_chans * e
    proj = att = rel = mlp = 0.0
    for i in range(cfg.encoder_depth):
        w = cfg.block_window_size(i)
        mlp += 2.0 * 2 * n * e * cfg.encoder_mlp_dim  # runs on the real tokens (after the crop) upstream too
        groups = [(a0 * a1 * a2, (z0, z1, z2)) for a0, z0 in _windows(g, w) for a1, z1 in _windows(g, w)
                  for a2, z2 in _windows(g, w)]
        for count, extent in groups:
            if padded and w:
                extent = (w, w, w)
            tokens = math.prod(extent)
            proj += count * 2.0 * tokens * e * 4 * e  # qkv (3E) + proj (E)
            att += count * 2.0 * 2 * tokens * tokens * e  # scores and values, all heads
            # q · R per axis: each query meets every key position along that axis (the table's columns).
            rel += count * 2.0 * tokens * e * sum(extent) if cfg.use_rel_pos else 0.0
    neck = 2.0 * n * e * c + 2.0 * n * c * c * 27
    return EncoderFlops(patch, proj, att, rel, mlp, neck)


def decoder_flops(cfg: ModelConfig, num_points: int = 1) -> float:
    """Forward FLOPs of one decoder call (mask prompt, ``num_points`` clicks + the padding point, one mask token
    output) for one volume: mask downscaling, two-way transformer, upscaling, hypernetwork MLPs, masks, IoU head."""
    g, c, m = cfg.grid_size, cfg.prompt_embed_dim, cfg.mask_in_chans
    n = g ** 3
    t = 1 + cfg.num_mask_tokens + num_points + 1
    ci = c // cfg.decoder_attention_downsample_rate
    mdim = cfg.decoder_transformer_mlp_dim

    def attention(nq, nk, inner):  # q/k/v/out projections + scores + values
        return 2.0 * (nq * c * inner + 2 * nk * c * inner + nq * inner * c) + 2.0 * 2 * nq * nk * inner

    mask_down = 2.0 * (8 * n) * 8 * (m // 4) + 2.0 * n * 8 * (m // 4) * m + 2.0 * n * m * c
    layers = cfg.decoder_transformer_depth * (
        attention(t, t, c) + attention(t, n, ci) + 2.0 * 2 * t * c * mdim + attention(n, t, ci))
    final = attention(t, n, ci)
    upscale = 2.0 * n * c * (c // 4) * 8 + 2.0 * (8 * n) * (c // 4) * (c // 8) * 8
    hyper = cfg.num_mask_tokens * 2.0 * (2 * c * c + c * (c // 8))
    masks = 2.0 * cfg.num_mask_tokens * (c // 8) * 64 * n
    hidden = cfg.iou_head_hidden_dim
    iou = 2.0 * (c * hidden + (cfg.iou_head_depth - 2) * hidden * hidden + hidden * cfg.num_mask_tokens)
    return mask_down + layers + final + upscale + hyper + masks + iou


def train_step_flops(cfg: ModelConfig, clicks: int, padded: bool = False) -> float:
    """Model FLOPs of one training sample: 3x the forward of the encoder plus ``clicks`` decoder calls (the
    backward pass costs twice the forward; rematerialisation is not model work and is not counted)."""
    return 3.0 * (encoder_flops(cfg, padded).total + clicks * decoder_flops(cfg))


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters (the PE buffer excluded), from the conversion table: no model is built."""
    return sum(math.prod(e.torch_shape) for e in conversion_table(cfg) if e.collection == "params")
