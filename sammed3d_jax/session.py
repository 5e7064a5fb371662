"""Interactive segmentation without ground truth: one image, several objects, points, boxes, masks, undo.

    session = Session.from_checkpoint("runs/default")          # or Session(ObjectDecoder.from_model(...))
    session.open("scan.nii.gz")                                 # or session.open(array, affine)
    liver = session.add_object()
    session.add_point(liver, (120, 96, 40))                     # voxel indices of the file; world=True for mm
    session.add_box(liver, (100, 80, 30), (140, 120, 52))       # two opposite corners (box-capable models)
    session.add_point(liver, (131, 90, 41), positive=False)
    mask = session.mask(liver)                                  # bool, the file's own grid
    session.undo(liver); session.reset(liver)
    labels = session.label_map()                                # every object, ids as values

How the image is prepared is ``predict``'s chain (``evaluation/inference.py``): resampled to 1.5 mm (an integer-typed
image as torchio does), reoriented to RAS+, cut into ``S``³ windows (``evaluation/windows.py``) that are z-normalised
and encoded once each; the embeddings are cached per window (least recently used first out). An object's prediction
replays its prompts in every window it covers, in the order given (each decode sees the previous low-res logits,
upstream's interactive chain), starting from zeros or from the object's latest ``set_mask``; decodes of all objects
being computed are batched (``evaluation/objects.py``), and the chain state after every prompt sequence is cached,
so a new click costs one decode per window and ``undo`` none. Window placement:

- ``windows="centred"`` (default): the object's first window is centred on the extent of its positive prompts (box,
  positive clicks, initial mask); an extent larger than ``S`` is tiled. ``windows="grid"``: the same on a lattice,
  so objects near each other share windows and encodes (their prompts stay within ``S/8`` of the centre).
- Growth (``grow=True``): where a window's mask reaches one of its faces and the volume continues, the neighbour
  window (``S/2`` further) runs too, seeded with a positive click at the mask's deepest voxel of the overlap, until no
  mask reaches an open face or ``max_windows`` windows ran. ``recentre=N`` moves a single first window onto its own
  prediction up to N times. A window without a positive prompt is not run (negative clicks alone name nothing).
- A box becomes the 3-D box prompt (clipped to each window it meets) on a model with box embeddings, else a positive
  click at the centre of its part inside the window (upstream's challenge baseline); ``box_mode`` chooses.
- Probabilities of an object's windows are averaged; its mask is ``probability > 0.5`` (``inference.MASK_THRESHOLD``);
  in ``label_map`` a voxel takes the object of highest probability above 0.5 (ties: the lower id).

``set_mask`` gives an object a mask (on the image grid): it is the object's prediction until the next prompt, and the
first mask prompt of the prompts after it (each window's low-res logits are the logits of the fraction of its cell
inside the mask, clipped to +-``MASK_PROMPT_LOGIT``); prompts given before it are kept for ``undo`` only.

Imports the evaluation inference chain, windows, objects and the data readers; never the training code or configs.
"""

import collections
import dataclasses
import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Bool, Real
from scipy import special

from sammed3d_jax.data import transforms
from sammed3d_jax.data.nifti import Geometry, read_image, reorient_to_ras
from sammed3d_jax.evaluation import inference
from sammed3d_jax.evaluation import windows as win
from sammed3d_jax.evaluation.objects import Chain, ObjectDecoder, Prompt

WINDOW_POLICIES = ("centred", "grid")
BOX_MODES = ("auto", "box", "click")
MASK_PROMPT_LOGIT = float(special.logit(0.999))  # 6.9: a cell fully inside (outside) the given mask


@dataclasses.dataclass(frozen=True)
class _Action:
    id: int
    kind: str  # "point", "box" or "mask"
    coords: np.ndarray | None = None  # model grid: point [3], box [6] = lo, hi
    positive: bool = True
    mask: np.ndarray | None = None  # model-grid bool (mask actions)


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """How an object's current prediction was made.

    Attributes:
        windows: start (model grid) of every window run, in order.
        complete: False when growth stopped at ``max_windows`` with windows still queued.
        recentred: how often the first window moved onto its own prediction.
        notes: windows that could not be run and why, or why the object is empty.
    """

    windows: tuple[tuple[int, int, int], ...] = ()
    complete: bool = True
    recentred: int = 0
    notes: tuple[str, ...] = ()


