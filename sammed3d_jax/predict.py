"""``python -m sammed3d_jax.predict --checkpoint DIR --image scan.nii.gz --points "i,j,k:+;i,j,k:-" --out mask.nii.gz``

Segments a user's own scan from a few clicks, without ground truth. Points are voxel indices of the input file in
its own axis order (what a viewer shows as the voxel coordinate), or with ``--world`` scanner coordinates in mm
(the NIfTI world frame nibabel uses, RAS+; tools that display LPS need x and y negated). ``+`` marks the target,
``-`` background. The output mask (uint8, 1 = target) has the input's exact shape and affine.

How a scan is processed (the inference chain of ``evaluation/inference.py``): resample to 1.5 mm, reorient to
RAS+, crop ``S``³ windows (``S`` = the model's crop), z-normalise each window, encode once per window, then feed the
clicks inside the window one after another, each decode seeing every click so far and the previous logits
(upstream's interactive loop); probabilities of all windows are averaged and thresholded at
``inference.MASK_THRESHOLD`` (0.5), then pasted back. The output never replaces the input: ``--out`` equal to
``--image`` is refused, an existing ``--out`` needs ``--overwrite``, and the mask is written beside it first.

Windows (upstream crops around the ground truth, which a user does not have; the paper extends a first crop with
50 %-overlap sliding windows where the prediction reaches the patch edge, which is what we do):

1. The first window is centred on the bounding box of the positive clicks. If they span more than ``S`` along an
   axis, that axis is tiled with stride ``S/2`` over their extent instead. A window without a positive click is
   not run (negative clicks alone do not name a target).
2. Optional recentring (``--recentre N``, default 0 = off): upstream crops are centred on the target's bounding
   box (in training too), and such models segment best with the target in the middle of the window, which a
   click on the target's edge does not give. With N > 0 a single first window is moved onto the bounding box of
   its own prediction (along the axes where the mask stays clear of the faces, and only if no click leaves or
   enters the window) and run again, at most N times; only the last run is kept. With the CPU demo model this
   helped for some clicks and hurt for others (a false positive drags the window away), hence off by default.
3. Growth: when a window's mask touches one of its faces (foreground within ``edge_margin`` voxels of it) and the
   volume continues beyond that face, a neighbour window shifted by ``S/2`` across that face is queued. It is
   prompted with a positive click at the deepest point (Euclidean distance transform maximum) of the current
   mask inside the two windows' overlap, plus any user clicks inside it.
4. This repeats breadth-first until no mask touches an open face or ``max_windows`` windows ran (then the result
   says so). ``--single-window`` keeps only the first window (after recentring), as upstream keeps one crop.

Must not import the training code or configs.
"""

import argparse
import collections
import dataclasses
import itertools
import math
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath
from jaxtyping import Bool, Float
from scipy import ndimage, special

from sammed3d_jax import cli
from sammed3d_jax.data.nifti import Geometry, read_image, write_nifti
from sammed3d_jax.evaluation import inference

NIFTI_SUFFIXES = (".nii.gz", ".nii")
POINTS_FORMAT = "'i,j,k:+' entries separated by ';' (':-' marks background, no sign means '+')"
POINTS_HELP = (f"clicks as {POINTS_FORMAT}, e.g. '58,39,13:+;60,30,13:-': voxel indices of --image, or RAS+ mm "
               "with --world")
_SIGNS = {"+": True, "pos": True, "positive": True, "1": True, "-": False, "neg": False, "negative": False, "0": False}


