"""``python -m sammed3d_jax.predict --checkpoint DIR --image scan.nii.gz --points "i,j,k:+;i,j,k:-" --out mask.nii.gz``

Segments a user's own scan from a few clicks or a box, without ground truth: a thin command line over the session
API (``sammed3d_jax/session.py``, which documents the windows and the prompt chain). Points are voxel indices of the
input file in its own axis order (what a viewer shows as the voxel coordinate), or with ``--world`` scanner
coordinates in mm (the NIfTI world frame nibabel uses, RAS+; tools that display LPS need x and y negated). ``+`` marks
the target, ``-`` background. ``--box i0,j0,k0,i1,j1,k1`` adds a box by two opposite corners (inclusive voxels, or
mm with ``--world``): the 3-D box prompt of a box-capable checkpoint, else a positive click at its centre.

Several objects in one run (one image encode per window, shared by the objects whose windows coincide; decodes
batched): repeat ``--object "ENTRIES"``, where ENTRIES are ``;``-separated points and an optional ``box=i0,j0,k0,i1,
j1,k1``; ``--points``/``--box`` are the first object. The output is a mask (uint8, 1 = target) for one object, a
label map (object k = k, in the order given; where objects overlap the more confident one wins) for several, with the
input's exact shape and affine. ``--windows grid`` places windows on a lattice so that nearby objects share them.

The output never replaces the input: ``--out`` equal to ``--image`` is refused, an existing ``--out`` needs
``--overwrite``, and the mask is written beside it first. Compile time (zero when the persistent compilation cache
already holds the model's programs: ``--cache-dir``, ``--no-compilation-cache``) and run time are reported apart.

Must not import the training code or configs.
"""

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath
from jaxtyping import Bool, Float

from sammed3d_jax import cli, compile_cache
from sammed3d_jax.data.nifti import Geometry, read_image, write_nifti
from sammed3d_jax.evaluation import inference
from sammed3d_jax.evaluation import windows as win
from sammed3d_jax.evaluation.objects import ObjectDecoder
from sammed3d_jax.session import Session

NIFTI_SUFFIXES = (".nii.gz", ".nii")
POINTS_FORMAT = "'i,j,k:+' entries separated by ';' (':-' marks background, no sign means '+')"
POINTS_HELP = (f"clicks as {POINTS_FORMAT}, e.g. '58,39,13:+;60,30,13:-': voxel indices of --image, or RAS+ mm "
               "with --world")
BOX_FORMAT = "'i0,j0,k0,i1,j1,k1' (two opposite corners, inclusive)"
_SIGNS = {"+": True, "pos": True, "positive": True, "1": True, "-": False, "neg": False, "negative": False, "0": False}
to_model_grid = win.to_model_grid


def _numbers(text: str, n: int) -> list[float] | None:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def parse_points(text: str, flag: str = "--points", allow_empty: bool = False
                 ) -> tuple[Float[np.ndarray, "n 3"], Bool[np.ndarray, " n"]]:
    """Parses ``"i,j,k:+;i,j,k:-"`` into coordinates ``[n, 3]`` and positive flags ``[n]`` (a missing sign is +).

    Raises:
        ValueError: naming the entry that is not 'i,j,k' (three finite numbers) with an optional ``:+``/``:-``.
    """
    coords, positive = [], []
    entries = [e.strip() for e in text.replace("\n", ";").split(";") if e.strip()]
    if not entries and not allow_empty:
        raise ValueError(f"{flag}: no point given; expected {POINTS_FORMAT}")
    for n, entry in enumerate(entries, 1):
        xyz, _, sign = entry.partition(":")
        sign = sign.strip().lower() or "+"
        values = _numbers(xyz, 3)
        if values is None or sign not in _SIGNS:
            raise ValueError(f"{flag}: entry {n} {entry!r} is not 'i,j,k' with an optional ':+' or ':-' "
                             "(entries are separated by ';')")
        coords.append(values)
        positive.append(_SIGNS[sign])
    return np.asarray(coords, np.float64).reshape(-1, 3), np.asarray(positive, bool)


