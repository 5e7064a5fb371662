"""The accelerator half of the training pipeline: CT clip, z-normalisation and flips of a raw batch (jnp only).

Owns ``finish_batch``, which the jitted train step calls first, on the global (sharded) batch the host pipeline
(``data/pipeline.py``) delivers raw. jax.numpy only, no ``jax.jit`` inside (the caller jits); must not import
flax, grain, nibabel, training/ or the model.

It reproduces, at float32 round-off, what the host once did per sample: clip to ``transforms.CT_CLIP_HU`` where
``ct_clip``, then ``(x - mean) / std`` with mean and unbiased (Bessel) std over the voxels ``> 0`` (zero padding
never counts), per volume or pooled over the whole global batch, then the flips. Statistics are two-pass float32
sums (mean first, then squared deviations), which keeps them within a few ulps of the float64 host values.

Degenerate statistics: the host pipeline never sends a crop it could not normalise per volume (it redraws), so
``per_volume`` rows are degenerate only if the store changed under a running job. A row with no voxel > 0, a
single one, or zero spread (or a batch, for ``batch_pooled``) is not divided by zero: its image is set to zeros
and it is flagged in ``degenerate``. Non-finite voxels (which prepare and the host check keep out) are likewise
zeroed before the statistics and flag their row. So no NaN leaves this function silently.
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, UInt8

from sammed3d_jax.data.transforms import CT_CLIP_HU

NORMALIZATIONS = ("per_volume", "batch_pooled", "none")


def _flip(x: Array, flip: Bool[Array, "b 3"]) -> Array:
    for axis in range(3):
        mask = flip[:, axis].reshape((-1,) + (1,) * (x.ndim - 1))
        x = jnp.where(mask, jnp.flip(x, axis=1 + axis), x)
    return x


def _moments(x: Float[Array, "b s0 s1 s2"], axes: tuple[int, ...]):
    """Mean, unbiased variance and count of the voxels > 0, reduced over ``axes`` (kept as size-1 axes)."""
    mask = x > 0
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=jnp.int32)
    n = count.astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, x, 0.0), axis=axes, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(mask, x - mean, 0.0)
    var = jnp.sum(dev * dev, axis=axes, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    return mean, var, count


def finish_batch(batch: dict, *, normalization: str) -> dict:
    """Clip, normalise and flip a raw batch from ``pipeline.build_train_iterator`` (or ``holdout_batches``).

    Args:
        batch: at least ``image`` float32 [b,S,S,S,1] (raw window, zero padded), ``label`` uint8 [b,S,S,S],
            ``flip`` bool [b,3] and ``ct_clip`` bool [b]; other keys are ignored.
        normalization: "per_volume", "batch_pooled" (over the whole, global, batch) or "none".

    Returns:
        ``{"image": float32 [b,S,S,S,1], "label": uint8 [b,S,S,S], "degenerate": bool [b]}``; ``degenerate`` marks
        rows whose image was zeroed (see the module docstring); it is all False for "none" unless a voxel was
        non-finite.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return _finish(batch["image"], batch["label"], batch["flip"], batch["ct_clip"], normalization)


def _finish(image: Float[Array, "b s0 s1 s2 1"], label: UInt8[Array, "b s0 s1 s2"], flip: Bool[Array, "b 3"],
            ct_clip: Bool[Array, " b"], normalization: str) -> dict:
    x = image[..., 0]
    finite = jnp.isfinite(x)
    nonfinite = ~jnp.all(finite, axis=(1, 2, 3))
    x = jnp.where(finite, x, 0.0)
    lo, hi = CT_CLIP_HU
    x = jnp.where(ct_clip[:, None, None, None], jnp.clip(x, jnp.float32(lo), jnp.float32(hi)), x)
    degenerate = nonfinite
    if normalization != "none":
        mean, var, count = _moments(x, (1, 2, 3) if normalization == "per_volume" else (0, 1, 2, 3))
        std = jnp.sqrt(var)
        bad = (count < 2) | ~(std > 0)
        x = (x - mean) / jnp.where(bad, 1.0, std)
        degenerate = degenerate | jnp.broadcast_to(bad.reshape(-1), degenerate.shape)
        x = jnp.where(degenerate[:, None, None, None], 0.0, x)
    return {"image": _flip(x, flip)[..., None], "label": _flip(label, flip), "degenerate": degenerate}
