"""Training loss and the training Dice metric on full-resolution mask logits, always in float32.

The loss reproduces ``monai.losses.DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` with MONAI's
other defaults, as upstream SAM-Med3D trains (spec §4.3):

* Dice term, per sample: ``1 - (2 Σ p·g + 1e-5) / (Σ p² + Σ g² + 1e-5)`` with ``p = sigmoid(logits)``, summed over
  the voxels of the sample, then the mean over the batch.
* BCE term: ``BCEWithLogits(logits, g)`` averaged over every voxel of the batch (MONAI >= 1.3). MONAI < 1.3 made
  this term identically zero for one-channel inputs (quirk 7), so ``use_bce=False`` reproduces that.
* The loss is Dice + BCE with weight 1 each.

Must not import model/, data/, parallel or ml_collections.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Num

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr default.


def dice_loss(logits: Float[Array, "b h w d"], gt: Num[Array, "b h w d"] | Bool[Array, "b h w d"]
              ) -> Float[Array, " b"]:
    """Soft Dice loss per sample with squared predictions (MONAI ``squared_pred=True``).

    Args:
      logits: mask logits (pre-sigmoid), any float dtype; computed in float32.
      gt: binary ground truth (nonzero = foreground).

    Returns:
      ``1 - (2 Σ p g + 1e-5) / (Σ p² + Σ g² + 1e-5)`` for each sample.
    """
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    g = (gt > 0).astype(jnp.float32)
    axes = (1, 2, 3)
    inter = jnp.sum(p * g, axis=axes)
    denom = jnp.sum(p * p, axis=axes) + jnp.sum(g, axis=axes)  # g is binary, so g² = g.
    return 1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)


def bce_with_logits(logits: Float[Array, "b h w d"], gt: Num[Array, "b h w d"] | Bool[Array, "b h w d"]
                    ) -> Float[Array, " b"]:
    """Binary cross-entropy on logits, averaged over the voxels of each sample (numerically stable form).

    Args:
      logits: mask logits (pre-sigmoid).
      gt: binary ground truth (nonzero = foreground).

    Returns:
      Mean BCE per sample; the batch mean of this equals PyTorch's ``BCEWithLogitsLoss`` over the whole batch.
    """
    x = logits.astype(jnp.float32)
    g = (gt > 0).astype(jnp.float32)
    # max(x,0) - x*g + log(1 + exp(-|x|)): PyTorch's formulation, finite for any logit.
    per_voxel = jnp.maximum(x, 0.0) - x * g + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.mean(per_voxel, axis=(1, 2, 3))


def dice_ce_loss(logits: Float[Array, "b h w d"], gt: Num[Array, "b h w d"] | Bool[Array, "b h w d"],
                 use_bce: bool = True) -> Float[Array, ""]:
    """Upstream's training loss for one click: mean Dice loss over the batch plus (optionally) voxel-mean BCE.

    Args:
      logits: full-resolution mask logits.
      gt: binary ground truth.
      use_bce: include the BCE term (MONAI >= 1.3); False gives the Dice-only loss of MONAI < 1.3 (quirk 7).

    Returns:
      The scalar float32 loss.
    """
    loss = jnp.mean(dice_loss(logits, gt))
    if use_bce:
        loss = loss + jnp.mean(bce_with_logits(logits, gt))
    return loss


def dice_score(logits: Float[Array, "b h w d"], gt: Num[Array, "b h w d"] | Bool[Array, "b h w d"],
               threshold: float = 0.5) -> Float[Array, " b"]:
    """Hard Dice of ``logits > threshold`` against ``gt`` per sample (the training-time metric).

    Upstream thresholds the *logits* at 0.5 during training (quirk 8); pass ``threshold=0.0`` for probability > 0.5.
    A sample whose prediction and ground truth are both empty scores 1 (upstream returns NaN there; training crops
    always hold foreground, so this only keeps the metric finite).

    Args:
      logits: full-resolution mask logits.
      gt: binary ground truth.
      threshold: logit threshold of the predicted mask.

    Returns:
      Dice in [0, 1] per sample, float32.
    """
    pred = logits.astype(jnp.float32) > threshold
    g = gt > 0
    axes = (1, 2, 3)
    inter = jnp.sum(pred & g, axis=axes).astype(jnp.float32)
    total = (jnp.sum(pred, axis=axes) + jnp.sum(g, axis=axes)).astype(jnp.float32)
    return jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), 1.0)
