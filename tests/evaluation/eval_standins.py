"""Stand-in models and small NIfTI cases for the evaluation tests.

A stand-in replaces the network by a rule whose answer is known exactly, so the geometry chain (resample, RAS,
crop, paste back) and the bookkeeping (click buffer, metrics, reports) can be checked to the voxel in milliseconds.
"""

import json
import os

import jax.numpy as jnp
import numpy as np

from sammed3d_jax.data.nifti import Geometry, write_nifti
from sammed3d_jax.evaluation.inference import Segmenter
from sammed3d_jax.shapes import NEGATIVE, POSITIVE

S = 32  # stand-in crop; low-res logits at S/4 as the real model


def _encode_identity(variables, volume):
    return volume


def _decode_threshold(variables, embedding, points, labels, low):
    # "Perfect" for images whose target is the bright part: z-normalised intensity > 0 <=> above the ROI mean.
    return embedding[:, ::4, ::4, ::4], embedding


def threshold_segmenter(max_clicks: int = 10) -> Segmenter:
    """Predicts the ROI voxels brighter than the ROI mean (ignores clicks)."""
    return Segmenter({}, crop_size=S, low_res_size=S // 4, max_clicks=max_clicks, encode_fn=_encode_identity,
                     decode_fn=_decode_threshold)


def _decode_balls(variables, embedding, points, labels, low):
    # Union of radius-4 balls around positive clicks, minus radius-2 balls around negative ones.
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(S, dtype=jnp.float32)] * 3, indexing="ij"), -1)
    dist = jnp.linalg.norm(grid[None, :, :, :, None, :] - points[:, None, None, None, :, :], axis=-1)
    lab = labels[:, None, None, None, :]
    pos = jnp.max(jnp.where(lab == POSITIVE, 4.0 - dist, -1e3), axis=-1)
    neg = jnp.max(jnp.where(lab == NEGATIVE, 2.0 - dist, -1e3), axis=-1)
    full = jnp.where(neg >= 0, -1.0, pos)[..., None]
    return full[:, ::4, ::4, ::4], full


def ball_segmenter(max_clicks: int = 10) -> Segmenter:
    """Predicts balls around the clicks (ignores the image): a click-driven model with a known answer."""
    return Segmenter({}, crop_size=S, low_res_size=S // 4, max_clicks=max_clicks, encode_fn=_encode_identity,
                     decode_fn=_decode_balls)


def geometry(shape, spacing=(1.5, 1.5, 1.5), kind="lps", origin=(-20.0, 12.0, 5.0)) -> Geometry:
    """An affine of a given orientation kind: "ras", "lps", "permuted" (PIL-like axes) or "oblique"."""
    directions = {
        "ras": np.eye(3),
        "lps": np.diag([-1.0, -1.0, 1.0]),
        "permuted": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    }
    if kind == "oblique":
        a = np.deg2rad(12.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        direction = rot @ directions["permuted"]
    else:
        direction = directions[kind]
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, float)
    affine[:3, 3] = origin
    return Geometry(affine, shape)


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return mask


def bright_image(predicted: np.ndarray) -> np.ndarray:
    """Intensity 1 everywhere, 3 where the threshold stand-in should predict the target."""
    return np.where(predicted, 3.0, 1.0).astype(np.float32)


def write_nnunet_case(root, case: str, image: np.ndarray, label: np.ndarray, geom: Geometry,
                      label_geom: Geometry | None = None) -> None:
    write_nifti(os.path.join(root, "imagesTr", f"{case}_0000.nii.gz"), image, geom)
    write_nifti(os.path.join(root, "labelsTr", f"{case}.nii.gz"), label.astype(np.uint8), label_geom or geom)


def write_dataset_json(root, labels: dict[str, int]) -> None:
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, **labels}, "file_ending": ".nii.gz"}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)


def _decode_central(variables, embedding, points, labels, low):
    # Bright voxels within 14 voxels of the window centre: a model that only sees a target in the middle.
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(S, dtype=jnp.float32)] * 3, indexing="ij"), -1)
    near = jnp.linalg.norm(grid - (S - 1) / 2, axis=-1) <= 14.0
    full = jnp.where(near[None, ..., None], embedding, -1.0)
    return full[:, ::4, ::4, ::4], full


def central_segmenter(max_clicks: int = 10) -> Segmenter:
    """Predicts the bright voxels near the window centre only (position-dependent, like a model trained on crops
    centred on their target)."""
    return Segmenter({}, crop_size=S, low_res_size=S // 4, max_clicks=max_clicks, encode_fn=_encode_identity,
                     decode_fn=_decode_central)


class _Recorded:
    """The interaction state of :class:`RecordingSegmenter`: which window, and its latest logits."""

    def __init__(self, window: int, logits: np.ndarray):
        self.window, self.logits = window, logits


class RecordingSegmenter(Segmenter):
    """A host-side model stand-in that reports what it received: each window's ROI and the clicks fed to it (in the
    window's own voxel coordinates), in order. It predicts radius-4 balls around the positive clicks so far."""

    def __init__(self, crop_size: int = S, max_clicks: int = 10):  # no model, nothing jitted: the host answers
        self.crop_size, self.max_clicks = crop_size, max_clicks
        self.windows: list[tuple[np.ndarray, list[tuple[np.ndarray, bool]]]] = []

    def start(self, roi_image: np.ndarray) -> _Recorded:
        self.windows.append((np.asarray(roi_image), []))
        return _Recorded(len(self.windows) - 1, np.full((1,) + (self.crop_size,) * 3, -10.0, np.float32))

    def click(self, inter: _Recorded, point, positive: bool) -> _Recorded:
        clicks = self.windows[inter.window][1]
        clicks.append((np.asarray(point, np.float64), bool(positive)))
        grid = np.stack(np.meshgrid(*[np.arange(self.crop_size)] * 3, indexing="ij"), -1)
        logits = np.full((self.crop_size,) * 3, -10.0, np.float32)
        for p, pos in clicks:
            if pos:
                logits = np.maximum(logits, 4.0 - np.linalg.norm(grid - p, axis=-1))
        return _Recorded(inter.window, logits[None])
