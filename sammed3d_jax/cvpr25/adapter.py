"""The prediction adapter: one challenge case (image, spacing, prompts per class) -> ``segs``, through our model.

``ChallengePredictor.predict_case(image, spacing, prompts_per_class, prev_pred) -> segs`` is the whole contract. Inside,
each case is a multi-object ``Session`` (``sammed3d_jax/session.py``), one object per class:

1. The volume is put in our axis order and geometry (``boxes.case_geometry``: transposed ``(z, y, x) -> (x, y, z)``,
   LPS by default), resampled to 1.5 mm and reoriented to RAS (the session's chain; the 0-255 intensities are taken
   as float, so no integer cast).
2. Per class, the box (two corners, ``(z, y, x)`` reversed into our order) and the clicks are given to the session in
   the order the user made them: first the box, then each click. Windows of ``S``³ are centred on the extent of the
   box and the positive clicks; along an axis where that extent exceeds ``S`` it is tiled by windows overlapping by
   at least half (at most ``max_windows`` per class, else the fewest windows that cover it); no growth. Windows are
   z-normalised and encoded once per case: classes whose windows coincide share the encode, and the decodes of all
   classes run together.
3. In each window the class's prompts are replayed in order, every decode seeing the prompts so far and the previous
   low-res logits (upstream's interactive chain, so step t of the challenge reproduces what an in-process session
   would have after t interactions). The box is the 3-D box prompt ``(d0min, d1min, d2min, d0max, d1max, d2max)`` on
   the model grid, clipped to the window, for a checkpoint with box embeddings (``num_point_embeddings == 4``); for a
   released 2-embedding checkpoint it becomes a positive click at the centre of the box (its part inside the window),
   as upstream's challenge baseline does. A class with neither box nor positive click stays empty.
4. Probabilities of a class's windows are averaged; a voxel takes the class of highest probability above 0.5 (ties:
   the earlier class), and the label map is pasted back to the case's grid (nearest), returned in the challenge's
   ``(z, y, x)`` order as uint8 class ids ``1..K`` in prompt order.

``prev_pred`` is accepted for the interface but not needed: replaying the prompts rebuilds the model's own chain.

Owns: ``ChallengePredictor``, ``NoBoxEmbeddingsError``. Imports the session, the evaluation objects and
``cvpr25.cases``/``boxes``; never the training code or configs.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jaxtyping import Integer, Shaped

from sammed3d_jax.cvpr25 import boxes as box_lib
from sammed3d_jax.cvpr25.cases import ClassPrompts
from sammed3d_jax.evaluation import inference
from sammed3d_jax.evaluation.objects import ObjectDecoder, Prompt, box_decode_function
from sammed3d_jax.evaluation.windows import window_starts
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.session import Session

__all__ = ["BOX_MODES", "CaseReport", "ChallengePredictor", "NoBoxEmbeddingsError", "box_decode_function",
           "window_starts"]

BOX_MODES = ("auto", "box", "click")
BoxDecodeFn = Callable[..., tuple[jax.Array, jax.Array]]


class NoBoxEmbeddingsError(ValueError):
    """A box prompt was required but the checkpoint has no box embeddings."""


@dataclasses.dataclass
class CaseReport:
    """How a case was predicted: windows per class (start on the model grid), the prompt used for boxes, notes."""

    windows: list[list[tuple[int, int, int]]] = dataclasses.field(default_factory=list)
    box_prompt: str = ""
    encodes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


class ChallengePredictor:
    """Predicts challenge cases with a jitted model (see the module docstring).

    Args:
        segmenter: the model's encoder and decoder (``inference.Segmenter``); its buffer bounds the clicks per class.
        box_decode_fn: ``decode`` taking boxes and their presence flags (``objects.box_decode_function``), or None
            for a model without box embeddings.
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
        self.decoder = ObjectDecoder.from_segmenter(segmenter, box_decode_fn)
        self.box_mode = box_mode
        self.box_prompt = "box" if (box_decode_fn is not None and box_mode != "click") else "centre click"
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.spacing_order, self.orientation, self.max_windows = spacing_order, orientation, int(max_windows)

    @classmethod
    def from_model(cls, variables: Any, cfg: ModelConfig, *, max_clicks: int = 16, **kwargs) -> "ChallengePredictor":
        """A predictor for Sam3D ``variables`` of ``cfg``; box prompts when the config has box embeddings."""
        segmenter = inference.Segmenter.from_model(variables, cfg, max_clicks=max_clicks)
        return cls(segmenter, box_decode_function(cfg) if cfg.supports_boxes else None, **kwargs)

    def warmup(self, classes: int = 4) -> float:
        """Compiles the encoder and the decode steps for 1..``classes`` classes decoded together (one program per
        power of two); returns the seconds. A case with more classes compiles its size when first seen."""
        t0 = time.perf_counter()
        self.decoder.warmup(range(1, classes + 1))
        if self.box_prompt == "box":
            s = self.decoder.crop_size
            emb = self.decoder.encode(np.zeros((s, s, s), np.float32))
            self.decoder.decode_chains([emb], [self.decoder.empty_chain()],
                                       [[Prompt("box", (1.0, 1.0, 1.0, s - 2.0, s - 2.0, s - 2.0))]])
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
        session = Session(self.decoder, spacing_mm=self.spacing_mm, grow=False, max_windows=self.max_windows,
                          box_mode=self.box_mode)
        session.open(box_lib.to_our_axes(image).astype(np.float32), geom.affine, name="case")
        report = CaseReport(box_prompt=self.box_prompt)
        ids = []
        for k, prompts in enumerate(prompts_per_class, 1):
            oid = session.add_object(f"class {k}")  # ids 1..K: the class ids of the label map
            ids.append(oid)
            if prompts.box is None and not any(p for _, p in prompts.clicks):
                report.notes.append(f"class {k}: no box and no positive click, left empty")
                continue
            n = len(prompts.clicks) + (1 if prompts.box is not None and self.box_prompt != "box" else 0)
            if n > self.decoder.max_prompts:
                raise ValueError(f"class {k}: {n} prompts exceed the click buffer of {self.decoder.max_prompts} "
                                 "(raise --max-clicks)")
            if prompts.box is not None:
                lo, hi = prompts.box.lo_hi()
                session.add_box(oid, lo[::-1], hi[::-1])
            for zyx, positive in prompts.clicks:
                session.add_point(oid, np.asarray(zyx, np.float64)[::-1], positive)
        session.compute(ids)
        for k, oid in enumerate(ids, 1):
            info = session.info(oid)
            report.windows.append(list(info.windows))
            if info.windows:
                report.notes += list(info.notes)
            elif session.has_prompts(oid):
                report.notes += list(info.notes[:-1]) + [f"class {k}: no window could be run, left empty"]
        report.encodes = session.encodes
        labels = session.label_map(ids) if ids else np.zeros(geom.shape, np.uint8)
        return box_lib.from_our_axes(labels).astype(np.uint8), report