def parse_points(text: str) -> tuple[Float[np.ndarray, "n 3"], Bool[np.ndarray, " n"]]:
    """Parses ``"i,j,k:+;i,j,k:-"`` into coordinates ``[n, 3]`` and positive flags ``[n]`` (a missing sign is +).

    Raises:
        ValueError: naming the entry that is not 'i,j,k' (three finite numbers) with an optional ``:+``/``:-``.
    """
    coords, positive = [], []
    entries = [e.strip() for e in text.replace("\n", ";").split(";") if e.strip()]
    if not entries:
        raise ValueError(f"--points: no point given; expected {POINTS_FORMAT}")
    for n, entry in enumerate(entries, 1):
        xyz, _, sign = entry.partition(":")
        sign = sign.strip().lower() or "+"
        try:
            values = [float(v) for v in xyz.replace(" ", "").split(",")]
        except ValueError:
            values = []
        if len(values) != 3 or not all(math.isfinite(v) for v in values) or sign not in _SIGNS:
            raise ValueError(f"--points: entry {n} {entry!r} is not 'i,j,k' with an optional ':+' or ':-' "
                             "(entries are separated by ';')")
        coords.append(values)
        positive.append(_SIGNS[sign])
    return np.asarray(coords, np.float64), np.asarray(positive, bool)


def to_model_grid(coords: Float[np.ndarray, "n 3"], geom: Geometry, grid: Geometry, world: bool = False,
                  source: str = "image") -> Float[np.ndarray, "n 3"]:
    """Maps clicks (file voxel indices, or world mm with ``world``) to voxel indices of ``grid`` (the model's grid).

    Raises:
        ValueError: a click outside the image volume, naming the click, the volume shape and ``source``.
    """
    homogeneous = np.c_[coords, np.ones(len(coords))]
    world_mm = homogeneous @ geom.affine.T if not world else homogeneous
    voxels = (world_mm @ np.linalg.inv(geom.affine).T)[:, :3]
    shape = np.asarray(geom.shape)
    for n, (v, c) in enumerate(zip(voxels, coords, strict=True), 1):
        if np.any(v < -0.5) or np.any(v >= shape - 0.5):
            where = f"world {c.tolist()} mm = voxel {np.round(v, 2).tolist()}" if world else f"voxel {c.tolist()}"
            raise ValueError(f"--points: point {n} ({where}) lies outside the volume of shape {geom.shape} "
                             f"({source})")
    on_grid = (world_mm @ np.linalg.inv(grid.affine).T)[:, :3]
    return np.clip(on_grid, 0, np.asarray(grid.shape) - 1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted mask on the input's grid and how it was made.

    Attributes:
        mask: bool ``[h, w, d]`` on the input image's grid.
        windows: start index (model grid) of every window run, in order.
        complete: False when growth stopped at ``max_windows`` with windows still queued.
        recentred: how often the first window was moved onto its own prediction before being kept.
    """

    mask: np.ndarray
    windows: tuple[tuple[int, int, int], ...]
    complete: bool
    recentred: int = 0


def _initial_starts(points: np.ndarray, positive: np.ndarray, size: int, tile: bool) -> list[tuple[int, ...]]:
    ref = points[positive] if positive.any() else points
    lo, hi = np.floor(ref.min(0)).astype(int), np.floor(ref.max(0)).astype(int) + 1
    per_axis = []
    for a in range(3):
        centre_start = math.floor((lo[a] + hi[a]) / 2 - size / 2)
        if hi[a] - lo[a] <= size or not tile:
            per_axis.append([centre_start])
            continue
        stride = size // 2
        first = lo[a] - stride // 2
        per_axis.append(list(range(first, hi[a] - size + stride, stride)))
    return [tuple(s) for s in itertools.product(*per_axis)]


def _inside(points: np.ndarray, start: Sequence[int], size: int) -> np.ndarray:
    rel = points - np.asarray(start)
    return np.all((rel >= 0) & (rel <= size - 1), axis=1)


def _deepest(mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray | None:
    """The voxel of ``mask`` inside ``box`` farthest from the mask's border (global index), or None if empty."""
    part = mask[box]
    if not part.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1, 1:-1]
    local = np.unravel_index(int(np.argmax(depth)), part.shape)
    return np.asarray([b.start + i for b, i in zip(box, local, strict=True)], np.float32)


def _window_clicks(points, positive, start, size, seed):
    inside = _inside(points, start, size)
    own = [(p, bool(s)) for p, s, i in zip(points, positive, inside, strict=True) if i]
    return ([(seed, True)] if seed is not None else []) + own


