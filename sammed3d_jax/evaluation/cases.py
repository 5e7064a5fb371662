"""One case of an evaluation: every target of an (image, label) pair, all targets clicked and decoded together.

Two protocols (``EvalOptions.crop``):

- ``"target"`` (upstream's current scripts; the paper-era script too): per target an ``S``³ ROI centred on its
  bounding box, z-normalised; targets whose ROIs coincide share one encode; all targets of the case are clicked
  together by the simulated user on device (``objects.simulate_rois``), scored on the original grid after
  paste-back or on the ROI (``metric_grid``).
- ``"first_click"`` (what a user of ``predict`` gets, and the paper's written protocol): the first click is the
  target's deepest voxel (``first_click="deepest"``: Euclidean distance transform in mm on the file's grid) or a
  uniform target voxel (``"random"``); each target is an object of a ``Session`` on the case, so the window is
  centred on the click and grows with 50 %-overlap neighbours where the mask reaches a face, exactly as
  ``python -m sammed3d_jax.predict`` with the same click. Later clicks come from the error on the file's grid
  (``host_click``: upstream's "random" and "ritm" rules on the host), scored there.

Scoring (``scoring``): ``"per_target"`` compares each target's own mask with its ground truth; ``"combined"`` does what
upstream's evaluation does, which pastes the targets into one label map in ascending label order (later ones
overwrite earlier ones) and scores ``map == c`` against ``label == c``. ``dice_over_clicks="max"`` reports at k clicks
the best Dice of clicks 1..k (the paper-era script's per-case number).

Owns ``evaluate_case`` (one case's rows, failures included) and ``target_seed``. Imports the evaluation chain,
objects, session and data readers; reads no ConfigDict (``options`` is the runner's ``EvalOptions``).
"""

import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jaxtyping import Bool
from scipy import ndimage

from sammed3d_jax import cli
from sammed3d_jax.data import transforms
from sammed3d_jax.data.check import LINEAR_TOL, ORIGIN_TOL_MM
from sammed3d_jax.data.manifest import Record
from sammed3d_jax.data.nifti import Geometry, read_image, read_label, write_nifti
from sammed3d_jax.evaluation import inference, metrics, objects
from sammed3d_jax.evaluation.objects import ObjectDecoder


def host_click(rule: str, rng: np.random.Generator, gt: Bool[np.ndarray, "h w d"], pred: Bool[np.ndarray, "h w d"]
               ) -> tuple[np.ndarray, bool]:
    """A simulated user's next click on the host: ``(voxel [3], positive)``.

    "random" (upstream inference): a uniform voxel of the error ``gt xor pred``, positive where ``gt``; without any
    error, a uniform ground-truth voxel, positive. "ritm": Euclidean distance transforms (voxel units, the volume
    border counting as background) of the false negatives and false positives; positive iff the false negatives' is
    deeper; a uniform voxel of the chosen error whose distance exceeds half the larger maximum.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    error = gt ^ pred
    if not error.any():
        voxels = np.argwhere(gt)
        return voxels[rng.integers(len(voxels))].astype(np.float64), True
    if rule == "random":
        voxels = np.argwhere(error)
        p = voxels[rng.integers(len(voxels))]
        return p.astype(np.float64), bool(gt[tuple(p)])
    if rule != "ritm":
        raise ValueError(f"click rule must be 'random' or 'ritm', got {rule!r}")
    fn, fp = gt & ~pred, ~gt & pred
    dt = [ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1, 1:-1] for m in (fn, fp)]
    positive = dt[0].max() > dt[1].max()
    chosen = dt[0] if positive else dt[1]
    voxels = np.argwhere(chosen > max(dt[0].max(), dt[1].max()) / 2)
    p = voxels[rng.integers(len(voxels))]
    return p.astype(np.float64), bool(fn[tuple(p)])


def deepest_voxel(mask: Bool[np.ndarray, "h w d"], spacing_mm: Sequence[float]) -> np.ndarray:
    """The voxel of ``mask`` farthest (in mm) from its border, the first in array order on ties."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=tuple(spacing_mm))[1:-1, 1:-1, 1:-1]
    return np.asarray(np.unravel_index(int(np.argmax(depth)), mask.shape), np.float64)


