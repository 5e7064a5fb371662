"""Dataset evaluation with simulated clicks: per-target CSV, ``summary.json``, Dice-vs-clicks PNG, optional masks.

For every (case, target) of a dataset (nnU-Net layout: every label value present is a target; upstream layout; or a
manifest), ``inference.simulate_clicks`` makes up to max(click_counts) clicks and the prediction after each
requested count is scored with Dice and normalised surface Dice (``nsd_tolerance_mm``, true spacing):

- ``metric_grid="original"`` (default, current upstream ``medim_val_dataset.py``): the ROI prediction is pasted
  back onto the image's own grid (nearest) and compared with the label there, spacing from the file header. Parts
  of a target outside the crop count as missed.
- ``metric_grid="roi"`` (paper era, ``val_old.py``): compared on the ``S``³ ROI with the cropped, resampled
  ground truth, spacing = the resampling target (1.5 mm).

Plus the area under the score-vs-clicks curve over the requested counts (``metrics.dice_auc``, the mean score over
the click range). Outputs in ``out``: ``per_target.csv`` (one row per case and target, failed ones with their
error), ``summary.json`` (nnU-Net's spirit: per-target and overall mean/std/n per metric, every row, failures,
timings), ``dice_vs_clicks.png``, and with ``save_masks`` a label map per case under ``masks/<dataset>/``.

NaN policy: a target with an empty ground truth is not scored; it is reported as failed with the reason (nnU-Net
would give NaN and drop it from the mean, so the means agree). Every scored target has a non-empty ground truth,
so Dice and NSD are finite (an empty prediction scores 0). Means skip NaN anyway (``metrics.summarize``: numpy
nanmean, population std, ``n``/``n_nan`` reported); "overall" pools all (case, target) values.

A bad case (unreadable file, image/label geometry mismatch, empty target, any error while running it) is recorded
as failed with its reason and the run continues. What dataset discovery could not turn into a target (an unreadable,
truncated or fractional label, a label holding background only, an image without a label) is listed as skipped with
its reason, in the printed table and in ``summary.json``. Only this module, eval.py and the training loop read a
ConfigDict.
"""

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from sammed3d_jax import cli, writers
from sammed3d_jax.data.check import LINEAR_TOL, ORIGIN_TOL_MM
from sammed3d_jax.data.manifest import Record, load_records
from sammed3d_jax.data.nifti import Geometry, read_image, read_label, write_nifti
from sammed3d_jax.evaluation import inference, metrics, report

FORMAT = "sammed3d_jax.eval/v1"
METRIC_GRIDS = ("original", "roi")
CROPS = ("target", "first_click")
NAN_POLICY = ("Targets with an empty ground truth are not scored and are listed as failed (nnU-Net: NaN, skipped in "
              "means). Both masks empty -> NaN, ground truth empty and prediction not -> 0, prediction empty -> 0; "
              "means and std skip NaN (n and n_nan given); overall pools every (case, target) value.")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """The protocol (defaults: current upstream scripts); see ``evaluation/config.py`` for each key."""

    click_counts: tuple[int, ...] = (1, 3, 5, 10)
    click_mode: str = "random"
    crop: str = "target"
    metric_grid: str = "original"
    nsd_tolerance_mm: float = 1.0
    spacing_mm: tuple[float, float, float] = inference.DEFAULT_SPACING_MM
    seed: int = 233
    save_masks: bool = False

    def __post_init__(self):
        counts = tuple(int(c) for c in self.click_counts)
        if not counts or min(counts) < 1 or list(counts) != sorted(set(counts)):
            raise ValueError(f"click_counts must be increasing positive integers, got {self.click_counts!r}")
        object.__setattr__(self, "click_counts", counts)
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        inference.click_rule(self.click_mode, 0)  # validates the mode
        if self.metric_grid not in METRIC_GRIDS:
            raise ValueError(f"metric_grid must be one of {METRIC_GRIDS}, got {self.metric_grid!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")

    @property
    def metric_names(self) -> list[str]:
        names = [f"{m}_{c}" for c in self.click_counts for m in ("dice", "nsd")]
        return names + ["dice_auc", "nsd_auc"]


def options_from_config(config) -> EvalOptions:
    """EvalOptions from the evaluation ConfigDict."""
    return EvalOptions(click_counts=tuple(config.click_counts), click_mode=config.click_mode, crop=config.crop,
                       metric_grid=config.metric_grid, nsd_tolerance_mm=config.nsd_tolerance_mm,
                       spacing_mm=tuple(config.spacing_mm), seed=config.seed, save_masks=config.save_masks)


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


