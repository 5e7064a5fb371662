"""Dataset evaluation with simulated clicks: per-target CSV, ``summary.json``, Dice-vs-clicks PNG, optional masks.

For every (case, target) of a dataset (nnU-Net layout: every label value present is a target; upstream layout; or a
manifest), a simulated user makes up to max(click_counts) clicks and the prediction after each requested count is
scored with Dice and normalised surface Dice (``nsd_tolerance_mm``, true spacing). All targets of a case are clicked
and decoded together, sharing each window's encode (``evaluation/cases.py`` holds the two protocols, ``crop="target"``
and the click-centred ``crop="first_click"``, and the scoring modes):

- ``metric_grid="original"`` (default, current upstream ``medim_val_dataset.py``): the prediction is pasted back
  onto the image's own grid (nearest) and compared with the label there, spacing from the file header. Parts
  of a target outside the windows count as missed.
- ``metric_grid="roi"`` (paper era, ``val_old.py``): compared on the ``S``³ ROI with the cropped, resampled
  ground truth, spacing = the resampling target (1.5 mm; the file's spacing with ``resample="none"``).

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
from collections.abc import Sequence
from typing import Any

from etils import epath

from sammed3d_jax import writers
from sammed3d_jax.data.manifest import Record, load_records
from sammed3d_jax.evaluation import inference, metrics, report
from sammed3d_jax.evaluation.cases import _decoder, evaluate_case, target_seed  # noqa: F401  (re-exported)
from sammed3d_jax.evaluation.objects import ObjectDecoder

FORMAT = "sammed3d_jax.eval/v1"
METRIC_GRIDS = ("original", "roi")
CROPS = ("target", "first_click")
FIRST_CLICKS = ("deepest", "random")
RESAMPLING = ("torchio", "none")
CT_CLIPS = ("none", "path")
SCORINGS = ("per_target", "combined")
DICE_OVER_CLICKS = ("at", "max")
NAN_POLICY = ("Targets with an empty ground truth are not scored and are listed as failed (nnU-Net: NaN, skipped in "
              "means). Both masks empty -> NaN, ground truth empty and prediction not -> 0, prediction empty -> 0; "
              "means and std skip NaN (n and n_nan given); overall pools every (case, target) value.")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """The protocol (defaults: current upstream scripts); see ``evaluation/config.py`` for each key."""

    click_counts: tuple[int, ...] = (1, 3, 5, 10)
    click_mode: str = "random"
    crop: str = "target"
    first_click: str = "deepest"
    metric_grid: str = "original"
    nsd_tolerance_mm: float = 1.0
    spacing_mm: tuple[float, float, float] = inference.DEFAULT_SPACING_MM
    seed: int = 233
    save_masks: bool = False
    resample: str = "torchio"
    integer_cast: bool = True
    ct_clip: str = "none"
    scoring: str = "per_target"
    dice_over_clicks: str = "at"
    max_windows: int = 27

    def __post_init__(self):
        counts = tuple(int(c) for c in self.click_counts)
        if not counts or min(counts) < 1 or list(counts) != sorted(set(counts)):
            raise ValueError(f"click_counts must be increasing positive integers, got {self.click_counts!r}")
        object.__setattr__(self, "click_counts", counts)
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        inference.click_rule(self.click_mode, 0)  # validates the mode
        for name, allowed in (("metric_grid", METRIC_GRIDS), ("crop", CROPS), ("first_click", FIRST_CLICKS),
                              ("resample", RESAMPLING), ("ct_clip", CT_CLIPS), ("scoring", SCORINGS),
                              ("dice_over_clicks", DICE_OVER_CLICKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.scoring == "combined" and self.metric_grid != "original":
            raise ValueError("scoring='combined' scores the pasted label map: it needs metric_grid='original'")
        if self.crop == "first_click" and (self.metric_grid != "original" or self.resample != "torchio"):
            raise ValueError("crop='first_click' runs predict's windows on the resampled image and scores on the "
                             "file's grid: it needs metric_grid='original' and resample='torchio'")
        if self.resample == "none" and self.metric_grid != "roi":
            raise ValueError("resample='none' (data used as stored, paper era) scores on the ROI: set "
                             "metric_grid='roi'")
        if int(self.max_windows) < 1:
            raise ValueError(f"max_windows must be at least 1, got {self.max_windows}")

    @property
    def metric_names(self) -> list[str]:
        names = [f"{m}_{c}" for c in self.click_counts for m in ("dice", "nsd")]
        return names + ["dice_auc", "nsd_auc"]

    @property
    def max_prompts(self) -> int:
        """Click buffer the protocol needs (its clicks, plus a propagated click for a grown window)."""
        return self.click_counts[-1] + (1 if self.crop == "first_click" else 0)


def options_from_config(config) -> EvalOptions:
    """EvalOptions from the evaluation ConfigDict."""
    fields = {f.name for f in dataclasses.fields(EvalOptions)}
    values = {k: v for k, v in config.items() if k in fields}
    values["click_counts"] = tuple(values["click_counts"])
    values["spacing_mm"] = tuple(values["spacing_mm"])
    return EvalOptions(**values)


def group_cases(records: Sequence[Record]) -> list[list[Record]]:
    """Records grouped into cases (same image and label files), in order of first appearance."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.image, r.label), []).append(r)
    return list(groups.values())


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


