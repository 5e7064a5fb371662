"""The prediction adapter: one challenge case (image, spacing, prompts per class) -> ``segs``, through our model.

``ChallengePredictor.predict_case(image, spacing, prompts_per_class, prev_pred) -> segs`` is the whole contract; a
later multi-object session may replace its inside. What happens inside, per case:

1. The volume is put in our axis order and geometry (``boxes.case_geometry``: transposed ``(z, y, x) -> (x, y, z)``,
   LPS by default), resampled to 1.5 mm and reoriented to RAS (``evaluation.inference.resample_case``).
2. Per class, the prompts are mapped to that grid: the box's voxel-centre corners (``boxes.box_to_grid``) and every
   click. Windows of ``S``³ (the model crop) are centred on the extent of the box and the positive clicks; along an
   axis where that extent exceeds ``S`` it is tiled by windows overlapping by at least half (at most ``max_windows``
   per class, else the fewest windows that cover it). Windows are z-normalised (``inference.crop_roi``) and encoded
   once per case: classes whose windows coincide share the encode.
3. In each window the class's prompts are replayed in the order the user gave them, every decode seeing the prompts
   so far and the previous low-res logits (upstream's interactive chain, so step t of the challenge reproduces what an
   in-process session would have after t interactions): first the box, then each click inside the window. The box is
   the 3-D box prompt ``(d0min, d1min, d2min, d0max, d1max, d2max)`` on the model grid, clipped to the window, for a
   checkpoint with box embeddings (``num_point_embeddings == 4``); for a released 2-embedding checkpoint it becomes
   a positive click at the centre of the box (its part inside the window), as upstream's challenge baseline does.
   A case without boxes starts from its clicks; a class with neither box nor positive click stays empty.
4. Probabilities of a class's windows are averaged; a voxel takes the class of highest probability above 0.5
   (overlaps between classes are resolved there), and the label map is pasted back to the case's grid (nearest),
   returned in the challenge's ``(z, y, x)`` order as uint8 class ids ``1..K`` in prompt order.

``prev_pred`` is accepted for the interface but not needed: replaying the prompts rebuilds the model's own chain.

Owns: ``ChallengePredictor``, ``box_decode_function``, ``NoBoxEmbeddingsError``. Imports the model, the evaluation
inference chain and ``cvpr25.cases``/``boxes``; never the training code or configs.
"""

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Integer, Shaped
from scipy import special

from sammed3d_jax.cvpr25 import boxes as box_lib
from sammed3d_jax.cvpr25.cases import ClassPrompts
from sammed3d_jax.evaluation import inference
from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
from sammed3d_jax.model.sam import Sam3D, upsample_logits
from sammed3d_jax.shapes import NEGATIVE, POSITIVE

BOX_MODES = ("auto", "box", "click")
BoxDecodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class NoBoxEmbeddingsError(ValueError):
    """A box prompt was required but the checkpoint has no box embeddings."""


def has_box_embeddings(cfg: ModelConfig) -> bool:
    """Whether a model config has the box-capable layout (four point embeddings)."""
    return int(getattr(cfg, "num_point_embeddings", 2)) == 4


@functools.lru_cache(maxsize=8)
def box_decode_function(cfg: ModelConfig) -> BoxDecodeFn:
    """``decode(variables, emb, points, labels, low, boxes [1, 6]) -> (low, full)``: ``Sam3D.decode`` with a box."""
    model = Sam3D(resolve_attention_impl(cfg, jax.default_backend()))

    def decode(variables, embedding, points, labels, low_logits, boxes):
        low, _ = model.apply(variables, embedding, points, labels, low_logits, boxes=boxes, multimask_output=False,
                             method=Sam3D.decode)
        return low, upsample_logits(low, cfg.image_size)

    return decode


@functools.lru_cache(maxsize=8)
def _box_steps(decode_fn: BoxDecodeFn) -> tuple[Callable, Callable]:
    def first(variables, embedding, points, labels, low, box):
        low, full = decode_fn(variables, embedding, points, labels, low, box)
        return low, full[..., 0]

    def click(variables, embedding, points, labels, low, box, t, point, label):
        points = jax.lax.dynamic_update_slice(points, point.reshape(1, 1, 3).astype(points.dtype), (0, t, 0))
        labels = jax.lax.dynamic_update_slice(labels, label.reshape(1, 1).astype(labels.dtype), (0, t))
        low, full = decode_fn(variables, embedding, points, labels, low, box)
        return points, labels, low, full[..., 0]

    return jax.jit(first), jax.jit(click)