def _crop_for(case: inference.ResampledCase, ras_target: np.ndarray, options: EvalOptions, crop_size: int,
              seed: int):
    """(window, first click in ROI coordinates or None) for one target."""
    if options.crop == "target":
        return inference.target_crop(ras_target, crop_size), None
    # Paper era: the crop is centred on the first click, a uniform target voxel (the code's crop is centred on the
    # target's bounding box instead).
    voxels = np.argwhere(ras_target)
    p = voxels[np.random.default_rng([options.seed, seed]).integers(len(voxels))]
    start = p - crop_size // 2
    return inference.window_at(case.geom.shape, start, crop_size), (p - start).astype(np.float32)


def _score(pred, gt, spacing, options: EvalOptions) -> tuple[float, float]:
    return metrics.dice(pred, gt), metrics.normalized_surface_dice(pred, gt, spacing, options.nsd_tolerance_mm)


def evaluate_target(segmenter: inference.Segmenter, case: inference.ResampledCase, label: np.ndarray,
                    record: Record, options: EvalOptions) -> tuple[dict[str, Any], np.ndarray | None]:
    """Scores one target of a resampled case.

    Returns:
        (metrics and timings for its row, the pasted mask at the last count, or None when not needed).

    Raises:
        ValueError: empty target (on the original grid or after resampling), naming the label file.
    """
    gt = label == record.label_value
    n_gt = int(gt.sum())
    if n_gt == 0:
        raise ValueError(f"{record.label}: empty ground-truth target {record.target!r} (no voxel == "
                         f"{record.label_value})")
    ras_target = case.label == record.label_value
    if not ras_target.any():
        raise ValueError(f"{record.label}: target {record.target!r} ({n_gt} voxels) has no voxel left after "
                         f"resampling to {options.spacing_mm} mm")
    seed = target_seed(record.dataset, record.case, record.label_value)
    crop, first_click = _crop_for(case, ras_target, options, segmenter.crop_size, seed)
    roi = inference.crop_roi(case, crop, ras_target, name=f"{record.image} (target {record.target!r})")
    key = jax.random.fold_in(jax.random.key(options.seed), seed)
    sim = inference.simulate_clicks(segmenter, roi, key, options.click_counts, options.click_mode, first_click)
    out: dict[str, Any] = {"gt_voxels": n_gt}
    pasted = None
    for count in options.click_counts:
        if options.metric_grid == "roi":
            d, n = _score(sim.masks[count], roi.gt, options.spacing_mm, options)
        else:
            pasted = inference.paste_back(sim.masks[count], roi.geom, case.original_geom)
            d, n = _score(pasted, gt, case.original_geom.spacing_mm, options)
        out[f"dice_{count}"], out[f"nsd_{count}"] = d, n
    if pasted is None and options.save_masks:
        pasted = inference.paste_back(sim.masks[options.click_counts[-1]], roi.geom, case.original_geom)
    for m in ("dice", "nsd"):
        out[f"{m}_auc"] = metrics.dice_auc(options.click_counts, [out[f"{m}_{c}"] for c in options.click_counts])
    out.update(n_clicks=len(sim.click_s), encode_s=sim.encode_s, click_s=float(np.mean(sim.click_s)),
               first_label=int(sim.labels[0]), positive_clicks=int((sim.labels == 1).sum()))
    return out, pasted


def _mask_path(masks_dir: str, record: Record, written: set[str]) -> str:
    path = os.path.join(masks_dir, record.dataset, f"{record.case}.nii.gz")
    if path in written:  # upstream layout: one binary label file per target, so one case name per target folder
        path = os.path.join(masks_dir, record.dataset, f"{record.case}_{record.target}.nii.gz")
    written.add(path)
    return path


