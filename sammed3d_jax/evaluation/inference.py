"""Interactive inference on one volume as upstream's current scripts do it, for eval and predict.

The chain, per (case, target):

1. ``resample_case``: resample the image (linear) and the label map (nearest) to 1.5 mm on the file's own grid, then
   reorient both to RAS+ (upstream's order, see ``data/transforms.py``: resample-then-canonical keeps nearest-
   neighbour ties as upstream breaks them). Done once per case; every target of the case reuses it.
2. ``crop_roi``: crop-or-pad ``crop_size``³ (the model config's ``image_size``) around the bounding box of a mask (the
   target, as upstream; or the clicks, for predict) and z-normalise the ROI over ``x > 0`` (unbiased std, per ROI).
3. ``Segmenter``: the encoder runs once per ROI; then click after click, each click is written into a fixed-size
   buffer of ``max_clicks`` slots (unused slots ABSENT, masked out by the model, so one compilation serves every
   click count), the previous low-res logits are fed back as the mask prompt (zeros for the first click: upstream
   never trained its no-mask embedding), ``multimask_output=False`` (mask token 0, as every upstream path), and the
   low-res logits are upsampled trilinearly to the ROI. A voxel is in the mask when its probability exceeds
   ``MASK_THRESHOLD`` (upstream's ``sigmoid > 0.5``, i.e. ``logits > 0``: ``mask_from_logits``). Encoder and click
   step are jitted once per shape.
4. ``paste_back``: nearest resampling of the ROI mask onto the original image grid (affine and shape), zero outside
   the ROI (upstream's ``data_postprocess``).

Simulated users (``Segmenter.simulated_click``; ``evaluation/objects.py`` runs them for several targets at once):
click t is drawn from the ground truth and the prediction after click t-1 (first click: a uniform target voxel), by
``data/clicks.py``'s "random" rule (upstream inference default), the distance-transform "ritm" rule (alias "dt"),
or "ritm_random" (ritm for clicks 1-2, random after: upstream's old ``val_old.py`` protocol, see ``click_rule``).
Keys are folded per click, so a result depends only on (seed, case, target).

Imports the model, data/ transforms and clicks; never the training code, configs or ml_collections.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Integer, Real, Shaped

from sammed3d_jax.data import clicks as click_lib
from sammed3d_jax.data import transforms
from sammed3d_jax.data.nifti import Geometry, reorient_to_ras
from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
from sammed3d_jax.model.sam import Sam3D, upsample_logits
from sammed3d_jax.shapes import ABSENT, NEGATIVE, POSITIVE

DEFAULT_SPACING_MM = (1.5, 1.5, 1.5)
CLICK_MODES = ("random", "ritm", "dt", "ritm_random")
# Probability above which a voxel belongs to the predicted mask (upstream inference: sigmoid(logits) > 0.5). Training's
# click rule thresholds logits at 0.5 instead (an upstream quirk kept for parity, in the training config).
MASK_THRESHOLD = 0.5
_MASK_LOGIT = math.log(MASK_THRESHOLD / (1.0 - MASK_THRESHOLD))  # the same threshold on logits: 0.0

EncodeFn = Callable[[Any, jax.Array], jax.Array]
DecodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def mask_from_logits(
    logits: Shaped[Array, "*dims"] | Shaped[np.ndarray, "*dims"],
) -> Bool[Array, "*dims"] | Bool[np.ndarray, "*dims"]:
    """``probability > MASK_THRESHOLD`` computed on logits (numpy or jax arrays, strict comparison)."""
    return logits > _MASK_LOGIT


def mask_from_probabilities(probabilities: Shaped[np.ndarray, "*dims"]) -> Bool[np.ndarray, "*dims"]:
    """``probability > MASK_THRESHOLD`` (e.g. for probabilities averaged over overlapping windows)."""
    return probabilities > MASK_THRESHOLD


# --- Preprocessing and paste-back (numpy) ---


@dataclasses.dataclass(frozen=True)
class ResampledCase:
    """A case on the model's grid: resampled to the target spacing, then reoriented to RAS+.

    Attributes:
        image: float32 ``[h, w, d]`` intensities on ``geom``.
        geom: the resampled RAS+ grid.
        original_geom: geometry of the file the image came from (paste-back target).
        label: integer label map on ``geom`` (nearest), or None.
    """

    image: np.ndarray
    geom: Geometry
    original_geom: Geometry
    label: np.ndarray | None = None


def resample_image(image: Real[np.ndarray, "h w d"], geom: Geometry, spacing_mm: Sequence[float] = DEFAULT_SPACING_MM
                   ) -> tuple[Float[np.ndarray, "h2 w2 d2"], Geometry]:
    """torchio's ``Resample`` of an image (linear), float32 out.

    An integer-typed image (e.g. an int16 CT, as ``read_image(..., keep_integer=True)`` returns it) comes back from
    torchio in its own pixel type: ITK interpolates in double precision, clamps to the type's range and truncates
    toward zero. We do the same (float64, ITK's axis order, ``trunc``, clip), so the ROI matches upstream's.
    """
    if not np.issubdtype(image.dtype, np.integer):
        return transforms.resample_to_spacing(image, geom, spacing_mm, order=1)
    out, new_geom = transforms.resample_to_spacing(image.astype(np.float64), geom, spacing_mm, order=1)
    info = np.iinfo(image.dtype)
    return np.clip(np.trunc(out), info.min, info.max).astype(np.float32), new_geom


def resample_case(
    image: Real[np.ndarray, "h w d"],
    geom: Geometry,
    label: Integer[np.ndarray, "h w d"] | Bool[np.ndarray, "h w d"] | None = None,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
) -> ResampledCase:
    """Resamples an image (linear, ``resample_image``) and its label map (nearest) to ``spacing_mm``, then
    reorients both to RAS+.

    Nearest resampling of the whole label map picks the same source voxel as resampling each binary target
    (upstream binarises first), so one pass serves every target.
    """
    img, new_geom = resample_image(image, geom, spacing_mm)
    ras_image, ras_geom = reorient_to_ras(img, new_geom)
    ras_label = None
    if label is not None:
        if tuple(label.shape) != geom.shape:
            raise ValueError(f"label shape {label.shape} differs from the image's {geom.shape}")
        lab, _ = transforms.resample_to_spacing(np.asarray(label), geom, spacing_mm, order=0)
        ras_label, _ = reorient_to_ras(lab, new_geom)
    return ResampledCase(ras_image, ras_geom, geom, ras_label)


@dataclasses.dataclass(frozen=True)
class Roi:
    """The network's input window and how it sits in the resampled case.

    Attributes:
        image: float32 ``[S, S, S]`` z-normalised ROI (zero padding normalised too, as upstream).
        gt: bool ``[S, S, S]`` target inside the ROI, or None.
        crop: the crop-or-pad window on the resampled RAS grid.
        geom: the ROI's geometry (RAS+, target spacing); paste-back starts here.
    """

    image: np.ndarray
    gt: np.ndarray | None
    crop: transforms.CropPad
    geom: Geometry


def crop_roi(
    case: ResampledCase,
    crop: transforms.CropPad,
    gt: Bool[np.ndarray, "h w d"] | None = None,
    name: str | None = None,
) -> Roi:
    """Cuts ``crop`` out of the resampled case and z-normalises it over ``x > 0`` (upstream, per ROI).

    Raises:
        ValueError: the ROI has no voxel > 0 or constant intensity (z-normalisation undefined), naming ``name``.
    """
    roi_image = transforms.z_normalize(transforms.apply_crop_or_pad(case.image, crop), name=name)
    roi_gt = None if gt is None else transforms.apply_crop_or_pad(np.asarray(gt, bool), crop)
    return Roi(roi_image, roi_gt, crop, crop.roi_geometry(case.geom))


def target_crop(mask: Shaped[np.ndarray, "h w d"], crop_size: int) -> transforms.CropPad:
    """Upstream's window: ``crop_size``³ centred on the bounding box of ``mask`` (torchio CropOrPad rule)."""
    return transforms.crop_or_pad_box(mask, (crop_size,) * 3)


def window_at(source_shape: Sequence[int] | np.ndarray, start: Sequence[int] | np.ndarray, crop_size: int
              ) -> transforms.CropPad:
    """A ``crop_size``³ window whose voxel 0 is ``start`` of the source (may lie partly outside: zero padding)."""
    return transforms.CropPad(tuple(int(s) for s in source_shape), tuple(int(s) for s in start), (crop_size,) * 3)


def paste_back(
    roi_values: Shaped[np.ndarray, "s0 s1 s2"], roi_geom: Geometry, original_geom: Geometry
) -> Shaped[np.ndarray, "h w d"]:
    """Nearest resampling of ROI values (mask or label) onto the original grid; zero outside the ROI (as upstream)."""
    values = np.asarray(roi_values)
    if values.dtype == np.bool_:
        return transforms.resample_to_geometry(values.astype(np.uint8), roi_geom, original_geom, order=0) > 0
    return transforms.resample_to_geometry(values, roi_geom, original_geom, order=0)


# --- The model as two jitted functions ---


@functools.lru_cache(maxsize=8)
def sam3d_functions(cfg: ModelConfig) -> tuple[EncodeFn, DecodeFn]:
    """``encode(variables, volume [1,S,S,S,1])`` and ``decode(variables, emb, points, labels, low) -> (low, full)``.

    ``decode`` always passes a mask prompt (zeros before the first click) and takes mask token 0
    (``multimask_output=False``);
    ``full`` is the float32 trilinear upsampling of ``low`` to ``S``³. Cached per config, so that every Segmenter
    of one config shares the jitted functions (and their compilations).
    """
    model = Sam3D(resolve_attention_impl(cfg, jax.default_backend()))

    def encode(variables, volume):
        return model.apply(variables, volume, method=Sam3D.encode)

    def decode(variables, embedding, points, labels, low_logits):
        low, _ = model.apply(variables, embedding, points, labels, low_logits, multimask_output=False,
                             method=Sam3D.decode)
        return low, upsample_logits(low, cfg.image_size)

    return encode, decode


def _write_click(points, labels, t, point, label):
    points = jax.lax.dynamic_update_slice(points, point.reshape(1, 1, 3).astype(points.dtype), (0, t, 0))
    labels = jax.lax.dynamic_update_slice(labels, label.reshape(1, 1).astype(labels.dtype), (0, t))
    return points, labels


def _click_step(decode_fn, variables, embedding, points, labels, low, t, point, label):
    points, labels = _write_click(points, labels, t, point, label)
    low, full = decode_fn(variables, embedding, points, labels, low)
    return points, labels, low, full[..., 0]


def _simulated_step(decode_fn, rule, variables, embedding, points, labels, low, logits, gt, key, t):
    pred = mask_from_logits(logits)
    if rule == "ritm":
        point, label = click_lib.sample_click_ritm(key, gt, pred)
    else:
        point, label = click_lib.sample_click(key, gt, pred)
    points, labels, low, full = _click_step(decode_fn, variables, embedding, points, labels, low, t, point[0],
                                            label[0])
    return points, labels, low, full, point[0], label[0]


@functools.lru_cache(maxsize=8)
def _jitted(encode_fn: EncodeFn, decode_fn: DecodeFn) -> tuple[Callable, Callable, dict[str, Callable]]:
    # One set of jitted functions per model: variables are arguments, so a new checkpoint reuses the compilation.
    simulated = {rule: jax.jit(functools.partial(_simulated_step, decode_fn, rule)) for rule in ("random", "ritm")}
    return jax.jit(encode_fn), jax.jit(functools.partial(_click_step, decode_fn)), simulated


def jitted_encoder(encode_fn: EncodeFn, decode_fn: DecodeFn) -> Callable:
    """The jitted encoder every Segmenter and ObjectDecoder of one model shares (one compilation)."""
    return _jitted(encode_fn, decode_fn)[0]


@dataclasses.dataclass
class Interaction:
    """One ROI's interaction so far: the embedding, the click buffer and the latest logits (device arrays).

    Attributes:
        embedding: encoder output of the ROI.
        points: ``[1, max_clicks, 3]`` click buffer (ROI voxel indices); slots past ``n_clicks`` hold ABSENT labels.
        labels: ``[1, max_clicks]`` int32.
        low_logits: ``[1, S/4, S/4, S/4, 1]`` previous low-res logits (zeros before the first click).
        logits: ``[1, S, S, S]`` full-resolution logits of the latest prediction (zeros before the first click).
        n_clicks: clicks made.
    """

    embedding: jax.Array
    points: jax.Array
    labels: jax.Array
    low_logits: jax.Array
    logits: jax.Array
    n_clicks: int = 0

    def mask(self) -> np.ndarray:
        """The current prediction ``[S, S, S]`` on the host (``mask_from_logits``)."""
        return np.asarray(mask_from_logits(self.logits[0]))

    def clicks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(points [n, 3], labels [n])`` of the clicks made, on the host."""
        return np.asarray(self.points[0, : self.n_clicks]), np.asarray(self.labels[0, : self.n_clicks])


class Segmenter:
    """Jitted encoder and click step of a model with fixed shapes: compiled once per ROI size, not per click.

    Args:
        variables: model variables (placed on the default device once here).
        crop_size: ROI side ``S``.
        low_res_size: side of the low-res logits (``S/4`` for SAM-Med3D).
        max_clicks: size of the click buffer (the most clicks one ROI can take).
        encode_fn, decode_fn: pure functions as ``sam3d_functions`` returns; a stand-in model may supply its own.
    """

    def __init__(self, variables: Any, *, crop_size: int, low_res_size: int, max_clicks: int,
                 encode_fn: EncodeFn, decode_fn: DecodeFn):
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
        self.variables = jax.device_put(variables)
        self.crop_size, self.low_res_size, self.max_clicks = int(crop_size), int(low_res_size), int(max_clicks)
        self.encode_fn, self.decode_fn = encode_fn, decode_fn
        self._encode, self._click, self._simulated = _jitted(encode_fn, decode_fn)

    @classmethod
    def from_model(cls, variables: Any, cfg: ModelConfig, max_clicks: int = 10) -> "Segmenter":
        """A Segmenter for a Sam3D model with ``cfg`` (ROI side ``cfg.image_size``)."""
        encode, decode = sam3d_functions(cfg)
        return cls(variables, crop_size=cfg.image_size, low_res_size=cfg.low_res_size, max_clicks=max_clicks,
                   encode_fn=encode, decode_fn=decode)

    def start(self, roi_image: Float[np.ndarray, "s0 s1 s2"]) -> Interaction:
        """Encodes a z-normalised ROI (once) and returns the empty interaction."""
        s = self.crop_size
        if roi_image.shape != (s, s, s):
            raise ValueError(f"ROI shape {roi_image.shape} differs from the model's crop {(s, s, s)}")
        volume = jnp.asarray(roi_image, jnp.float32).reshape(1, s, s, s, 1)
        g = self.low_res_size
        return Interaction(
            embedding=self._encode(self.variables, volume),
            points=jnp.zeros((1, self.max_clicks, 3), jnp.float32),
            labels=jnp.full((1, self.max_clicks), ABSENT, jnp.int32),
            low_logits=jnp.zeros((1, g, g, g, 1), jnp.float32),
            logits=jnp.zeros((1, s, s, s), jnp.float32))

    def _next(self, inter: Interaction, points, labels, low, logits) -> Interaction:
        return dataclasses.replace(inter, points=points, labels=labels, low_logits=low, logits=logits,
                                   n_clicks=inter.n_clicks + 1)

    def _check_room(self, inter: Interaction) -> None:
        if inter.n_clicks >= self.max_clicks:
            raise ValueError(f"click buffer full: {self.max_clicks} clicks (raise max_clicks)")

    def click(self, inter: Interaction, point: Sequence[float | int] | np.ndarray, positive: bool) -> Interaction:
        """Adds a user click at ROI voxel ``point`` (array-axis order) and decodes with every click so far."""
        self._check_room(inter)
        p = np.asarray(point, np.float32)
        s = self.crop_size
        if p.shape != (3,) or np.any(p < -0.5) or np.any(p >= s - 0.5):
            raise ValueError(f"click {p.tolist()} lies outside the {s}^3 ROI")
        label = jnp.asarray(POSITIVE if positive else NEGATIVE, jnp.int32)
        out = self._click(self.variables, inter.embedding, inter.points, inter.labels, inter.low_logits,
                          jnp.asarray(inter.n_clicks, jnp.int32), jnp.asarray(p), label)
        return self._next(inter, *out)

    def simulated_click(self, inter: Interaction, gt: Bool[Array, "1 s0 s1 s2"], key: jax.Array,
                        rule: str = "random") -> Interaction:
        """Draws the next click from ``gt`` and the current prediction (``rule`` "random" or "ritm") and decodes."""
        self._check_room(inter)
        if rule not in self._simulated:
            raise ValueError(f"click rule must be 'random' or 'ritm', got {rule!r}")
        points, labels, low, logits, _, _ = self._simulated[rule](
            self.variables, inter.embedding, inter.points, inter.labels, inter.low_logits, inter.logits, gt, key,
            jnp.asarray(inter.n_clicks, jnp.int32))
        return self._next(inter, points, labels, low, logits)

    def warmup(self, rules: Sequence[str] = ("random",)) -> float:
        """Compiles the encoder and the click steps on a dummy ROI; returns the seconds it took."""
        t0 = time.perf_counter()
        s = self.crop_size
        empty = self.start(np.zeros((s, s, s), np.float32))
        inter = self.click(empty, (s // 2,) * 3, True)
        gt = jnp.zeros((1, s, s, s), bool).at[0, s // 2, s // 2, s // 2].set(True)
        for rule in rules:  # each from the empty interaction, so a one-click buffer suffices
            jax.block_until_ready(self.simulated_click(empty, gt, jax.random.key(0), rule).logits)
        jax.block_until_ready(inter.logits)
        return time.perf_counter() - t0


def click_rule(mode: str, index: int) -> str:
    """The click rule of click ``index`` (0-based) under an evaluation ``mode`` (see ``CLICK_MODES``)."""
    if mode not in CLICK_MODES:
        raise ValueError(f"click mode must be one of {CLICK_MODES}, got {mode!r}")
    if mode in ("ritm", "dt") or (mode == "ritm_random" and index < 2):
        return "ritm"
    return "random"