def evaluate_records(decoder: ObjectDecoder | inference.Segmenter | None, records: Sequence[Record],
                     options: EvalOptions, out: str, *, problems: Sequence[tuple[str, str]] = (),
                     info: dict[str, Any] | None = None, max_cases: int = 0, progress: bool = False,
                     compile_s: float | None = None, timing=None) -> dict[str, Any]:
    """Evaluates records case by case and writes ``per_target.csv``, ``summary.json`` and ``dice_vs_clicks.png``.

    Args:
        decoder: the model (click buffer >= ``options.max_prompts``; a Segmenter is wrapped); None only without
            records.
        records: targets to evaluate (grouped into cases by their image and label files, order kept).
        options: the protocol.
        out: output folder (created).
        problems: (file, problem) pairs found while discovering the dataset (labels that gave no target), listed as
            skipped with their reasons.
        info: extra provenance for the summary (checkpoint, data, config).
        max_cases: > 0 evaluates only the first N cases.
        progress: progress bar on stderr.
        compile_s: compilation time to report.
        timing: a function returning extra timing fields at the end (they replace ``compile_s``), e.g. the
            compile time a ``CompileClock`` measured; run time is then the rest of the total.

    Returns:
        The summary (as written to ``summary.json``).
    """
    if records and decoder is None:
        raise ValueError("evaluate_records: records to evaluate but no model")
    decoder = None if decoder is None else _decoder(decoder)
    if decoder is not None and decoder.max_prompts < options.max_prompts:
        raise ValueError(f"the model's click buffer holds {decoder.max_prompts} clicks, the protocol needs "
                         f"{options.max_prompts}")
    out_dir = epath.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_cases(records)[: max_cases or None]
    masks_dir = os.fspath(out_dir / "masks") if options.save_masks else None
    from tqdm import tqdm

    t0, rows, written = time.perf_counter(), [], set()
    bar = tqdm(groups, unit="case", disable=None if progress else True, dynamic_ncols=True)
    for group in bar:
        bar.set_postfix_str(group[0].case)
        rows += evaluate_case(decoder, group, options, masks_dir, written)
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
        "timing": {"compile_s": compile_s, "total_s": total_s, **(timing() if timing else {}), "case_s": _stats(
                   case_times),
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


def evaluate(config, checkpoint: str, data: Sequence[str] | None, out: str,
             cache_dir: str | None = None) -> dict[str, Any]:
    """Loads ``checkpoint``, reads ``data`` (``load_dataset``) and evaluates with the ``config`` protocol.

    Args:
        config: the evaluation ConfigDict (``evaluation/config.py``).
        checkpoint: see ``evaluation/checkpoints.py``.
        data: dataset folders, manifests or prepared stores; None = the training workdir's own data.
        out: output folder.
        cache_dir: the persistent compilation cache in use (for the report), or None.

    Returns:
        The summary; also printed as a table (compile and run time apart).
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
    from sammed3d_jax.compile_cache import CompileClock

    decoder = None
    with CompileClock() as clock:
        if records:  # nothing to compile for a dataset whose every label was skipped: the report says why
            decoder = ObjectDecoder.from_model(loaded.variables, loaded.cfg, max_prompts=options.max_prompts)
            rules = sorted({inference.click_rule(options.click_mode, t) for t in range(options.click_counts[-1])})
            sizes = {len(g) for g in group_cases(records)[: config.max_cases or None]}
            decoder.warmup(sorted(sizes), rules if options.crop == "target" else ())
        info = {"checkpoint": loaded.describe(), "data": [os.path.abspath(d) for d in data],
                "config": config.to_dict() if hasattr(config, "to_dict") else dict(config)}
        summary = evaluate_records(decoder, records, options, out, problems=problems, info=info,
                                   max_cases=config.max_cases, progress=config.progress, compile_s=0.0,
                                   timing=lambda: {"compile_s": clock.compile_s, "run_s": clock.run_s,
                                                   "cache_hits": clock.cache_hits, "compilation_cache": cache_dir})
    print(report.format_table(summary))
    print(f"wrote {os.path.join(out, 'per_target.csv')}, summary.json and dice_vs_clicks.png")
    return summary