@dataclasses.dataclass
class _Result:
    region: tuple[slice, ...]
    prob: np.ndarray  # float32 over ``region`` of the model grid
    info: ObjectInfo


@dataclasses.dataclass
class _Object:
    name: str
    actions: list[_Action] = dataclasses.field(default_factory=list)
    result: _Result | None = None


class Session:
    """An interactive segmentation session over one image at a time (see the module docstring).

    Args:
        decoder: the model (``ObjectDecoder``); its click buffer bounds the clicks per object and window.
        spacing_mm: the model's resampling target.
        windows: "centred" or "grid" window placement.
        grow: follow a mask that reaches a window face into neighbour windows.
        max_windows: the most windows run per object (recentring runs not counted), at least 1.
        recentre: the most times a single first window moves onto its own prediction.
        edge_margin: mask voxels this close to an open window face make the window grow there.
        box_mode: "auto" (box prompt when the model has box embeddings, else a centre click), "box" (require box
            embeddings) or "click" (always the centre click).
        cache_windows: embeddings kept (least recently used dropped first).
        cache_chains: chain states kept for cheap further clicks and undo.
    """

    def __init__(self, decoder: ObjectDecoder, *, spacing_mm: Sequence[float] = inference.DEFAULT_SPACING_MM,
                 windows: str = "centred", grow: bool = True, max_windows: int = 27, recentre: int = 0,
                 edge_margin: int = 2, box_mode: str = "auto", cache_windows: int = 64, cache_chains: int = 32):
        if windows not in WINDOW_POLICIES:
            raise ValueError(f"windows must be one of {WINDOW_POLICIES}, got {windows!r}")
        if box_mode not in BOX_MODES:
            raise ValueError(f"box mode must be one of {BOX_MODES}, got {box_mode!r}")
        if box_mode == "box" and not decoder.supports_boxes:
            raise ValueError("this checkpoint has no box embeddings (num_point_embeddings is 2): use a box-capable "
                             "checkpoint or the box mode 'click' or 'auto'")
        for name, value, least in (("max_windows", max_windows, 1), ("recentre", recentre, 0),
                                   ("edge_margin", edge_margin, 1)):
            if int(value) < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        self.decoder = decoder
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.windows, self.grow, self.max_windows = windows, bool(grow), int(max_windows)
        self.recentre, self.edge_margin = int(recentre), int(edge_margin)
        self.box_prompt = "box" if decoder.supports_boxes and box_mode != "click" else "centre click"
        self._cache_windows, self._cache_chains = int(cache_windows), int(cache_chains)
        self.case: inference.ResampledCase | None = None
        self.source = "image"
        self._objects: dict[int, _Object] = {}
        self._ids = itertools.count(1)
        self._action_ids = itertools.count(1)
        self._embeddings: collections.OrderedDict = collections.OrderedDict()
        self._chains: collections.OrderedDict = collections.OrderedDict()
        self.encodes = 0

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *, model_config: str | None = None, dtype: str = "",
                        max_prompts: int = 16, **kwargs: Any) -> "Session":
        """A session over a checkpoint (anything ``evaluation/checkpoints.py`` reads)."""
        from sammed3d_jax.evaluation.checkpoints import load_checkpoint

        loaded = load_checkpoint(os.fspath(checkpoint), model_config, dtype)
        return cls(ObjectDecoder.from_model(loaded.variables, loaded.cfg, max_prompts=max_prompts), **kwargs)

    # --- The image ---

    def open(self, image: str | os.PathLike | Real[np.ndarray, "h w d"], affine: np.ndarray | None = None, *,
             name: str | None = None) -> "Session":
        """Opens a NIfTI file (any ``etils.epath`` path) or an array with its 4x4 voxel-to-RAS+ ``affine``; forgets
        the previous image's objects and windows. An integer-typed image is resampled as torchio does."""
        if isinstance(image, np.ndarray):
            if affine is None:
                raise ValueError("an image array needs its affine (4x4 voxel -> RAS+ mm)")
            if image.ndim != 3:
                raise ValueError(f"the image must be 3-D, got shape {image.shape}")
            geom, array, source = Geometry(np.asarray(affine, np.float64), image.shape), image, name or "image"
        else:
            array, geom = read_image(image, keep_integer=True)
            source = name or os.fspath(image)
        return self.open_resampled(inference.resample_case(array, geom, None, self.spacing_mm), source)

    def open_resampled(self, case: inference.ResampledCase, source: str = "image") -> "Session":
        """Opens an image already on the model grid (``inference.resample_case``), e.g. shared with an evaluation."""
        self.case, self.source = case, source
        self._objects.clear()
        self._embeddings.clear()
        self._chains.clear()
        return self

    @property
    def geometry(self) -> Geometry:
        """The opened image's own geometry (what masks are returned on)."""
        return self._case().original_geom

    def _case(self) -> inference.ResampledCase:
        if self.case is None:
            raise ValueError("no image is open: call Session.open first")
        return self.case

    # --- Objects and prompts ---

    def add_object(self, name: str | None = None) -> int:
        """A new empty object; returns its id (1, 2, ...: its value in ``label_map``)."""
        self._case()
        oid = next(self._ids)
        self._objects[oid] = _Object(name or f"object {oid}")
        return oid

    @property
    def objects(self) -> list[int]:
        return list(self._objects)

    def _object(self, obj: int) -> _Object:
        if obj not in self._objects:
            raise ValueError(f"no object {obj} in this session (objects: {self.objects})")
        return self._objects[obj]

    def _act(self, obj: int, **fields: Any) -> None:
        o = self._object(obj)
        o.actions.append(_Action(next(self._action_ids), **fields))
        o.result = None

    def add_point(self, obj: int, point: Sequence[float | int] | np.ndarray, positive: bool = True, *,
                  world: bool = False) -> None:
        """A click on ``obj``: voxel indices of the image (float allowed), or RAS+ mm with ``world``."""
        case = self._case()
        p = win.to_model_grid(np.asarray(point, np.float64)[None], case.original_geom, case.geom, world,
                              self.source, what=f"{self._object(obj).name}")[0]
        self._act(obj, kind="point", coords=p, positive=bool(positive))

    def add_box(self, obj: int, lo: Sequence[float | int] | np.ndarray, hi: Sequence[float | int] | np.ndarray, *,
                world: bool = False) -> None:
        """A 3-D box on ``obj`` by two opposite corners (inclusive voxel indices, or RAS+ mm with ``world``); a later
        box of the same object replaces it (one box per object, as the model takes)."""
        case = self._case()
        a, b = win.box_to_model_grid(lo, hi, case.original_geom, case.geom, world, self.source,
                                     what=f"{self._object(obj).name} box")
        self._act(obj, kind="box", coords=np.concatenate([a, b]).astype(np.float32))

    def set_mask(self, obj: int, mask: Bool[np.ndarray, "h w d"]) -> None:
        """Gives ``obj`` a mask on the image grid: its prediction until the next prompt, and that prompt's start."""
        case = self._case()
        mask = np.asarray(mask)
        if mask.shape != case.original_geom.shape:
            raise ValueError(f"the mask's shape {mask.shape} differs from the image's {case.original_geom.shape}")
        lab, grid = transforms.resample_to_spacing(mask.astype(np.uint8), case.original_geom, self.spacing_mm, 0)
        ras, _ = reorient_to_ras(lab, grid)
        self._act(obj, kind="mask", mask=ras > 0)

    def undo(self, obj: int) -> str:
        """Removes the object's latest prompt; returns its kind ("point", "box" or "mask")."""
        o = self._object(obj)
        if not o.actions:
            raise ValueError(f"{o.name} has nothing to undo")
        o.result = None
        return o.actions.pop().kind

    def reset(self, obj: int) -> None:
        """Removes every prompt of the object (it stays, empty)."""
        o = self._object(obj)
        o.actions.clear()
        o.result = None

    def has_prompts(self, obj: int) -> bool:
        """Whether the object has any prompt (point, box or mask)."""
        return bool(self._object(obj).actions)

    def remove_object(self, obj: int) -> None:
        """Forgets the object."""
        self._object(obj)
        del self._objects[obj]

    # --- Results ---

    def compute(self, objects: Sequence[int] | None = None) -> None:
        """Brings the given objects (default: all) up to date, decoding all of them together."""
        from sammed3d_jax.session_compute import compute_objects

        todo = [o for o in (self.objects if objects is None else objects) if self._object(o).result is None]
        if todo:
            for oid, result in compute_objects(self, {o: self._objects[o] for o in todo}).items():
                self._objects[oid].result = result

    def info(self, obj: int) -> ObjectInfo:
        """How the object's current prediction was made (computes it if needed)."""
        self.compute([obj])
        return self._object(obj).result.info

    def probability(self, obj: int) -> np.ndarray:
        """The object's probability on the model grid (float32, 0 where no window ran)."""
        self.compute([obj])
        r = self._object(obj).result
        out = np.zeros(self._case().geom.shape, np.float32)
        out[r.region] = r.prob
        return out

    def mask(self, obj: int) -> np.ndarray:
        """The object's mask (bool) on the opened image's own grid."""
        case = self._case()
        model = inference.mask_from_probabilities(self.probability(obj))
        return inference.paste_back(model, case.geom, case.original_geom)

    def label_map(self, objects: Sequence[int] | None = None) -> np.ndarray:
        """All objects (or the given ones) as one label map on the image grid: value = object id, 0 = background;
        where objects overlap the one of highest probability wins (ties: the lower id)."""
        case = self._case()
        objects = self.objects if objects is None else list(objects)
        self.compute(objects)
        dtype = np.uint8 if max(objects, default=0) < 256 else np.uint16
        best = np.zeros(case.geom.shape, np.float32)
        labels = np.zeros(case.geom.shape, dtype)
        for oid in objects:
            r = self._objects[oid].result
            take = inference.mask_from_probabilities(r.prob) & (r.prob > best[r.region])
            best[r.region] = np.where(take, r.prob, best[r.region])
            labels[r.region] = np.where(take, dtype(oid), labels[r.region])
        return inference.paste_back(labels, case.geom, case.original_geom)

    # --- Caches (used by session_compute) ---

    def embedding(self, start: tuple[int, int, int]):
        """The window's embedding (encoded once, cached), or the reason it cannot be segmented (a str)."""
        if start in self._embeddings:
            self._embeddings.move_to_end(start)
            return self._embeddings[start]
        case = self._case()
        crop = inference.window_at(case.geom.shape, start, self.decoder.crop_size)
        try:
            value = self.decoder.encode(inference.crop_roi(case, crop, name=f"window at {list(start)}").image)
            self.encodes += 1
        except ValueError as err:  # e.g. a window over empty background: nothing to normalise or segment
            value = str(err)
        self._embeddings[start] = value
        while len(self._embeddings) > self._cache_windows:
            self._embeddings.popitem(last=False)
        return value

    def cached_chain(self, key: tuple, prompt_keys: Sequence[tuple]) -> tuple[int, Chain | None]:
        """The longest cached prefix of ``prompt_keys`` for ``key``: (its length, its chain) or (0, None)."""
        for n in range(len(prompt_keys), 0, -1):
            chain = self._chains.get((key, tuple(prompt_keys[:n])))
            if chain is not None:
                self._chains.move_to_end((key, tuple(prompt_keys[:n])))
                return n, chain
        return 0, None

    def store_chain(self, key: tuple, prompt_keys: Sequence[tuple], chain: Chain) -> None:
        if not prompt_keys or self._cache_chains == 0:
            return
        self._chains[(key, tuple(prompt_keys))] = chain
        while len(self._chains) > self._cache_chains:
            self._chains.popitem(last=False)

    def box_prompt_for(self, box6: np.ndarray, start: Sequence[int]) -> Prompt | None:
        """The box as a prompt of the window at ``start`` (None when they do not meet)."""
        s = self.decoder.crop_size
        origin = np.asarray(start, np.float64)
        lo, hi = box6[:3] - origin, box6[3:] - origin
        if np.any(hi < -0.5) or np.any(lo >= s - 0.5):
            return None
        lo, hi = np.clip(lo, 0, s - 1), np.clip(hi, 0, s - 1)
        if self.box_prompt == "box":
            return Prompt("box", tuple(float(v) for v in np.concatenate([lo, hi])))
        return Prompt("click", tuple(float(v) for v in (lo + hi) / 2), True)