def parse_box(text: str, flag: str = "--box") -> tuple[np.ndarray, np.ndarray]:
    """Parses ``"i0,j0,k0,i1,j1,k1"`` into two corners ``(lo [3], hi [3])``.

    Raises:
        ValueError: not six finite numbers, or a first corner above the second along an axis.
    """
    values = _numbers(text, 6)
    if values is None:
        raise ValueError(f"{flag}: {text!r} is not a box {BOX_FORMAT}")
    lo, hi = np.asarray(values[:3]), np.asarray(values[3:])
    if np.any(lo > hi):
        raise ValueError(f"{flag}: {text!r}: the first corner must be the lower one along every axis")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class ObjectPrompts:
    """One object of the command line: clicks (``coords [n, 3]``, ``positive [n]``) and an optional box."""

    coords: np.ndarray
    positive: np.ndarray
    box: tuple[np.ndarray, np.ndarray] | None = None


def parse_object(text: str, flag: str = "--object") -> ObjectPrompts:
    """``"i,j,k:+;...;box=i0,j0,k0,i1,j1,k1"``: points and at most one box of one object."""
    entries = [e.strip() for e in text.replace("\n", ";").split(";") if e.strip()]
    boxes = [e for e in entries if e.lower().startswith("box=")]
    if len(boxes) > 1:
        raise ValueError(f"{flag}: {text!r} has {len(boxes)} boxes; an object takes one")
    coords, positive = parse_points(";".join(e for e in entries if e not in boxes), flag, allow_empty=True)
    box = parse_box(boxes[0][4:], flag) if boxes else None
    if box is None and not positive.any():
        raise ValueError(f"{flag}: {text!r} names no target: give a positive click (':+') or a box")
    return ObjectPrompts(coords, positive, box)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted mask (one object) or label map (several) on the input's grid and how it was made.

    Attributes:
        mask: bool ``[h, w, d]`` (one object) or uint8 label map (several), on the input image's grid.
        windows: start index (model grid) of every window run, per object, in order (flattened for one object).
        complete: False when growth stopped at ``max_windows`` with windows still queued (any object).
        recentred: how often the first window was moved onto its own prediction (first object).
        encodes: windows encoded (shared by the objects).
        voxels: voxels of each object in the output.
    """

    mask: np.ndarray
    windows: tuple
    complete: bool
    recentred: int = 0
    encodes: int = 0
    voxels: tuple[int, ...] = ()


def _decoder(model: ObjectDecoder | inference.Segmenter) -> ObjectDecoder:
    return model if isinstance(model, ObjectDecoder) else ObjectDecoder.from_segmenter(model)


def predict_objects(model: ObjectDecoder | inference.Segmenter, image: np.ndarray, geom: Geometry,
                    objects: Sequence[ObjectPrompts], *, world: bool = False,
                    spacing_mm: Sequence[float] = inference.DEFAULT_SPACING_MM, tile: bool = True,
                    max_windows: int = 27, recentre: int = 0, edge_margin: int = 2, windows: str = "centred",
                    box_mode: str = "auto", source: str = "image") -> Prediction:
    """Segments each object named by its prompts (one mask, or a label map for several; see the module docstring).

    Raises:
        ValueError: a bad request (a point or box outside the image, too many clicks, a bad limit, clicks spanning
            more than one window without tiling) or an object whose windows could not be segmented (with reasons).
    """
    decoder = _decoder(model)
    session = Session(decoder, spacing_mm=spacing_mm, windows=windows, grow=tile, max_windows=max_windows if tile
                      else 1, recentre=recentre, edge_margin=edge_margin, box_mode=box_mode)
    session.open(image, geom.affine, name=source)
    case, size = session.case, decoder.crop_size
    ids = []
    for k, obj in enumerate(objects, 1):
        what = "--points" if len(objects) == 1 else f"object {k}"
        n_clicks = len(obj.coords) + (1 if obj.box is not None and session.box_prompt != "box" else 0)
        if n_clicks + 1 > decoder.max_prompts:
            raise ValueError(f"{what}: {n_clicks} clicks; at most {decoder.max_prompts - 1} fit the click buffer")
        model_points = win.to_model_grid(obj.coords, geom, case.geom, world, source, what)
        extent = list(model_points[obj.positive])
        oid = session.add_object(what)
        if obj.box is not None:
            session.add_box(oid, *obj.box, world=world)
            extent += list(win.box_to_model_grid(*obj.box, geom, case.geom, world, source))
        for c, p in zip(obj.coords, obj.positive, strict=True):
            session.add_point(oid, c, bool(p), world=world)
        lo, hi = win.voxel_extent(np.asarray(extent))
        if not tile and np.any(hi - lo > size):
            raise ValueError(f"{what}: the prompts span more than one {size}^3 window at {spacing_mm} mm; allow "
                             "tiling")
        ids.append(oid)
    session.compute(ids)
    infos = [session.info(oid) for oid in ids]
    for info in infos:
        if not info.windows:
            raise ValueError(info.notes[-1])
    if len(ids) == 1:
        out = session.mask(ids[0])
        voxels = (int(out.sum()),)
    else:
        out = session.label_map(ids)
        voxels = tuple(int((out == oid).sum()) for oid in ids)
    windows_run = infos[0].windows if len(ids) == 1 else tuple(i.windows for i in infos)
    return Prediction(out, windows_run, all(i.complete for i in infos), infos[0].recentred, session.encodes, voxels)


def predict_mask(model: ObjectDecoder | inference.Segmenter, image: Float[np.ndarray, "h w d"], geom: Geometry,
                 coords: Float[np.ndarray, "n 3"], positive: Bool[np.ndarray, " n"], *, world: bool = False,
                 spacing_mm: Sequence[float] = inference.DEFAULT_SPACING_MM, tile: bool = True, max_windows: int = 27,
                 recentre: int = 0, edge_margin: int = 2, source: str = "image") -> Prediction:
    """One object from clicks (``predict_objects`` with a single object; the mask is bool).

    Raises:
        ValueError: no positive click, or as ``predict_objects``.
    """
    _check_limits(max_windows, recentre, edge_margin)
    if not np.asarray(positive).any():
        raise ValueError("--points: give at least one positive click (':+') to name the target")
    return predict_objects(model, image, geom, [ObjectPrompts(np.asarray(coords), np.asarray(positive, bool))],
                           world=world, spacing_mm=spacing_mm, tile=tile, max_windows=max_windows, recentre=recentre,
                           edge_margin=edge_margin, source=source)


def _check_limits(max_windows: int, recentre: int, edge_margin: int = 1) -> None:
    for name, value, least in (("--max-windows", max_windows, 1), ("--recentre", recentre, 0),
                               ("edge_margin", edge_margin, 1)):
        if int(value) < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", required=True, help="params dir, training workdir, Orbax dir or .pth file")
    parser.add_argument("--image", required=True, help="input scan (.nii/.nii.gz)")
    parser.add_argument("--points", default="", help=POINTS_HELP)
    parser.add_argument("--box", default="", help=f"a box {BOX_FORMAT} (voxels, or mm with --world)")
    parser.add_argument("--object", action="append", default=[],
                        help="another object: points and an optional 'box=...', separated by ';' (repeatable)")
    parser.add_argument("--out", required=True, help="output mask (.nii/.nii.gz), same grid as --image")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never the --image)")
    parser.add_argument("--world", action="store_true", help="points and boxes are world coordinates in mm (RAS+)")
    parser.add_argument("--single-window", action="store_true", help="one crop around the prompts, no tiling")
    parser.add_argument("--max-windows", type=int, default=27, help="most windows run per object (default 27)")
    parser.add_argument("--recentre", type=int, default=0,
                        help="times the first window may move onto its own prediction (default 0: never)")
    parser.add_argument("--windows", choices=("centred", "grid"), default="centred",
                        help="centred on each object's prompts (default) or on a lattice shared by nearby objects")
    parser.add_argument("--box-mode", choices=("auto", "box", "click"), default="auto",
                        help="auto: box prompt if the checkpoint has box embeddings, else a click at the box centre")
    parser.add_argument("--config", default="", help="model variant/config JSON for checkpoints without one")
    parser.add_argument("--dtype", default="", help="compute dtype override, e.g. float32")
    compile_cache.add_argparse_flags(parser)
    argv, glued = list(sys.argv[1:] if argv is None else argv), []
    # World coordinates start with "-" (e.g. "-20.5,3,4:+"), which argparse would read as an option: glue the
    # value of a prompt flag to its flag.
    while argv:
        arg = argv.pop(0)
        glued.append(f"{arg}={argv.pop(0)}" if arg in ("--points", "--box", "--object") and argv else arg)
    return parser.parse_args(glued)


def _check_arguments(args: argparse.Namespace) -> list[ObjectPrompts]:
    """Everything about the command line that can be refused before reading a file or the model."""
    objects = []
    if args.points or args.box:
        coords, positive = parse_points(args.points, allow_empty=bool(args.box)) if args.points else (
            np.zeros((0, 3)), np.zeros(0, bool))
        box = parse_box(args.box) if args.box else None
        if box is None and not positive.any():
            raise ValueError("--points: give at least one positive click (':+') to name the target")
        objects.append(ObjectPrompts(coords, positive, box))
    objects += [parse_object(text, f"--object {k}") for k, text in enumerate(args.object, len(objects) + 1)]
    if not objects:
        raise cli.UsageError("give --points and/or --box, or --object, to name what to segment")
    if len(objects) > 255:
        raise cli.UsageError(f"{len(objects)} objects do not fit a uint8 label map (at most 255)")
    _check_limits(args.max_windows, args.recentre)
    if not any(args.out.endswith(s) for s in NIFTI_SUFFIXES):
        raise cli.UsageError(f"--out {args.out}: the file name must end in .nii or .nii.gz")
    for name, path in (("--image", args.image), ("--checkpoint", args.checkpoint)):
        if not epath.Path(path).exists():
            raise cli.UsageError(f"{name} {path}: does not exist")
    cli.check_output_path(args.out, inputs=[args.image, args.checkpoint], overwrite=args.overwrite, name="--out")
    return objects


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
    objects = _check_arguments(args)
    image, geom = read_image(args.image, keep_integer=True)
    cache = compile_cache.from_argparse(args)
    from sammed3d_jax.evaluation.checkpoints import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, args.config or None, args.dtype, config_flag="--config")
    most = max(len(o.coords) + 1 for o in objects) + 1
    decoder = ObjectDecoder.from_model(loaded.variables, loaded.cfg, max_prompts=max(8, most))
    with compile_cache.CompileClock() as clock:
        result = predict_objects(decoder, image, geom, objects, world=args.world, tile=not args.single_window,
                                 max_windows=args.max_windows, recentre=args.recentre, windows=args.windows,
                                 box_mode=args.box_mode, source=args.image)
    _write_mask(args.out, result.mask, geom)
    note = "" if result.complete else f" (stopped at --max-windows {args.max_windows}; the mask may be cut)"
    if not all(result.voxels):
        note += " (empty: try a click nearer the middle of the target, or more clicks)"
    n_windows = len(result.windows) if len(objects) == 1 else sum(len(w) for w in result.windows)
    per_object = ", ".join(f"{k}: {v}" for k, v in enumerate(result.voxels, 1))
    what = f"{result.voxels[0]} voxels" if len(objects) == 1 else f"{len(objects)} objects ({per_object} voxels)"
    print(f"wrote {args.out}: {what} in {n_windows} window(s), {result.encodes} encode(s){note}")
    print(f"{clock.describe()}; compilation cache: {cache or 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