@dataclasses.dataclass
class CaseReport:
    """How a case was predicted: windows per class (start on the model grid), the prompt used for boxes, notes."""

    windows: list[list[tuple[int, int, int]]] = dataclasses.field(default_factory=list)
    box_prompt: str = ""
    encodes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


def _axis_starts(lo: int, hi: int, size: int, overlap: bool) -> list[int]:
    extent = hi - lo
    if extent <= size:
        return [math.floor((lo + hi) / 2 - size / 2)]
    n = (math.ceil((extent - size) / (size // 2)) + 1) if overlap else math.ceil(extent / size)
    n = max(n, 2)
    return [round(lo + i * (extent - size) / (n - 1)) for i in range(n)]


def window_starts(lo: Sequence[int], hi: Sequence[int], size: int, max_windows: int) -> list[tuple[int, int, int]]:
    """Windows over ``[lo, hi)`` (model-grid voxels): one centred window, or tiles where the extent exceeds ``size``."""
    per_axis = [_axis_starts(int(a), int(b), size, True) for a, b in zip(lo, hi, strict=True)]
    if math.prod(len(p) for p in per_axis) > max_windows:
        per_axis = [_axis_starts(int(a), int(b), size, False) for a, b in zip(lo, hi, strict=True)]
    return [tuple(s) for s in itertools.product(*per_axis)]


class ChallengePredictor:
    """Predicts challenge cases with a jitted model (see the module docstring).

    Args:
        segmenter: encoder and click step (``inference.Segmenter``); its buffer bounds the clicks per class.
        box_decode_fn: ``decode`` taking a box (``box_decode_function``), or None for a model without box embeddings.
        box_mode: "auto" (box prompt when the model has box embeddings, else a click at the box centre), "box"
            (require box embeddings), "click" (always the centre click).
        spacing_mm: the model's resampling target.
        spacing_order: order of the stored spacing, "xyz" (the challenge's) or "zyx" (see ``cases``).
        orientation: how the files' axes lie, "LPS" or "RAS" (see ``boxes``).
        max_windows: the most windows per class before tiles stop overlapping.
    """

    def __init__(self, segmenter: inference.Segmenter, box_decode_fn: BoxDecodeFn | None = None, *,
                 box_mode: str = "auto", spacing_mm: Sequence[float] = inference.DEFAULT_SPACING_MM,
                 spacing_order: str = "xyz", orientation: str = "LPS", max_windows: int = 27):
        if box_mode not in BOX_MODES:
            raise ValueError(f"box mode must be one of {BOX_MODES}, got {box_mode!r}")
        if box_mode == "box" and box_decode_fn is None:
            raise NoBoxEmbeddingsError("this checkpoint has no box embeddings (num_point_embeddings is 2): use a "
                                       "box-capable checkpoint or the box mode 'click' or 'auto'")
        if spacing_order not in ("xyz", "zyx") or orientation not in box_lib.ORIENTATIONS:
            raise ValueError(f"spacing order {spacing_order!r} / orientation {orientation!r} not understood")
        self.segmenter = segmenter
        self.box_prompt = "box" if (box_decode_fn is not None and box_mode != "click") else "centre click"
        self._box_first, self._box_click = _box_steps(box_decode_fn) if box_decode_fn is not None else (None, None)
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.spacing_order, self.orientation, self.max_windows = spacing_order, orientation, int(max_windows)

    @classmethod
    def from_model(cls, variables: Any, cfg: ModelConfig, *, max_clicks: int = 16, **kwargs) -> "ChallengePredictor":
        """A predictor for Sam3D ``variables`` of ``cfg``; box prompts when the config has box embeddings."""
        segmenter = inference.Segmenter.from_model(variables, cfg, max_clicks=max_clicks)
        return cls(segmenter, box_decode_function(cfg) if has_box_embeddings(cfg) else None, **kwargs)

    def warmup(self) -> float:
        """Compiles the encoder and every decode variant used; returns the seconds it took."""
        t0 = time.perf_counter()
        self.segmenter.warmup(rules=())
        if self.box_prompt == "box":
            s = self.segmenter.crop_size
            inter = self.segmenter.start(np.zeros((s, s, s), np.float32))
            box = jnp.asarray([[1.0, 1.0, 1.0, s - 2.0, s - 2.0, s - 2.0]], jnp.float32)
            low, _ = self._box_first(self.segmenter.variables, inter.embedding, inter.points, inter.labels,
                                     inter.low_logits, box)
            out = self._box_click(self.segmenter.variables, inter.embedding, inter.points, inter.labels, low, box,
                                  jnp.asarray(0, jnp.int32), jnp.full((3,), s / 2, jnp.float32),
                                  jnp.asarray(POSITIVE, jnp.int32))
            jax.block_until_ready(out)
        return time.perf_counter() - t0

    def predict_case(self, image: Shaped[np.ndarray, "z y x"], spacing: Sequence[float],
                     prompts_per_class: Sequence[ClassPrompts], prev_pred: Integer[np.ndarray, "z y x"] | None = None
                     ) -> np.ndarray:
        """uint8 ``segs`` ``[D, H, W]``: class ``k`` (1-based, prompt order) where the model puts it, 0 elsewhere."""
        return self.predict_with_report(image, spacing, prompts_per_class, prev_pred)[0]

    def predict_with_report(self, image: Shaped[np.ndarray, "z y x"], spacing: Sequence[float],
                            prompts_per_class: Sequence[ClassPrompts],
                            prev_pred: Integer[np.ndarray, "z y x"] | None = None) -> tuple[np.ndarray, CaseReport]:
        """``predict_case`` plus how it was done (windows, encodes, notes)."""
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"image must be a 3-D (z, y, x) array, got shape {image.shape}")
        if len(prompts_per_class) > 255:
            raise ValueError(f"{len(prompts_per_class)} classes do not fit uint8 class ids")
        s = tuple(float(v) for v in spacing)
        spacing_zyx = (s[2], s[1], s[0]) if self.spacing_order == "xyz" else s
        geom = box_lib.case_geometry(image.shape, spacing_zyx, self.orientation)
        case = inference.resample_case(box_lib.to_our_axes(image).astype(np.float32), geom, None, self.spacing_mm)
        report = CaseReport(box_prompt=self.box_prompt)
        best = np.zeros(case.geom.shape, np.float32)
        labels = np.zeros(case.geom.shape, np.uint8)
        starts: dict[tuple[int, int, int], inference.Interaction | None] = {}
        for k, prompts in enumerate(prompts_per_class, 1):
            prob, region = self._class_probability(case, geom, prompts, k, starts, report)
            if prob is None:
                continue
            take = (prob > 0.5) & (prob > best[region])
            best[region] = np.where(take, prob, best[region])
            labels[region] = np.where(take, np.uint8(k), labels[region])
        report.encodes = sum(v is not None for v in starts.values())
        pasted = inference.paste_back(labels, case.geom, case.original_geom)
        return box_lib.from_our_axes(pasted).astype(np.uint8), report

    def _class_probability(self, case, geom, prompts: ClassPrompts, k: int, starts: dict, report: CaseReport):
        size, shape = self.segmenter.crop_size, np.asarray(case.geom.shape)
        coords = np.zeros((0, 3))
        if prompts.clicks:
            coords = box_lib.zyx_to_grid(np.array([c for c, _ in prompts.clicks], np.float64), geom, case.geom)
            coords = np.clip(coords, 0, shape - 1)
        positive = np.array([p for _, p in prompts.clicks], bool)
        extent = [coords[positive]] if positive.any() else []
        box_lo = box_hi = None
        if prompts.box is not None:
            box_lo, box_hi = box_lib.box_to_grid(prompts.box, geom, case.geom)
            box_lo, box_hi = np.clip(box_lo, 0, shape - 1), np.clip(box_hi, 0, shape - 1)
            extent.append(np.stack([box_lo, box_hi]))
        if not extent:
            report.windows.append([])
            report.notes.append(f"class {k}: no box and no positive click, left empty")
            return None, None
        pts = np.concatenate(extent)
        lo, hi = np.floor(pts.min(0) + 0.5).astype(int), np.floor(pts.max(0) + 0.5).astype(int) + 1
        windows = window_starts(lo.tolist(), hi.tolist(), size, self.max_windows)
        region_lo = np.maximum(np.min(windows, axis=0), 0)
        region_hi = np.minimum(np.max(windows, axis=0) + size, shape)
        region = tuple(slice(int(a), int(b)) for a, b in zip(region_lo, region_hi, strict=True))
        prob_sum = np.zeros(tuple(region_hi - region_lo), np.float32)
        weight = np.zeros_like(prob_sum)
        used = []
        for start in windows:
            inter = self._encoded(case, start, starts, report)
            if inter is None:
                continue
            logits = self._replay(inter, start, prompts, coords, box_lo, box_hi, k, report)
            if logits is None:
                continue
            src, dst = inference.window_at(case.geom.shape, start, size).overlap()
            local = tuple(slice(a.start - int(o), a.stop - int(o)) for a, o in zip(src, region_lo, strict=True))
            prob_sum[local] += special.expit(logits)[dst]
            weight[local] += 1.0
            used.append(tuple(int(v) for v in start))
        report.windows.append(used)
        if not used:
            report.notes.append(f"class {k}: no window could be run, left empty")
            return None, None
        return np.where(weight > 0, prob_sum / np.maximum(weight, 1.0), 0.0), region

    def _encoded(self, case, start, starts: dict, report: CaseReport):
        key = tuple(int(v) for v in start)
        if key not in starts:
            crop = inference.window_at(case.geom.shape, key, self.segmenter.crop_size)
            try:
                roi = inference.crop_roi(case, crop, name=f"window at {list(key)}")
                starts[key] = self.segmenter.start(roi.image)
            except ValueError as err:  # e.g. a window over empty background: nothing to normalise or segment
                report.notes.append(str(err))
                starts[key] = None
        return starts[key]

    def _replay(self, inter, start, prompts: ClassPrompts, coords, box_lo, box_hi, k: int, report: CaseReport):
        size = self.segmenter.crop_size
        origin = np.asarray(start, np.float64)
        rel = coords - origin
        inside = np.all((rel >= -0.5) & (rel < size - 0.5), axis=1)
        clicks = [(rel[i], prompts.clicks[i][1]) for i in range(len(rel)) if inside[i]]
        n_box = 1 if (box_lo is not None and self.box_prompt == "centre click") else 0
        if len(clicks) + n_box > self.segmenter.max_clicks:
            raise ValueError(f"class {k}: {len(clicks) + n_box} prompts exceed the click buffer of "
                             f"{self.segmenter.max_clicks} (raise --max-clicks)")
        if box_lo is not None:
            lo = np.clip(box_lo - origin, 0, size - 1)
            hi = np.clip(box_hi - origin, 0, size - 1)
            if self.box_prompt == "box":
                return self._replay_box(inter, np.concatenate([lo, hi]), clicks)
            inter = self.segmenter.click(inter, (lo + hi) / 2, True)
        elif not any(positive for _, positive in clicks):
            return None  # negative clicks alone do not name the target in this window
        for point, positive in clicks:
            inter = self.segmenter.click(inter, point, positive)
        return np.asarray(inter.logits[0], np.float32)

    def _replay_box(self, inter, box6: np.ndarray, clicks):
        variables = self.segmenter.variables
        box = jnp.asarray(box6[None], jnp.float32)
        low, logits = self._box_first(variables, inter.embedding, inter.points, inter.labels, inter.low_logits, box)
        points, labels = inter.points, inter.labels
        for t, (point, positive) in enumerate(clicks):
            points, labels, low, logits = self._box_click(
                variables, inter.embedding, points, labels, low, box, jnp.asarray(t, jnp.int32),
                jnp.asarray(point, jnp.float32), jnp.asarray(POSITIVE if positive else NEGATIVE, jnp.int32))
        return np.asarray(logits[0], np.float32)