def _run_window(segmenter, case, start, clicks, source) -> np.ndarray:
    """Probabilities ``[S, S, S]`` of one window after feeding its clicks one by one (raises if not normalisable)."""
    crop = inference.window_at(case.geom.shape, start, segmenter.crop_size)
    roi = inference.crop_roi(case, crop, name=f"{source} window at {list(start)}")
    inter = segmenter.start(roi.image)
    for p, positive in clicks:
        inter = segmenter.click(inter, np.asarray(p) - np.asarray(start), positive)
    return special.expit(np.asarray(inter.logits[0], np.float32))


def _recentred(start, local_mask, size, points, edge_margin):
    """The window centred (torchio's rule) on the mask's bounding box along the axes where the mask stays clear of
    both faces, or None when that changes nothing or would drop a click of the window."""
    fg = np.argwhere(local_mask)
    if not len(fg):
        return None
    lo, hi = fg.min(0), fg.max(0) + 1
    new = list(start)
    for a in range(3):
        if lo[a] >= edge_margin and hi[a] <= size - edge_margin:
            new[a] = start[a] + math.floor((lo[a] + hi[a]) / 2 - size / 2)
    new = tuple(int(v) for v in new)
    if new == tuple(start) or not np.array_equal(_inside(points, start, size), _inside(points, new, size)):
        return None
    return new


