"""Weights trained at one input size, loaded into a model at another (e.g. the 128³ turbo weights at 160³).

Only two kinds of tensors depend on the input size, and both are resampled, in float32, as torch's
``F.interpolate(align_corners=False)`` would (half-pixel centres, edge clamp, no antialiasing):

- ``image_encoder.pos_embed`` ``(1, g, g, g, E)``: trilinear over the token grid, ``g -> g'``.
- the relative-position tables ``rel_pos_d/h/w`` of the global-attention blocks, ``(2g - 1, c)``: linear along
  their length, ``2g - 1 -> 2g' - 1`` (what upstream's ``get_rel_pos`` does at run time, and SAM/ViTDet do).

Everything else is shape-independent and copied: the windowed blocks' tables stay ``(2w - 1, c)`` because the
window stays ``w`` (a larger grid just holds more windows, attended exactly), and the prompt encoder normalises
coordinates by the image size, so its Fourier features need nothing. The same size in gives the very same arrays out.

Owns: ``resize_variables``, ``resample_linear``. Imports numpy and the checkpoint/model-config modules only.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from sammed3d_jax.checkpoint.torch_convert import ConversionError, check_variables, conversion_table
from sammed3d_jax.model.config import ModelConfig


def resample_linear(array: np.ndarray, axis: int, length: int) -> np.ndarray:
    """Linear resampling of ``array`` along ``axis`` to ``length`` samples, float32, like torch's
    ``interpolate(mode="linear", align_corners=False)``: sample ``i`` reads source position
    ``max((i + 0.5) * n / length - 0.5, 0)`` and interpolates its two neighbours (the last one clamped)."""
    array = np.asarray(array, np.float32)
    n = array.shape[axis]
    if n == length:
        return array
    pos = (np.arange(length, dtype=np.float32) + np.float32(0.5)) * np.float32(n / length) - np.float32(0.5)
    pos = np.maximum(pos, np.float32(0.0))
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = (pos - i0.astype(np.float32)).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = length
    lam = lam.reshape(shape)
    out = np.take(array, i0, axis=axis) * (np.float32(1.0) - lam) + np.take(array, i1, axis=axis) * lam
    return out.astype(np.float32)


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        return {p: v for k, sub in tree.items() for p, v in _flatten(sub, (*prefix, str(k))).items()}
    return {prefix: tree}


def resize_variables(variables: Mapping[str, Any], cfg: ModelConfig,
                     image_size: int) -> tuple[dict[str, Any], ModelConfig]:
    """Variables of the model ``cfg`` (trained at ``cfg.image_size``) for a model at ``image_size``.

    Args:
        variables: ``{"params", "buffers"}`` exactly matching ``cfg`` (numpy or jax leaves).
        cfg: the architecture the weights were trained with.
        image_size: the new input side in voxels (a multiple of the patch size).

    Returns:
        ``(variables, cfg at image_size)``. With ``image_size == cfg.image_size`` the input tree itself is returned.

    Raises:
        ValueError: ``image_size`` is not a positive multiple of the patch size, or gives a token grid whose global
            blocks cannot use upstream's cubic rel-pos form. ConversionError: ``variables`` does not match ``cfg``.
    """
    if not isinstance(image_size, int) or image_size <= 0 or image_size % cfg.vit_patch_size:
        raise ValueError(f"image size {image_size!r} is not a positive multiple of the patch size "
                         f"{cfg.vit_patch_size}")
    if image_size == cfg.image_size:
        return variables, cfg
    check_variables(variables, cfg)
    new_cfg = cfg.replace(image_size=image_size)
    old = {e.flax_path: e for e in conversion_table(cfg)}
    flat = _flatten(variables)
    out: dict[str, Any] = {}
    problems = []
    for e in conversion_table(new_cfg):
        src = np.asarray(flat[e.flax_path])
        if old[e.flax_path].flax_shape == e.flax_shape:
            leaf = src
        elif e.torch_key == "image_encoder.pos_embed":
            leaf = src
            for axis in (1, 2, 3):
                leaf = resample_linear(leaf, axis, new_cfg.grid_size)
        elif ".attn.rel_pos_" in e.torch_key:
            leaf = resample_linear(src, 0, e.flax_shape[0])
        else:  # A new size-dependent tensor would land here; never guess how to resample it.
            problems.append(f"{e.torch_key}: shape {list(src.shape)} -> {list(e.flax_shape)} has no resampling rule")
            continue
        node = out
        for part in e.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[e.flax_path[-1]] = np.ascontiguousarray(leaf)
    if problems:
        raise ConversionError(f"cannot resize from image size {cfg.image_size} to {image_size}", problems)
    return out, new_cfg