def _scores(preds: dict[int, dict[int, np.ndarray]], gts: dict[int, np.ndarray], spacing, options,
            values: dict[int, int]) -> dict[int, dict[str, float]]:
    """Dice and NSD per target and click count (``preds[target][count]`` on the grid of ``gts``)."""
    out: dict[int, dict[str, float]] = {i: {} for i in preds}
    counts = sorted(next(iter(preds.values())))
    for count in counts:
        masks = {i: preds[i][count] for i in preds}
        if options.scoring == "combined":
            combined = np.zeros(next(iter(gts.values())).shape, np.int64)
            for i in sorted(masks, key=lambda i: values[i]):
                combined[masks[i]] = values[i]
            masks = {i: combined == values[i] for i in masks}
        for i, mask in masks.items():
            out[i][f"dice@{count}"] = metrics.dice(mask, gts[i])
            if count in options.click_counts:
                out[i][f"nsd_{count}"] = metrics.normalized_surface_dice(mask, gts[i], spacing,
                                                                         options.nsd_tolerance_mm)
    for i in out:
        best = 0.0
        for count in counts:
            best = max(best, out[i][f"dice@{count}"])
            if count in options.click_counts:
                out[i][f"dice_{count}"] = best if options.dice_over_clicks == "max" else out[i][f"dice@{count}"]
        for k in [k for k in out[i] if k.startswith("dice@")]:
            del out[i][k]
    return out


def _recorded(options) -> list[int]:
    last = options.click_counts[-1]
    return list(range(1, last + 1)) if options.dice_over_clicks == "max" else list(options.click_counts)


def run_roi_protocol(decoder: objects.ObjectDecoder, case: inference.ResampledCase, label: np.ndarray,
                     targets: Sequence[tuple[int, Record, int]], options) -> tuple[dict, dict, dict]:
    """The ``crop="target"`` protocol for the valid targets ``(row index, record, seed)`` of one case.

    Returns:
        (scores per row, pasted last-count mask per row when needed, extra row fields per row); a row whose ROI
        cannot be normalised is absent from the first two and carries an ``error`` in the third.
    """
    rois, keys, rows, extra = [], [], [], {}
    for i, record, seed in targets:
        ras_target = case.label == record.label_value
        crop = inference.target_crop(ras_target, decoder.crop_size)
        try:
            rois.append(inference.crop_roi(case, crop, ras_target, name=f"{record.image} (target {record.target!r})"))
        except ValueError as err:
            extra[i] = {"error": err}
            continue
        keys.append(jax.random.fold_in(jax.random.key(options.seed), seed))
        rows.append((i, record))
    if not rois:
        return {}, {}, extra
    sims = objects.simulate_rois(decoder, rois, keys, _recorded(options), options.click_mode)
    values = {i: r.label_value for i, r in rows}
    last = options.click_counts[-1]
    if options.metric_grid == "roi":
        preds = {i: sim.masks for (i, _), sim in zip(rows, sims, strict=True)}
        gts = {i: roi.gt for (i, _), roi in zip(rows, rois, strict=True)}
        scores = _scores(preds, gts, options.spacing_mm, options, values)
        pasted = {i: inference.paste_back(sim.masks[last], roi.geom, case.original_geom)
                  for (i, _), sim, roi in zip(rows, sims, rois, strict=True)} if options.save_masks else {}
    else:
        preds = {i: {c: inference.paste_back(m, roi.geom, case.original_geom) for c, m in sim.masks.items()}
                 for (i, _), sim, roi in zip(rows, sims, rois, strict=True)}
        scores = _scores(preds, {i: label == r.label_value for i, r in rows}, case.original_geom.spacing_mm, options,
                         values)
        pasted = {i: preds[i][last] for i, _ in rows}
    for (i, _), sim in zip(rows, sims, strict=True):
        extra[i] = {"n_clicks": len(sim.click_s), "encode_s": sim.encode_s, "click_s": float(np.mean(sim.click_s)),
                    "first_label": int(sim.labels[0]), "positive_clicks": int((sim.labels == 1).sum())}
    return scores, pasted, extra


