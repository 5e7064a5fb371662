"""Offline preparation: ``python -m sammed3d_jax.data.prepare SRC OUT [--spacing 1.5 --workers N]``.

Owns ``prepare_dataset``: reads a dataset (either layout, via ``manifest.load_records``) or a manifest JSON,
validates each case (``check.validate_records``), resamples it once to the target spacing (linear for images,
nearest for labels, torchio's grid rule), reorients to RAS+ (the order upstream inference uses, see
``transforms``), and writes the store of ``data/cache.py``: each image once, each binary target as uint8, and
``prepared.json`` indexing every target with its shape, spacing, affine, bounding box and voxel count.
Must not import jax, flax, grain or the model.

- Uses all cores (one process per case, ``--workers``, default ``os.cpu_count()``), with a tqdm progress bar.
- Resumable: a case is done when ``cases/<key>/case.json`` exists with the same source-file signatures (size,
  mtime) and settings; every file is written to a temporary name and renamed, so an interrupted run leaves no
  half-written array, and a rerun only does the missing cases (a second run over a finished store does nothing).
- Bad cases never stop the run: a case with a problem (``check`` wording: unreadable/truncated file, 4-D, NaN/inf,
  shape/affine mismatch, ...) or any error while processing is skipped and recorded in ``failed/<key>.json``
  (retried only when its files change, or with ``--retry-failed``); the summary counts skips by reason.
- Small targets (named option ``min_target_mm3``, ``--min-target-mm3``): upstream's nnU-Net conversion drops
  targets whose volume on the ORIGINAL grid is below 10 mm^3 (in mm^3, not voxels); the default. 0 keeps every
  non-empty target. A target that disappears when resampled (0 voxels at the target spacing) is always dropped.
  The training-time rule (crops with <= 1000 target voxels are redrawn) lives in ``data/pipeline.py``.
- Upstream-layout datasets duplicate each image under every target folder; those copies are separate files and
  are stored separately (nnU-Net-layout images are stored once for all their label values).
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from sammed3d_jax.data import cache, check, manifest, nifti, transforms

UPSTREAM_MIN_TARGET_MM3 = 10.0
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Job:
    key: str
    image: str
    records: tuple[manifest.Record, ...]
    signature: dict[str, Any]


def _settings(spacing_mm, min_target_mm3) -> dict[str, Any]:
    return {"spacing_mm": [float(s) for s in spacing_mm], "min_target_mm3": float(min_target_mm3)}


def _skip(record: manifest.Record, reason: str, kind: str | None = None) -> dict[str, Any]:
    """A skipped target: ``reason`` in full (file names included), ``kind`` the short class the summary counts."""
    return {"case": record.case, "dataset": record.dataset, "target": record.target,
            "label_value": record.label_value, "image": record.image, "label": record.label, "reason": reason,
            "kind": kind or reason}


class _CaseProblem(ValueError):
    def __init__(self, problems: Sequence[check.Problem]):
        super().__init__("; ".join(f"{p.file}: {p.problem}" for p in problems))
        self.kind = problems[0].problem.split(" (")[0]


def _prepare_case(job: _Job, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Processes one image and all its targets; writes the arrays and the case marker (or the failure marker)."""
    case_dir = pathlib.Path(out) / "cases" / job.key
    try:
        fatal = [p for p in check.validate_records(job.records) if not p.problem.startswith("empty target")]
        if fatal:
            raise _CaseProblem(fatal)
        spacing = tuple(settings["spacing_mm"])
        image, geom = nifti.read_image(job.image)
        image, new_geom = transforms.resample_to_spacing(image, geom, spacing, order=1)
        image, ras_geom = nifti.reorient_to_ras(image, new_geom)
        cache.save_array(case_dir / "image.npy", image.astype(np.float32, copy=False))
        del image
        voxel_mm3 = float(np.prod(geom.spacing_mm))
        prepared, skipped = [], []
        by_label = collections.defaultdict(list)
        for record in job.records:
            by_label[record.label].append(record)
        for label_path, records in by_label.items():
            source_label, _ = nifti.read_label(label_path)
            # Nearest resampling commutes with "== value", so the label map is resampled once for all its values;
            # on the image's grid (validation guaranteed the two grids agree).
            label, _ = transforms.resample_to_spacing(source_label, geom, spacing, order=0)
            label, _ = nifti.reorient_to_ras(label, new_geom)
            for record in records:
                source_mm3 = float(np.count_nonzero(source_label == record.label_value)) * voxel_mm3
                if source_mm3 == 0:
                    skipped.append(_skip(record, "empty target (no voxel with this label value)"))
                    continue
                if source_mm3 < settings["min_target_mm3"]:
                    skipped.append(_skip(record, f"target of {source_mm3:.3g} mm^3 < min_target_mm3 = "
                                               f"{settings['min_target_mm3']:g} mm^3", "target below min_target_mm3"))
                    continue
                binary = (label == record.label_value).astype(np.uint8)
                hits = [np.flatnonzero(binary.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
                if not hits[0].size:
                    skipped.append(_skip(record, "target vanishes when resampled to the target spacing"))
                    continue
                rel = f"cases/{job.key}/label_{record.label_value}.npy"
                cache.save_array(pathlib.Path(out) / rel, binary)
                prepared.append(cache.PreparedRecord(
                    id=f"{job.key}/{record.label_value}", case=record.case, dataset=record.dataset,
                    target=record.target, modality=record.modality, label_value=record.label_value,
                    image=f"cases/{job.key}/image.npy", label=rel, shape=ras_geom.shape,
                    spacing_mm=tuple(ras_geom.spacing_mm), affine=tuple(map(tuple, ras_geom.affine.tolist())),
                    bbox=tuple((int(h[0]), int(h[-1]) + 1) for h in hits),
                    foreground_voxels=int(np.count_nonzero(binary)), source_volume_mm3=source_mm3,
                    source_image=record.image, source_label=record.label,
                ).to_json())
        result = {"key": job.key, "status": "ok", "signature": job.signature, "settings": settings,
                  "records": prepared, "skipped": skipped}
        cache.write_json(case_dir / "case.json", result)
        failed_marker = pathlib.Path(out) / "failed" / f"{job.key}.json"
        if failed_marker.exists():
            failed_marker.unlink()
        return result
    except (ValueError, OSError, MemoryError, EOFError) as err:
        if isinstance(err, _CaseProblem):
            kind = err.kind
        elif isinstance(err, nifti.DataFileError):
            kind = err.problem.split(" (")[0]
        else:
            kind = f"error while preparing ({type(err).__name__})"
        result = {"key": job.key, "status": "failed", "signature": job.signature, "settings": settings,
                  "records": [], "skipped": [_skip(r, str(err), kind) for r in job.records]}
        cache.write_json(pathlib.Path(out) / "failed" / f"{job.key}.json", result)
        return result


def _cached(job: _Job, out: pathlib.Path, settings: dict[str, Any], retry_failed: bool) -> dict[str, Any] | None:
    for path in (out / "cases" / job.key / "case.json", None if retry_failed else out / "failed" / f"{job.key}.json"):
        if path is None or not path.exists():
            continue
        try:
            marker = cache.read_json(path)
        except ValueError:
            continue
        if marker.get("signature") != job.signature or marker.get("settings") != settings:
            continue
        files = [r["image"] for r in marker["records"]] + [r["label"] for r in marker["records"]]
        if all((out / f).exists() for f in files):
            return marker
    return None


def _jobs(records: Sequence[manifest.Record]) -> list[_Job]:
    by_image = collections.defaultdict(list)
    for record in records:
        by_image[os.path.abspath(record.image)].append(record)
    jobs = []
    for image, group in by_image.items():
        labels = sorted({r.label for r in group})
        signature = {"image": cache.file_signature(image), "labels": {p: cache.file_signature(p) for p in labels}}
        key = cache.case_key(group[0].dataset, group[0].case, image)
        jobs.append(_Job(key, image, tuple(sorted(group, key=lambda r: (r.label, r.label_value))), signature))
    return sorted(jobs, key=lambda j: j.key)


def prepare_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spacing_mm: Sequence[float | int] = (1.5, 1.5, 1.5),
    workers: int | None = None,
    min_target_mm3: float | int = UPSTREAM_MIN_TARGET_MM3,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepares ``src`` into the store ``out`` (see the module docstring).

    Args:
        src: dataset folder (upstream or nnU-Net/MSD layout) or a manifest ``.json``.
        out: store folder (created; reused on resume).
        spacing_mm: target voxel size (upstream: 1.5 mm isotropic).
        workers: processes (default ``os.cpu_count()``; 1 runs in this process).
        min_target_mm3: drop targets smaller than this on the source grid (upstream 10 mm^3; 0 keeps all).
        retry_failed: redo cases that failed before even if their files did not change.
        progress: show a tqdm bar on stderr.

    Returns:
        Summary: ``cases``, ``prepared`` (processed now), ``reused`` (already done), ``failed_cases``,
        ``records`` (targets in the index), ``skipped`` (targets left out), ``skip_reasons`` {reason: count}.

    Raises:
        ValueError: ``src`` is neither a dataset folder nor a manifest, or bad settings.
    """
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) == 1:
        spacing = spacing * 3
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"--spacing must be one or three positive numbers (mm), got {spacing_mm}")
    if min_target_mm3 < 0:
        raise ValueError(f"--min-target-mm3 must be >= 0, got {min_target_mm3}")
    out = pathlib.Path(out)
    records, discovery_problems = manifest.load_records(src)
    settings = _settings(spacing, min_target_mm3)
    jobs = _jobs(records)
    results, pending = {}, []
    for job in jobs:
        marker = _cached(job, out, settings, retry_failed)
        if marker is None:
            pending.append(job)
        else:
            results[job.key] = marker
    workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
    bar = tqdm(total=len(pending), unit="case", desc="prepare", disable=not progress or None, file=sys.stderr)
    if workers == 1:
        for job in pending:
            results[job.key] = _prepare_case(job, str(out), settings)
            bar.update()
    else:
        # spawn, not fork: the caller (a training run, a test) may have started JAX's threads, and a forked
        # child of a multithreaded process can deadlock.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_prepare_case, job, str(out), settings): job for job in pending}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                try:
                    results[job.key] = future.result()
                except Exception as err:  # a crashed worker (e.g. killed for memory) must not stop the run
                    results[job.key] = {"key": job.key, "status": "failed", "records": [],
                                        "skipped": [_skip(r, f"worker failed: {err!r}", "worker process failed")
                                                    for r in job.records]}
                bar.update()
    bar.close()
    for job in pending:
        if results[job.key]["status"] == "failed":
            log.warning("skipped case %s: %s", job.key, results[job.key]["skipped"][0]["reason"])

    prepared = [r for job in jobs for r in results[job.key]["records"]]
    skipped = [s for job in jobs for s in results[job.key]["skipped"]]
    skipped += [{"file": path, "reason": problem, "kind": problem.split(" (")[0]} for path, problem in discovery_problems]
    reasons = collections.Counter(s["kind"] for s in skipped)
    summary = {
        "cases": len(jobs), "prepared": len(pending), "reused": len(jobs) - len(pending),
        "failed_cases": sum(results[j.key]["status"] == "failed" for j in jobs),
        "records": len(prepared), "skipped": len(skipped), "skip_reasons": dict(sorted(reasons.items())),
    }
    # The index holds only what describes the store (not this run's prepared/reused counts), so a run that
    # changes nothing leaves it untouched.
    stable = {k: v for k, v in summary.items() if k not in ("prepared", "reused")}
    index = {"format": cache.FORMAT, "source": os.path.abspath(src), **settings, "summary": stable,
             "records": prepared, "skipped": skipped}
    index_path = out / cache.INDEX_NAME
    if pending or not index_path.exists() or cache.read_json(index_path) != index:
        cache.write_json(index_path, index)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="dataset folder (upstream or nnU-Net/MSD layout) or manifest .json")
    parser.add_argument("out", help="prepared store folder")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.5], help="target spacing in mm (1 or 3 values)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--min-target-mm3", type=float, default=UPSTREAM_MIN_TARGET_MM3,
                        help="drop targets below this volume on the source grid (upstream 10; 0 keeps all)")
    parser.add_argument("--retry-failed", action="store_true", help="retry cases that failed in an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = prepare_dataset(args.src, args.out, spacing_mm=args.spacing, workers=args.workers,
                                  min_target_mm3=args.min_target_mm3, retry_failed=args.retry_failed,
                                  progress=not args.no_progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plural = "" if summary["cases"] == 1 else "s"
    print(f"{args.out}: {summary['cases']} case{plural} ({summary['prepared']} prepared now, {summary['reused']} already "
          f"done, {summary['failed_cases']} failed), {summary['records']} targets indexed, "
          f"{summary['skipped']} skipped")
    for reason, count in summary["skip_reasons"].items():
        print(f"  skipped {count}: {reason}")
    if summary["skipped"]:
        print(f"  details: 'skipped' in {pathlib.Path(args.out) / cache.INDEX_NAME}")
    return 0 if summary["records"] else 1


if __name__ == "__main__":
    sys.exit(main())