def _grown(start, mask, size, shape, edge_margin):
    """(neighbour start, overlap box) for each face of the window that the mask touches and the volume continues."""
    out = []
    for axis, side in itertools.product(range(3), (-1, 1)):
        lo, hi = start[axis], start[axis] + size
        if (side < 0 and lo <= 0) or (side > 0 and hi >= shape[axis]):
            continue  # the window already reaches the volume border there
        face = slice(max(lo, 0), min(lo + edge_margin, shape[axis])) if side < 0 else slice(
            max(hi - edge_margin, 0), min(hi, shape[axis]))
        box = [slice(max(s, 0), min(s + size, n)) for s, n in zip(start, shape, strict=True)]
        if not mask[tuple(box[:axis] + [face] + box[axis + 1:])].any():
            continue
        new = list(start)
        new[axis] = max(lo - size // 2, 0) if side < 0 else min(lo + size // 2, max(int(shape[axis]) - size, 0))
        overlap = tuple(slice(max(a, b, 0), min(a + size, b + size, n)) for a, b, n in zip(start, new, shape,
                                                                                          strict=True))
        out.append((tuple(new), overlap))
    return out


@dataclasses.dataclass
class _WindowSearch:
    """The breadth-first walk over windows of one prediction: the queue, the probabilities summed so far, the log."""

    segmenter: inference.Segmenter
    case: inference.ResampledCase
    points: np.ndarray
    positive: np.ndarray
    edge_margin: int
    source: str

    def __post_init__(self):
        shape = self.case.geom.shape
        self.prob_sum = np.zeros(shape, np.float32)
        self.weight = np.zeros(shape, np.float32)
        self.queue: collections.deque = collections.deque()
        self.queued: set[tuple[int, ...]] = set()
        self.ran: list[tuple[int, int, int]] = []
        self.problems: list[str] = []
        self.recentred = 0

    @property
    def size(self) -> int:
        return self.segmenter.crop_size

    def push(self, start: tuple[int, ...], seed: np.ndarray | None = None, first: bool = False) -> None:
        (self.queue.appendleft if first else self.queue.append)((start, seed))
        self.queued.add(start)

    def run(self, start: tuple[int, ...], seed: np.ndarray | None) -> np.ndarray | None:
        """The window's probabilities, or None when it has no positive click or cannot be normalised (logged)."""
        clicks = _window_clicks(self.points, self.positive, start, self.size, seed)
        if not any(s for _, s in clicks):
            self.queued.discard(start)  # a later grown window may reach it with a propagated click
            return None
        try:
            return _run_window(self.segmenter, self.case, start, clicks, self.source)
        except ValueError as err:  # e.g. a window over empty background (no voxel > 0): nothing to segment
            self.problems.append(cli.one_line(err))
            return None

    def keep(self, start: tuple[int, ...], prob: np.ndarray) -> np.ndarray:
        """Adds a window's probabilities to the running average; returns its mask on the whole model grid."""
        src, dst = inference.window_at(self.case.geom.shape, start, self.size).overlap()
        self.prob_sum[src] += prob[dst]
        self.weight[src] += 1.0
        self.ran.append(tuple(int(s) for s in start))
        mask = np.zeros(self.case.geom.shape, bool)
        mask[src] = inference.mask_from_probabilities(prob[dst])
        return mask

    def grow(self, start: tuple[int, ...], mask: np.ndarray) -> None:
        """Queues the neighbour across every open face the mask touches, seeded at the mask's deepest shared voxel."""
        for new, overlap in _grown(start, mask, self.size, np.asarray(self.case.geom.shape), self.edge_margin):
            deepest = None if new in self.queued else _deepest(mask, overlap)
            if deepest is not None:
                self.push(new, deepest)

    def mask(self) -> np.ndarray:
        """The averaged probabilities thresholded, on the model grid (False where no window ran)."""
        covered = self.weight > 0
        out = np.zeros(self.case.geom.shape, bool)
        out[covered] = inference.mask_from_probabilities(self.prob_sum[covered] / self.weight[covered])
        return out


def _check_limits(max_windows: int, recentre: int, edge_margin: int = 1) -> None:
    for name, value, least in (("--max-windows", max_windows, 1), ("--recentre", recentre, 0),
                               ("edge_margin", edge_margin, 1)):
        if int(value) < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def predict_mask(segmenter: inference.Segmenter, image: Float[np.ndarray, "h w d"], geom: Geometry,
                 coords: Float[np.ndarray, "n 3"], positive: Bool[np.ndarray, " n"], *, world: bool = False,
                 spacing_mm: Sequence[float] = inference.DEFAULT_SPACING_MM, tile: bool = True, max_windows: int = 27,
                 recentre: int = 0, edge_margin: int = 2, source: str = "image") -> Prediction:
    """Segments the target named by the clicks (see the module docstring for the windows).

    Args:
        segmenter: the jitted model (its buffer must hold every click of a window plus one propagated click).
        image: the scan as read from the file, with ``geom``.
        coords: clicks, file voxel indices (or world mm with ``world``); ``positive`` marks target clicks.
        spacing_mm: the model's resampling target.
        tile: tile and grow windows (False: one window around the clicks).
        max_windows: the most windows run (recentring runs not counted), at least 1.
        recentre: the most times the first window is recentred on its own prediction.
        edge_margin: mask voxels this close to an open window face make the window grow there.
        source: name of the image for messages.

    Returns:
        The mask on the input grid and the windows used.

    Raises:
        ValueError: a bad request (no positive click, too many clicks, a click outside the image, a bad limit), or
            no window around the clicks could be segmented (with each window's reason).
    """
    _check_limits(max_windows, recentre, edge_margin)
    if not positive.any():
        raise ValueError("--points: give at least one positive click (':+') to name the target")
    if len(coords) + 1 > segmenter.max_clicks:
        raise ValueError(f"--points: {len(coords)} clicks; at most {segmenter.max_clicks - 1} fit the click buffer")
    case = inference.resample_case(image, geom, None, spacing_mm)
    points = to_model_grid(coords, geom, case.geom, world, source)
    size = segmenter.crop_size
    starts = _initial_starts(points, positive, size, tile)
    if not tile and not np.all(_inside(points, starts[0], size)):
        raise ValueError(f"--points: the clicks span more than one {size}^3 window at {spacing_mm} mm; allow tiling")
    search = _WindowSearch(segmenter, case, points, positive, edge_margin, source)
    for start in starts:
        search.push(start)
    while search.queue and len(search.ran) < max_windows:
        start, seed = search.queue.popleft()
        prob = search.run(start, seed)
        if prob is None:
            continue
        if not search.ran and len(starts) == 1 and search.recentred < recentre:
            # Upstream crops are centred on the target (CropOrPad around the label, in training too), and models
            # segment best with the target in the middle of the window; clicks need not be there.
            new = _recentred(start, inference.mask_from_probabilities(prob), size, points, edge_margin)
            if new is not None:
                search.recentred += 1
                search.push(new, first=True)
                continue
        mask = search.keep(start, prob)
        if tile:
            search.grow(start, mask)
        else:
            break
    if not search.ran:
        reasons = "; ".join(search.problems) or "no window held a positive click"
        raise ValueError(f"{source}: no window around the clicks could be segmented: {reasons}")
    mask = inference.paste_back(search.mask(), case.geom, case.original_geom)
    return Prediction(mask, tuple(search.ran), not search.queue, search.recentred)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", required=True, help="params dir, training workdir, Orbax dir or .pth file")
    parser.add_argument("--image", required=True, help="input scan (.nii/.nii.gz)")
    parser.add_argument("--points", required=True, help=POINTS_HELP)
    parser.add_argument("--out", required=True, help="output mask (.nii/.nii.gz), same grid as --image")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the --image)")
    parser.add_argument("--world", action="store_true", help="points are world coordinates in mm (RAS+)")
    parser.add_argument("--single-window", action="store_true", help="one crop around the clicks, no tiling")
    parser.add_argument("--max-windows", type=int, default=27, help="most windows run when tiling (default 27)")
    parser.add_argument("--recentre", type=int, default=0,
                        help="times the first window may move onto its own prediction (default 0: never)")
    parser.add_argument("--config", default="", help="model variant/config JSON for checkpoints without one")
    parser.add_argument("--dtype", default="", help="compute dtype override, e.g. float32")
    argv, glued = list(sys.argv[1:] if argv is None else argv), []
    # World coordinates start with "-" (e.g. "-20.5,3,4:+"), which argparse would read as an option: glue the
    # value of --points to its flag.
    while argv:
        arg = argv.pop(0)
        glued.append(f"--points={argv.pop(0)}" if arg == "--points" and argv else arg)
    return parser.parse_args(glued)