def run_click_protocol(decoder: objects.ObjectDecoder, case: inference.ResampledCase, label: np.ndarray,
                       targets: Sequence[tuple[int, Record, int]], options, source: str) -> tuple[dict, dict, dict]:
    """The ``crop="first_click"`` protocol (module docstring) for the valid targets of one case."""
    from sammed3d_jax.session import Session

    session = Session(decoder, spacing_mm=options.spacing_mm, max_windows=options.max_windows)
    session.open_resampled(case, source)
    geom: Geometry = case.original_geom
    ids, gts, rngs, clicks, values = {}, {}, {}, {}, {}
    for i, record, seed in targets:
        gts[i] = label == record.label_value
        rngs[i] = np.random.default_rng([options.seed, seed])
        first = deepest_voxel(gts[i], geom.spacing_mm) if options.first_click == "deepest" else np.argwhere(
            gts[i])[rngs[i].integers(int(gts[i].sum()))].astype(np.float64)
        ids[i] = session.add_object(record.target)
        session.add_point(ids[i], first, True)
        clicks[i] = [(first, True)]
        values[i] = record.label_value
    preds: dict[int, dict[int, np.ndarray]] = {i: {} for i in ids}
    recorded = _recorded(options)
    times = []
    for t in range(1, recorded[-1] + 1):
        t0 = time.perf_counter()
        session.compute(list(ids.values()))
        masks = {i: session.mask(oid) for i, oid in ids.items()}
        times.append((time.perf_counter() - t0) / len(ids))
        for i in ids:
            if t in recorded:
                preds[i][t] = masks[i]
            if t < recorded[-1]:
                rule = inference.click_rule(options.click_mode, t)
                point, positive = host_click(rule, rngs[i], gts[i], masks[i])
                session.add_point(ids[i], point, positive)
                clicks[i].append((point, positive))
    scores = _scores(preds, gts, geom.spacing_mm, options, values)
    extra = {}
    for i, oid in ids.items():
        info = session.info(oid)
        labels = np.array([p for _, p in clicks[i]])
        extra[i] = {"n_clicks": len(clicks[i]), "encode_s": 0.0, "click_s": float(np.mean(times)),
                    "first_label": int(labels[0]), "positive_clicks": int(labels.sum()),
                    "windows": len(info.windows), "first_click": [float(v) for v in clicks[i][0][0]]}
    return scores, {i: preds[i][recorded[-1]] for i in ids}, extra


def clip_ct(image: np.ndarray, path: str, options) -> np.ndarray:
    """Upstream's training loader clamps a CT (its path holds ``/ct_``) to [-1000, 1000] HU; with
    ``ct_clip="path"`` we do too (the paper-era script read its data through that loader)."""
    if options.ct_clip == "path" and "/ct_" in str(path).replace("\\", "/"):
        if np.issubdtype(image.dtype, np.integer):  # torch.clamp keeps an integer tensor's type
            info = np.iinfo(image.dtype)
            lo, hi = (int(v) for v in transforms.CT_CLIP_HU)
            return np.clip(image, max(lo, info.min), min(hi, info.max)).astype(image.dtype)
        return transforms.clip_intensity(image)
    return image


def stored_case(image: np.ndarray, geom: Geometry, label: np.ndarray) -> inference.ResampledCase:
    """A case used as stored (``resample="none"``): no resampling, no reorientation, as upstream's training loader
    (and the paper-era evaluation) read pre-resampled data with the affine ignored."""
    return inference.ResampledCase(np.asarray(image, np.float32), geom, geom, label)


def target_seed(dataset: str, case: str, label_value: int) -> int:
    """A stable 31-bit number naming one (dataset, case, target): results do not depend on the case order."""
    return zlib.crc32(f"{dataset}/{case}/{label_value}".encode()) & 0x7FFFFFFF


def _check_same_grid(image_path: str, image_geom: Geometry, label_path: str, label_geom: Geometry) -> None:
    if image_geom.shape != label_geom.shape:
        raise ValueError(f"{label_path}: label shape {label_geom.shape} differs from the image's {image_geom.shape} "
                         f"({image_path})")
    diff = np.abs(image_geom.affine - label_geom.affine)
    if diff[:3, :3].max() > LINEAR_TOL or diff[:3, 3].max() > ORIGIN_TOL_MM:
        raise ValueError(f"{label_path}: label affine differs from the image's ({image_path}; max difference "
                         f"{diff.max():.3g}): image and label are not on the same grid")


def _error_text(err: BaseException) -> str:
    text = cli.one_line(err)  # never empty: a MemoryError says "out of memory", a bare error its type
    return text if isinstance(err, (ValueError, MemoryError)) else f"{type(err).__name__}: {text}"


def _row(record: Record) -> dict[str, Any]:
    return {"dataset": record.dataset, "case": record.case, "target": record.target,
            "label_value": record.label_value, "status": "ok", "error": "", "image": record.image,
            "label": record.label}


def _mask_path(masks_dir: str, record: Record, written: set[str]) -> str:
    path = os.path.join(masks_dir, record.dataset, f"{record.case}.nii.gz")
    if path in written:  # upstream layout: one binary label file per target, so one case name per target folder
        path = os.path.join(masks_dir, record.dataset, f"{record.case}_{record.target}.nii.gz")
    written.add(path)
    return path


