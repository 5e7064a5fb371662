"""Click simulation on device: the next prompt point drawn from the error of the current prediction.

Owns the simulated-user rules of upstream SAM-Med3D in ``jax.numpy``, with fixed shapes, batched over
the leading axis, jit-able and vmappable:

- ``sample_click``: the "random" rule used in training and in current inference. The click is drawn uniformly
  from the error region (false negatives ∪ false positives) and is positive iff it lies in a false negative.
- ``sample_click_ritm``: the distance-transform ("ritm") rule that upstream's old evaluation used for the first
  clicks: the click lands in the interior of the larger error component.
- ``euclidean_distance_transform``: the exact Euclidean distance transform used by the "ritm" rule, in JAX.

Coordinates follow ``shapes.py``: points are float voxel indices in array-axis order; labels use the ``shapes``
constants. Must not import flax, the model, or any host-side I/O; this module runs inside jitted steps.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from sammed3d_jax.shapes import ABSENT, NEGATIVE, POSITIVE


def _uniform_index(key: PRNGKeyArray, mask: Bool[Array, "b h w d"]) -> tuple[Int[Array, " b"], Int[Array, " b"]]:
    """Flat index of a uniformly drawn True voxel per row, and the number of True voxels per row.

    Exact inverse-CDF draw with a two-level cumulative count: ``r ~ U{0..count-1}``; the volume is viewed as
    blocks (rows of ``h`` or ``h·w`` voxels, whichever split is more balanced, so no copy is needed), the block
    holding the r-th True voxel is found from a cumulative sum of block counts, and the voxel from a cumulative
    sum inside that block. It reads the mask once and allocates O(b·(blocks + block size)), about O(b·sqrt(n))
    at 128³, unlike noise-argmax (O(b·n) floats) or a full cumsum. Rows with no True voxel return 0, count 0.
    """
    b, h, w, d = mask.shape
    n_blocks = h if max(h, w * d) <= max(h * w, d) else h * w
    blocks = mask.reshape(b, n_blocks, -1)
    block_counts = jnp.sum(blocks, axis=-1, dtype=jnp.int32)
    cum = jnp.cumsum(block_counts, axis=1)
    count = cum[:, -1]
    r = jax.random.randint(key, (b,), 0, jnp.maximum(count, 1), dtype=jnp.int32)
    # The r-th True voxel sits in the first block whose inclusive cumulative count exceeds r.
    blk = jnp.minimum(jnp.sum(cum <= r[:, None], axis=1, dtype=jnp.int32), n_blocks - 1)
    before = jnp.take_along_axis(cum - block_counts, blk[:, None], axis=1)[:, 0]
    row = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]
    within = jnp.sum(jnp.cumsum(row, axis=1, dtype=jnp.int32) <= (r - before)[:, None], axis=1, dtype=jnp.int32)
    return jnp.minimum(blk * blocks.shape[2] + within, h * w * d - 1), count


def _click_from_candidates(
    key: PRNGKeyArray, gt: Bool[Array, "b h w d"], candidates: Bool[Array, "b h w d"]
) -> tuple[Float[Array, "b 3"], Int[Array, " b"]]:
    """Uniform click among ``candidates``, labelled by the ground truth there; ABSENT at the centre if none."""
    b, h, w, d = gt.shape
    idx, count = _uniform_index(key, candidates)
    # Every rule only offers error voxels (where "is a false negative" == gt) or gt voxels, so gt is the label.
    on_target = jnp.take_along_axis(gt.reshape(b, -1), idx[:, None], axis=1)[:, 0]
    labels = jnp.where(on_target, POSITIVE, NEGATIVE).astype(jnp.int32)
    points = jnp.stack(jnp.unravel_index(idx, (h, w, d)), axis=-1).astype(jnp.float32)
    found = count > 0
    centre = jnp.array([h // 2, w // 2, d // 2], jnp.float32)
    return jnp.where(found[:, None], points, centre), jnp.where(found, labels, ABSENT).astype(jnp.int32)


def _errors(gt, pred):
    gt = gt.astype(bool)
    pred = pred.astype(bool)
    return gt, gt & ~pred, pred & ~gt


def sample_click(
    key: PRNGKeyArray, gt: Bool[Array, "b h w d"], pred: Bool[Array, "b h w d"]
) -> tuple[Float[Array, "b 3"], Int[Array, " b"]]:
    """Draws the next click of a simulated user, uniformly from the error region (upstream's "random" rule).

    Per batch row, with ``fn = gt & ~pred`` and ``fp = pred & ~gt``:

    - if ``fn | fp`` is non-empty, the click is a voxel drawn uniformly from it, labelled ``POSITIVE`` (1) iff it
      lies in ``fn`` and ``NEGATIVE`` (0) otherwise (equals ``gt`` at the click);
    - if there is no error voxel (perfect prediction; upstream's training click function crashes here) the click is a
      uniform ground-truth voxel labelled ``POSITIVE``, as upstream inference does. With an all-False ``pred``
      this is the first click: a uniform foreground voxel;
    - if there is no error and ``gt`` is empty (both masks empty) there is nothing to click: the label is
      ``ABSENT`` (-2, an empty prompt slot the model ignores) and the point is the volume centre
      ``(h//2, w//2, d//2)``, which is what upstream uses when it has no ground truth.

    The draw is exactly uniform (inverse CDF on the voxel count) and deterministic for a given key. The rows
    use one key jointly, so split the key per call, not per row.

    Args:
      key: PRNG key.
      gt: ground-truth target masks.
      pred: current binary predictions (the caller thresholds its logits: inference at probability 0.5,
        upstream training at logit 0.5).

    Returns:
      ``(points, labels)``: float32 voxel indices in array-axis order and int32 labels (1, 0 or -2).
    """
    gt, fn, fp = _errors(gt, pred)
    error = fn | fp
    has_error = jnp.any(error, axis=(1, 2, 3))
    return _click_from_candidates(key, gt, jnp.where(has_error[:, None, None, None], error, gt))


def _squared_distance_pass(g, axis: int, spacing_mm: float):
    """One separable pass: ``min_y g[y] + ((x - y)·s)²`` along ``axis``, with background just outside the volume.

    Exact brute force over the offset k = |x - y|, one elementwise min per k (a while loop of shifted slices:
    O(N) memory, compiles quickly on every backend; a fused (n, n) broadcast-and-reduce compiled for minutes on
    GPU). It stops once (k·s)² reaches the largest current value, beyond which no offset can lower anything, so
    the trip count is about the largest distance in voxels rather than the axis length.
    """
    n = g.shape[axis]
    x = jnp.arange(n, dtype=jnp.float32)
    # The black border (voxels -1 and n are background) bounds every distance by the distance to the edge.
    border_shape = [1] * g.ndim
    border_shape[axis] = n
    out = jnp.minimum(g, ((jnp.minimum(x + 1.0, n - x) * spacing_mm) ** 2).reshape(border_shape))
    pad = [(0, 0)] * g.ndim
    pad[axis] = (n, n)
    padded = jnp.pad(g, pad, constant_values=jnp.inf)

    def offset_cost(k):
        return (k.astype(jnp.float32) * spacing_mm) ** 2

    def cond(state):
        k, out = state
        return (k < n) & (offset_cost(k) < jnp.max(out))

    def body(state):
        k, out = state
        below = jax.lax.dynamic_slice_in_dim(padded, n - k, n, axis)  # g[x - k]
        above = jax.lax.dynamic_slice_in_dim(padded, n + k, n, axis)  # g[x + k]
        return k + 1, jnp.minimum(out, jnp.minimum(below, above) + offset_cost(k))

    return jax.lax.while_loop(cond, body, (jnp.int32(1), out))[1]


def _squared_distance_transform(mask, spacing_mm):
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be three positive numbers, got {tuple(spacing_mm)!r}")
    sq = jnp.where(mask, jnp.inf, 0.0).astype(jnp.float32)
    for axis, s in enumerate(spacing_mm):
        sq = _squared_distance_pass(sq, axis + 1, float(s))
    return sq


def euclidean_distance_transform(
    mask: Bool[Array, "b h w d"], spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
) -> Float[Array, "b h w d"]:
    """Exact Euclidean distance from each True voxel to the nearest False voxel, in JAX.

    Voxels outside the volume count as False ("black border", as upstream's ``edt`` call after its one-voxel
    zero padding), so the result equals ``scipy.ndimage.distance_transform_edt`` of the mask zero-padded by one
    voxel, cropped back; False voxels get 0. Separable squared-distance transform (one exact min-plus pass per
    axis, float32; squared distances are exact integers at unit spacing); anisotropic spacing weights each axis.
    Work is O(N · largest distance in voxels): milliseconds for a 128³ volume on a GPU.

    Args:
      mask: boolean masks.
      spacing_mm: voxel size per array axis, static under jit (upstream's "ritm" uses voxel units: the default).

    Returns:
      float32 distances in the units of ``spacing_mm``.
    """
    return jnp.sqrt(_squared_distance_transform(mask, spacing_mm))


def sample_click_ritm(
    key: PRNGKeyArray,
    gt: Bool[Array, "b h w d"],
    pred: Bool[Array, "b h w d"],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[Float[Array, "b 3"], Int[Array, " b"]]:
    """Draws a click in the interior of the larger error (upstream's "ritm" rule).

    Per batch row: ``dt_fn`` and ``dt_fp`` are the Euclidean distance transforms of the false negatives and
    false positives (``euclidean_distance_transform``, border counted as background, as upstream pads by one zero
    voxel); the click is positive iff ``max(dt_fn) > max(dt_fp)`` (a tie goes to the false positives, as
    upstream's strict comparison), and it is drawn uniformly among the voxels of the chosen map with
    ``dt > max(max(dt_fn), max(dt_fp)) / 2``. The label is ``fn`` at the click (1 or 0). Upstream runs this
    with batch size 1 only; here every row is independent. Without any error voxel the rule falls back like
    ``sample_click``: a uniform gt voxel labelled positive, or ``ABSENT`` at the volume centre if gt is empty.

    Args:
      key: PRNG key.
      gt: ground-truth target masks.
      pred: current binary predictions.
      spacing_mm: voxel size used by the distance transform (upstream: voxel units, the default).

    Returns:
      ``(points, labels)`` as ``sample_click``.
    """
    gt, fn, fp = _errors(gt, pred)
    # Compared on squared distances: dt > max/2 iff dt² > max²/4, exact in float32 at unit spacing, so ties
    # resolve as upstream's correctly rounded float32 square roots do, on any backend.
    # One transform over the stacked maps: one loop per axis instead of two.
    dt_fn, dt_fp = jnp.split(_squared_distance_transform(jnp.concatenate([fn, fp]), spacing_mm), 2)
    max_fn = jnp.max(dt_fn, axis=(1, 2, 3))
    max_fp = jnp.max(dt_fp, axis=(1, 2, 3))
    positive = (max_fn > max_fp)[:, None, None, None]
    threshold = (jnp.maximum(max_fn, max_fp) / 4)[:, None, None, None]
    interior = jnp.where(positive, dt_fn, dt_fp) > threshold
    has_error = (jnp.maximum(max_fn, max_fp) > 0)[:, None, None, None]
    return _click_from_candidates(key, gt, jnp.where(has_error, interior, gt))