def evaluate_case(segmenter: inference.Segmenter, records: Sequence[Record], options: EvalOptions,
                  masks_dir: str | None = None, written: set[str] | None = None) -> list[dict[str, Any]]:
    """Evaluates every target of one (image, label) pair; failures become rows with status "failed".

    Args:
        segmenter: the jitted model.
        records: the targets of one case (same image and label files).
        options: the protocol.
        masks_dir: where to write the predicted label map (largest click count; later targets overwrite earlier
            ones where they overlap, as upstream), or None.
        written: mask paths already written in this run (to keep file names unique).

    Returns:
        One row per record.
    """
    t0 = time.perf_counter()
    rows = [_row(r) for r in records]
    first = records[0]
    try:
        image, image_geom = read_image(first.image)
        label, label_geom = read_label(first.label)
        _check_same_grid(first.image, image_geom, first.label, label_geom)
        case = inference.resample_case(image, image_geom, label, options.spacing_mm)
    except Exception as err:  # one bad case must not stop the run: it is reported in the summary
        for row in rows:
            row.update(status="failed", error=_error_text(err), case_s=time.perf_counter() - t0)
        return rows
    combined = None
    if masks_dir is not None:
        combined = np.zeros(label.shape, np.uint8 if max(r.label_value for r in records) < 256 else np.int32)
    for row, record in zip(rows, records, strict=True):
        t1 = time.perf_counter()
        try:
            part, pasted = evaluate_target(segmenter, case, label, record, options)
            row.update(part)
            if combined is not None:
                combined[pasted] = record.label_value
        except Exception as err:  # e.g. an empty target: reported, the other targets still run
            row.update(status="failed", error=_error_text(err))
        row["target_s"] = time.perf_counter() - t1
    if combined is not None:
        write_nifti(_mask_path(masks_dir, first, written if written is not None else set()), combined, label_geom)
    for row in rows:
        row["case_s"] = time.perf_counter() - t0
    return rows


def _stats(values) -> dict[str, float | int]:
    return metrics.summarize({"all": values})["overall"]