def _read_case(first: Record, options) -> tuple[inference.ResampledCase, np.ndarray, Geometry]:
    image, image_geom = read_image(first.image, keep_integer=options.integer_cast)
    label, label_geom = read_label(first.label)
    _check_same_grid(first.image, image_geom, first.label, label_geom)
    image = clip_ct(image, first.image, options)
    if options.resample == "none":
        return stored_case(image, image_geom, label), label, label_geom
    return inference.resample_case(image, image_geom, label, options.spacing_mm), label, label_geom


def _valid_target(case: inference.ResampledCase, label: np.ndarray, record: Record, options) -> int:
    """The number of target voxels; raises (naming the label file) for a target that cannot be scored."""
    n_gt = int((label == record.label_value).sum())
    if n_gt == 0:
        raise ValueError(f"{record.label}: empty ground-truth target {record.target!r} (no voxel == "
                         f"{record.label_value})")
    if not (case.label == record.label_value).any():
        raise ValueError(f"{record.label}: target {record.target!r} ({n_gt} voxels) has no voxel left after "
                         f"resampling to {options.spacing_mm} mm")
    return n_gt


def evaluate_case(decoder: ObjectDecoder | inference.Segmenter, records: Sequence[Record], options,
                  masks_dir: str | None = None, written: set[str] | None = None) -> list[dict[str, Any]]:
    """Evaluates every target of one (image, label) pair together; failures become rows with status "failed".

    Args:
        decoder: the model (a Segmenter is wrapped).
        records: the targets of one case (same image and label files).
        options: the protocol.
        masks_dir: where to write the predicted label map (largest click count; later targets overwrite earlier
            ones where they overlap, as upstream), or None.
        written: mask paths already written in this run (to keep file names unique).

    Returns:
        One row per record.
    """
    decoder = _decoder(decoder)
    t0 = time.perf_counter()
    rows = [_row(r) for r in records]
    first = records[0]
    try:
        case, label, label_geom = _read_case(first, options)
    except Exception as err:  # one bad case must not stop the run: it is reported in the summary
        for row in rows:
            row.update(status="failed", error=_error_text(err))
        case_timing(rows, t0)
        return rows
    targets = []
    for i, (row, record) in enumerate(zip(rows, records, strict=True)):
        try:
            row["gt_voxels"] = _valid_target(case, label, record, options)
            targets.append((i, record, target_seed(record.dataset, record.case, record.label_value)))
        except Exception as err:  # e.g. an empty target: reported, the other targets still run
            row.update(status="failed", error=_error_text(err))
    scores, pasted, extra = {}, {}, {}
    if targets:
        try:
            if options.crop == "first_click":
                scores, pasted, extra = run_click_protocol(decoder, case, label, targets, options, first.image)
            else:
                scores, pasted, extra = run_roi_protocol(decoder, case, label, targets, options)
        except Exception as err:  # a failure of the batch fails the case's targets, the run goes on
            for i, _, _ in targets:
                rows[i].update(status="failed", error=_error_text(err))
    for i, fields in extra.items():
        if "error" in fields:
            rows[i].update(status="failed", error=_error_text(fields["error"]))
        else:
            rows[i].update(fields)
    for i, part in scores.items():
        rows[i].update(part)
        for m in ("dice", "nsd"):
            rows[i][f"{m}_auc"] = metrics.dice_auc(options.click_counts,
                                                   [part[f"{m}_{c}"] for c in options.click_counts])
    if masks_dir is not None:
        combined = np.zeros(label.shape, np.uint8 if max(r.label_value for r in records) < 256 else np.int32)
        for i in sorted(pasted, key=lambda i: records[i].label_value if options.scoring == "combined" else i):
            combined[pasted[i]] = records[i].label_value
        write_nifti(_mask_path(masks_dir, first, written if written is not None else set()), combined, label_geom)
    case_timing(rows, t0)
    return rows


def _decoder(model) -> ObjectDecoder:
    return model if isinstance(model, ObjectDecoder) else ObjectDecoder.from_segmenter(model)


def case_timing(rows: list[dict[str, Any]], t0: float) -> None:
    """Writes ``case_s`` and ``target_s`` (the case's time shared by its targets) into its rows."""
    case_s = time.perf_counter() - t0
    for row in rows:
        row["case_s"], row["target_s"] = case_s, case_s / max(len(rows), 1)