def _check_arguments(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Everything about the command line that can be refused before reading a file or the model."""
    coords, positive = parse_points(args.points)
    _check_limits(args.max_windows, args.recentre)
    if not any(args.out.endswith(s) for s in NIFTI_SUFFIXES):
        raise cli.UsageError(f"--out {args.out}: the file name must end in .nii or .nii.gz")
    for name, path in (("--image", args.image), ("--checkpoint", args.checkpoint)):
        if not epath.Path(path).exists():
            raise cli.UsageError(f"{name} {path}: does not exist")
    cli.check_output_path(args.out, inputs=[args.image, args.checkpoint], overwrite=args.overwrite, name="--out")
    return coords, positive


def _write_mask(path: str, mask: np.ndarray, geom: Geometry) -> None:
    """Writes beside ``path`` first and moves into place, so a failed write never leaves half a file there."""
    out = epath.Path(path)
    suffix = next(s for s in NIFTI_SUFFIXES if out.name.endswith(s))
    partial = out.parent / f".{out.name[: -len(suffix)]}.partial{suffix}"
    try:
        write_nifti(partial, mask.astype(np.uint8), geom)
        partial.replace(out)
    finally:
        if partial.exists():
            partial.unlink()


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """Runs the prediction CLI; returns 0, or exits with status 2 and one line for bad input."""
    args = _parse_args(argv)
    cli.quiet_library_logs()
    coords, positive = _check_arguments(args)
    image, geom = read_image(args.image)
    from sammed3d_jax.evaluation.checkpoints import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, args.config or None, args.dtype, config_flag="--config")
    segmenter = inference.Segmenter.from_model(loaded.variables, loaded.cfg, max_clicks=max(8, len(coords) + 1))
    result = predict_mask(segmenter, image, geom, coords, positive, world=args.world, tile=not args.single_window,
                          max_windows=args.max_windows, recentre=args.recentre, source=args.image)
    _write_mask(args.out, result.mask, geom)
    note = "" if result.complete else f" (stopped at --max-windows {args.max_windows}; the mask may be cut)"
    if not result.mask.any():
        note += " (empty: try a click nearer the middle of the target, or more clicks)"
    print(f"wrote {args.out}: {int(result.mask.sum())} voxels in {len(result.windows)} window(s){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