def summarize_rows(rows: Sequence[dict[str, Any]], options: EvalOptions) -> dict[str, Any]:
    """Per-target ("dataset/target") and overall statistics of every metric over the scored rows."""
    scored = [r for r in rows if r["status"] == "ok"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in scored:
        groups.setdefault(f"{r['dataset']}/{r['target']}", []).append(r)
    per_target: dict[str, dict[str, Any]] = {g: {} for g in groups}
    overall: dict[str, Any] = {}
    for name in options.metric_names:
        s = metrics.summarize({g: [r[name] for r in rs] for g, rs in groups.items()})
        for g in groups:
            per_target[g][name] = s["per_target"][g]
        overall[name] = s["overall"]
    return {"per_target": per_target, "overall": overall}


def evaluate_records(segmenter: inference.Segmenter | None, records: Sequence[Record], options: EvalOptions, out: str, *,
                     problems: Sequence[tuple[str, str]] = (), info: dict[str, Any] | None = None,
                     max_cases: int = 0, progress: bool = False, compile_s: float | None = None) -> dict[str, Any]:
    """Evaluates records case by case and writes ``per_target.csv``, ``summary.json`` and ``dice_vs_clicks.png``.

    Args:
        segmenter: the jitted model (``max_clicks`` >= the largest click count); None only without records.
        records: targets to evaluate (grouped into cases by their image and label files, order kept).
        options: the protocol.
        out: output folder (created).
        problems: (file, problem) pairs found while discovering the dataset (labels that gave no target), listed as
            skipped with their reasons.
        info: extra provenance for the summary (checkpoint, data, config).
        max_cases: > 0 evaluates only the first N cases.
        progress: progress bar on stderr.
        compile_s: compilation time to report.

    Returns:
        The summary (as written to ``summary.json``).
    """
    if records and segmenter is None:
        raise ValueError("evaluate_records: records to evaluate but no model")
    if segmenter is not None and segmenter.max_clicks < options.click_counts[-1]:
        raise ValueError(f"segmenter holds {segmenter.max_clicks} clicks, protocol needs {options.click_counts[-1]}")
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        cases.setdefault((r.image, r.label), []).append(r)
    groups = list(cases.values())[: max_cases or None]
    masks_dir = os.fspath(out_dir / "masks") if options.save_masks else None
    from tqdm import tqdm

    t0, rows, written = time.perf_counter(), [], set()
    bar = tqdm(groups, unit="case", disable=None if progress else True, dynamic_ncols=True)
    for group in bar:
        bar.set_postfix_str(group[0].case)
        rows += evaluate_case(segmenter, group, options, masks_dir, written)
    total_s = time.perf_counter() - t0
    scored = [r for r in rows if r["status"] == "ok"]
    failed = [{k: r[k] for k in ("dataset", "case", "target", "label_value", "image", "label", "error")}
              for r in rows if r["status"] != "ok"]
    case_times = list({(r["image"], r["label"]): r["case_s"] for r in rows}.values())
    summary = {
        "format": FORMAT,
        **(info or {}),
        "options": dataclasses.asdict(options),
        "nan_policy": NAN_POLICY,
        "counts": {"cases": len(groups), "targets": len(rows), "scored": len(scored), "failed": len(failed),
                   "skipped": len(problems)},
        **summarize_rows(rows, options),
        "timing": {"compile_s": compile_s, "total_s": total_s, "case_s": _stats(case_times),
                   "click_s": _stats([r["click_s"] for r in scored]),
                   "encode_s": _stats([r["encode_s"] for r in scored])},
        "failed": failed,
        "skipped": [{"file": f, "problem": p} for f, p in problems],
        "metric_per_target": rows,
    }
    summary = writers.json_safe(summary)
    report.write_csv(out_dir / "per_target.csv", rows, options.metric_names)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    report.plot_dice_vs_clicks(summary, out_dir / "dice_vs_clicks.png")
    return summary


def load_dataset(path: str, split: str = "Tr") -> tuple[list[Record], list[tuple[str, str]]]:
    """Records to evaluate from a dataset folder (nnU-Net/MSD or upstream layout), a manifest ``.json``, or a prepared
    store (``data/prepare.py``'s folder or its ``prepared.json``: its kept targets, read from their source files,
    since evaluation runs upstream's inference chain on the original images).

    Returns:
        (records, discovery problems as (file, problem) pairs).
    """
    from sammed3d_jax.data import cache

    folder = path[: -len(cache.INDEX_NAME)] if path.endswith(cache.INDEX_NAME) else path
    if os.path.isfile(os.path.join(folder or ".", cache.INDEX_NAME)):
        _, prepared = cache.read_index(folder or ".")
        return [Record(r.case, r.source_image, r.source_label, r.label_value, r.target, r.dataset, r.modality)
                for r in prepared], []
    return load_records(path, split=split)


def default_datasets(workdir: str, mni152: bool = True) -> list[str]:
    """The default run's data: the synthetic dataset a training run generated, plus MNI152 when nilearn is installed.

    Raises:
        FileNotFoundError: the workdir holds no generated synthetic dataset (naming it).
    """
    synthetic = os.path.join(workdir, "data", "synthetic")
    if not os.path.isfile(os.path.join(synthetic, "dataset.json")):
        raise FileNotFoundError(f"{synthetic}: no synthetic dataset from the training run; pass --data DATASET")
    data = [synthetic]
    if mni152:
        try:
            import nilearn  # noqa: F401  (the [data] extra; MNI152 ships with it)
        except ImportError:
            return data
        from sammed3d_jax.data.mni152 import make_mni152_dataset

        target = os.path.join(workdir, "data", "mni152")
        if not os.path.isfile(os.path.join(target, "dataset.json")):
            make_mni152_dataset(target)
        data.append(target)
    return data


def evaluate(config, checkpoint: str, data: Sequence[str] | None, out: str) -> dict[str, Any]:
    """Loads ``checkpoint``, reads ``data`` (``load_dataset``) and evaluates with the ``config`` protocol.

    Args:
        config: the evaluation ConfigDict (``evaluation/config.py``).
        checkpoint: see ``evaluation/checkpoints.py``.
        data: dataset folders, manifests or prepared stores; None = the training workdir's own data.
        out: output folder.

    Returns:
        The summary; also printed as a table.
    """
    from sammed3d_jax.evaluation.checkpoints import load_checkpoint

    options = options_from_config(config)
    loaded = load_checkpoint(checkpoint, config.model_config or None, config.dtype,
                             config_flag="--config.model_config")
    if not data:
        data = default_datasets(checkpoint, config.mni152)
    records, problems = [], []
    for dataset in data:  # before compiling: a wrong folder is named without waiting for the compiler
        found, issues = load_dataset(dataset, config.split)
        records += found
        problems += issues
    segmenter, compile_s = None, None
    if records:  # nothing to compile for a dataset whose every label was skipped: the report says why
        segmenter = inference.Segmenter.from_model(loaded.variables, loaded.cfg, max_clicks=options.click_counts[-1])
        rules = sorted({inference.click_rule(options.click_mode, t) for t in range(options.click_counts[-1])})
        compile_s = segmenter.warmup(rules)
    info = {"checkpoint": loaded.describe(), "data": [os.path.abspath(d) for d in data],
            "config": config.to_dict() if hasattr(config, "to_dict") else dict(config)}
    summary = evaluate_records(segmenter, records, options, out, problems=problems, info=info,
                               max_cases=config.max_cases, progress=config.progress, compile_s=compile_s)
    print(report.format_table(summary))
    print(f"wrote {os.path.join(out, 'per_target.csv')}, summary.json and dice_vs_clicks.png")
    return summary
