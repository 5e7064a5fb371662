"""Stand-in models with known answers for the challenge adapter and loop tests (not a test module).

They replace the network by a rule computed from the prompts alone, so the whole chain (axis mapping, resampling,
windows, prompt replay, paste-back, class resolution) can be checked to the voxel in milliseconds.
"""

import jax.numpy as jnp
import numpy as np

from sammed3d_jax.cvpr25.adapter import ChallengePredictor
from sammed3d_jax.evaluation.inference import Segmenter
from sammed3d_jax.shapes import NEGATIVE, POSITIVE

S = 32  # stand-in crop (the tiny model's); low-res logits at S/4


def _grid():
    return jnp.stack(jnp.meshgrid(*[jnp.arange(S, dtype=jnp.float32)] * 3, indexing="ij"), -1)


def _encode(variables, volume):
    return volume


def _pos_neg(points, labels):
    # (4 - distance to the nearest positive point, 2 - distance to the nearest negative one): [b, S, S, S] each.
    dist = jnp.linalg.norm(_grid()[None, :, :, :, None, :] - points[:, None, None, None, :, :], axis=-1)
    lab = labels[:, None, None, None, :]
    pos = jnp.max(jnp.where(lab == POSITIVE, 4.0 - dist, -1e3), axis=-1)
    neg = jnp.max(jnp.where(lab == NEGATIVE, 2.0 - dist, -1e3), axis=-1)
    return pos, neg


def _balls(points, labels):
    # Radius-4 balls around positive points minus radius-2 balls around negative ones.
    pos, neg = _pos_neg(points, labels)
    return jnp.where(neg > 0, -1.0, pos)


def _decode_balls(variables, embedding, points, labels, low):
    full = _balls(points, labels)[..., None]
    return full[:, ::4, ::4, ::4], full


def _decode_last_ball(variables, embedding, points, labels, low):
    # Only the most recent click counts: shows the order in which prompts were replayed.
    present = labels >= 0
    last = jnp.argmax(jnp.where(present, jnp.arange(labels.shape[1]), -1), axis=1)
    point = jnp.take_along_axis(points, last[:, None, None], axis=1)[:, 0, :]
    full = (4.0 - jnp.linalg.norm(_grid()[None] - point[:, None, None, None, :], axis=-1))[..., None]
    return full[:, ::4, ::4, ::4], full


def box_logits(boxes):
    """0.25 + the signed distance to the nearest face of ``[lo - 0.5, hi + 0.5]`` (per axis): positive on the voxels
    of an integer box and on voxel centres touching a fractional one, negative half a voxel outside."""
    g = _grid()[None]
    lo, hi = boxes[:, None, None, None, :3] - 0.5, boxes[:, None, None, None, 3:] + 0.5
    return 0.25 + jnp.min(jnp.minimum(g - lo, hi - g), axis=-1)


def _decode_box(variables, embedding, points, labels, low, boxes):
    # The box (box_logits) plus balls around positive clicks, minus balls around negative ones.
    pos, neg = _pos_neg(points, labels)
    full = jnp.where(neg > 0, -1.0, jnp.maximum(box_logits(boxes), pos))[..., None]
    return full[:, ::4, ::4, ::4], full


def segmenter(rule: str = "balls", max_clicks: int = 8) -> Segmenter:
    decode = {"balls": _decode_balls, "last": _decode_last_ball}[rule]
    return Segmenter({}, crop_size=S, low_res_size=S // 4, max_clicks=max_clicks, encode_fn=_encode,
                     decode_fn=decode)


def predictor(*, box: bool, rule: str = "balls", **kwargs) -> ChallengePredictor:
    """A predictor over a stand-in: with ``box`` the box is the box prompt, else a click at its centre."""
    return ChallengePredictor(segmenter(rule), _decode_box if box else None, **kwargs)


def ball_mask(shape, centre, radius=4.0, spacing=(1.0, 1.0, 1.0)):
    """Voxels strictly within ``radius`` (in units of ``spacing``-scaled voxels) of ``centre``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return np.linalg.norm((grid - np.asarray(centre)) * np.asarray(spacing), axis=-1) < radius
