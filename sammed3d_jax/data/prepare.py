"""Offline preparation: ``python -m sammed3d_jax.data.prepare SRC OUT [--store npy|windows] [--num-shards N ...]``.

Owns ``prepare_dataset`` and its command: reads a dataset (either layout, via ``manifest.load_records``) or a
manifest JSON, and for each case (``data/prepare_case.py``) validates it, resamples it once to the target spacing
(linear for images, nearest for labels, torchio's grid rule), reorients to RAS+ and writes a store of
``data/cache.py``: the ``.npy`` store (``--store npy``, the single-host default: each image once, each binary
target as uint8, memory-mapped by training) or window shards (``--store windows``: per target its
``--window``^3 crop window, in one shard file per run, readable from ``gs://``), plus ``prepared.json`` indexing
every target. Must not import jax, flax, grain or the model.

- Uses all cores (one process per case, ``--workers``, default ``os.cpu_count()``), with a tqdm progress bar.
- Runs as N independent jobs (``--num-shards N --shard-index i``, e.g. a SLURM array): run i takes the cases
  whose key hashes to i (chosen before any label map is read) and writes ``parts/part-i-of-N.json`` (and its
  shard file); the last run to finish, or the first reader, merges the parts into ``prepared.json``.
- Resumable: ``.npy`` cases are done when ``cases/<key>/case.json`` holds the same source signatures (size and
  content hash of the files' ends) and settings; a window-shard run is redone unless all its cases match. Files
  are written under temporary names and renamed, so an interrupted run leaves nothing half-written. Case keys
  and signatures do not depend on where the dataset lives, so a copied or moved dataset resumes.
- An existing store prepared with other settings is refused, naming the setting; use another OUT.
- Bad cases never stop the run: a case with a problem (``check`` wording: unreadable/truncated file, header
  claiming more data than the file holds, unusable affine, 4-D, NaN/inf, shape/affine mismatch, ...) or any
  error while processing is skipped and recorded (``failed/<key>.json``; retried only when its files change, or
  with ``--retry-failed``); the summary counts skips by reason. Discovery notes about targets that were indexed
  anyway (a label value missing from dataset.json) are listed as notes, not skips.
- Small targets (``--min-target-mm3``): upstream's nnU-Net conversion drops targets whose volume on the ORIGINAL
  grid is below 10 mm^3 (in mm^3, not voxels); that is the default. 0 keeps every non-empty target. A target that
  disappears when resampled is always dropped. The training-time 1000-voxel rule lives in ``data/sampler.py``.
- Upstream-layout datasets duplicate each image under every target folder; those copies are stored separately
  (nnU-Net-layout images are stored once for all their label values).
"""

import argparse
import collections
import concurrent.futures
import hashlib
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

from etils import epath
from tqdm import tqdm

from sammed3d_jax import cli
from sammed3d_jax.data import cache, manifest, paths, store
from sammed3d_jax.data.prepare_case import Job, run_case, skip_entry

UPSTREAM_MIN_TARGET_MM3 = 10.0
MAX_SPACING_MM = 20.0
MIN_WINDOW = 8
log = logging.getLogger(__name__)


def make_settings(spacing_mm, min_target_mm3, storage: str, window: int) -> dict[str, Any]:
    """The settings a store is made with, validated (``UsageError`` names the flag)."""
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError) as err:
        raise cli.UsageError(f"--spacing must be numbers (mm), got {spacing_mm!r}") from err
    spacing = spacing * 3 if len(spacing) == 1 else spacing
    if len(spacing) != 3 or not all(math.isfinite(s) and 0 < s <= MAX_SPACING_MM for s in spacing):
        raise cli.UsageError(f"--spacing must be one or three numbers in (0, {MAX_SPACING_MM:g}] mm, got "
                             f"{list(spacing_mm)}")
    if not (math.isfinite(min_target_mm3) and min_target_mm3 >= 0):
        raise cli.UsageError(f"--min-target-mm3 must be a finite number >= 0, got {min_target_mm3}")
    if storage not in cache.STORAGE_KINDS:
        raise cli.UsageError(f"--store must be one of {cache.STORAGE_KINDS}, got {storage!r}")
    settings = {"storage": storage, "spacing_mm": list(spacing), "min_target_mm3": float(min_target_mm3)}
    if storage == "windows":
        if int(window) != window or window < MIN_WINDOW:
            raise cli.UsageError(f"--window must be an integer >= {MIN_WINDOW}, got {window}")
        settings["window_size"] = int(window)
    return settings


def _check_run(workers, num_shards: int, shard_index: int) -> None:
    if workers is not None and (int(workers) != workers or workers < 1):
        raise cli.UsageError(f"--workers must be a whole number >= 1, got {workers}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise cli.UsageError(f"need --num-shards >= 1 and 0 <= --shard-index < --num-shards, got {num_shards}, "
                             f"{shard_index}")


def _existing_settings(out: epath.Path) -> dict[str, Any] | None:
    for path in [out / cache.INDEX_NAME] + (sorted((out / "parts").glob("part-*.json"))
                                            if (out / "parts").exists() else []):
        if path.exists():
            found = cache.read_json(path)
            return {k: found.get(k, "npy" if k == "storage" else None) for k in cache.SETTING_KEYS}
    return None


def check_output(src, out, settings: dict[str, Any]) -> epath.Path:
    """Refuses OUT up front: an input, a file, unwritable, a folder that is not a store, or other settings."""
    out = cli.check_output_path(out, inputs=[src], overwrite=True, name="OUT", is_dir=True)
    if settings["storage"] == "npy" and paths.is_url(out):
        raise cli.UsageError(f"OUT {out}: the npy store is memory-mapped and needs a local or mounted folder; use "
                             "--store windows for object storage")
    try:
        exists = out.exists()
    except ImportError as err:  # e.g. gs:// without its file-system package (gcsfs) installed
        raise cli.UsageError(f"OUT {out}: {err}") from err
    if exists:
        entries = {p.name for p in out.iterdir()}
        if entries and not entries & {cache.INDEX_NAME, "parts", "cases", "failed", "shards"}:
            raise cli.UsageError(f"OUT {out} is a folder that is not a prepared store; choose a new folder")
        old = _existing_settings(out)
        wanted = {k: settings.get(k) for k in cache.SETTING_KEYS}
        if old is not None and old != wanted:
            changed = "; ".join(f"{k}: store has {old[k]!r}, this run asks for {wanted[k]!r}"
                                for k in cache.SETTING_KEYS if old[k] != wanted[k])
            raise cli.UsageError(f"OUT {out} was prepared with other settings ({changed}); use another folder or "
                                 "the same settings")
    return out


def _identity_base(src) -> str:
    """The folder case identities are relative to: the dataset folder, or a manifest's folder."""
    if os.fspath(src).endswith(".json") and epath.Path(src).is_file():
        return paths.absolute(epath.Path(src).parent)
    return paths.absolute(src)


def shard_of(key: str, num_shards: int) -> int:
    """The ``--shard-index`` that prepares case ``key``."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % num_shards


def discover_jobs(src, num_shards: int = 1, shard_index: int = 0):
    """This run's jobs (one per image, sorted by key) and the discovery problems ``(file, problem)``."""
    base = _identity_base(src)

    def key_of(dataset, case, image):
        return cache.case_key(dataset, case, paths.relative(image, base))

    def keep(dataset, case, image):
        return num_shards == 1 or shard_of(key_of(dataset, case, image), num_shards) == shard_index

    records, problems = manifest.load_records(src, keep=keep)
    by_image = collections.defaultdict(list)
    for record in records:
        by_image[record.image].append(record)
    jobs = []
    for image, group in by_image.items():
        labels = sorted({r.label for r in group})
        signature = {"image": cache.file_signature(image),
                     "labels": {paths.relative(p, base): cache.file_signature(p) for p in labels}}
        jobs.append(Job(key_of(group[0].dataset, group[0].case, image), image,
                        tuple(sorted(group, key=lambda r: (r.label, r.label_value))), signature))
    keys = collections.Counter(j.key for j in jobs)
    if max(keys.values(), default=1) > 1:
        raise ValueError(f"{src}: cases with the same key: {[k for k, n in keys.items() if n > 1][:3]}")
    return sorted(jobs, key=lambda j: j.key), problems


def _reusable(jobs, out: epath.Path, settings, retry_failed: bool, previous: dict | None) -> dict[str, dict]:
    """Results of earlier runs that still hold (same source signatures and settings)."""
    if settings["storage"] == "windows":  # all or nothing: the run's shard file is written whole
        prev = previous or {}
        if (not jobs or prev.get("cases") != {j.key: j.signature for j in jobs}
                or not (out / prev.get("shard", "missing")).exists()
                or (retry_failed and "failed" in prev["case_status"].values())):
            return {}
        found = {j.key: {"status": prev["case_status"][j.key], "records": [], "skipped": []} for j in jobs}
        for r in prev["records"]:
            found[r["id"].rsplit("/", 1)[0]]["records"].append(r)
        for entry in prev["skipped"]:
            if "key" in entry:
                found[entry["key"]]["skipped"].append({k: v for k, v in entry.items() if k != "key"})
        return found
    found = {}
    for job in jobs:
        for path in (out / "cases" / job.key / "case.json", None if retry_failed else out / "failed" / f"{job.key}.json"):
            if path is None or not path.exists():
                continue
            try:
                marker = cache.read_json(path)
            except ValueError:
                continue
            files = [r["image"] for r in marker["records"]] + [r["label"] for r in marker["records"]]
            if (marker.get("signature") == job.signature and marker.get("settings") == settings
                    and all((out / f).exists() for f in files)):
                found[job.key] = marker
                break
    return found


class _ShardWriter:
    """Appends window records to this run's shard file (temporary name until ``close``)."""

    def __init__(self, out: epath.Path, name: str):
        self.final = out / name
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.{os.getpid()}.tmp"
        self.file = self.tmp.open("wb")
        self.count = 0

    def add(self, result: dict[str, Any]) -> None:
        for record, payload in zip(result["records"], result.pop("payloads")):
            self.file.write(payload)
            record.update(image=self.final.parent.name + "/" + self.final.name, position=self.count)
            record["label"] = record["image"]
            self.count += 1

    def close(self) -> None:
        self.file.close()
        self.tmp.replace(self.final)

    def abort(self) -> None:
        self.file.close()
        if self.tmp.exists():
            self.tmp.unlink()


def _run(pending, out: epath.Path, settings, workers: int, progress: bool, writer) -> dict[str, dict]:
    results = {}

    def finish(job, result):
        if writer is not None and result["status"] == "ok":
            writer.add(result)
        result.pop("payloads", None)
        results[job.key] = result
        if result["status"] == "failed":
            log.warning("skipped case %s: %s", job.key, result["skipped"][0]["reason"])
        bar.update()

    bar = tqdm(total=len(pending), unit="case", desc="prepare", disable=not progress or None, file=sys.stderr)
    if workers == 1:
        for job in pending:
            finish(job, run_case(job, os.fspath(out), settings))
    else:
        # spawn, not fork: the caller (a training run, a test) may have started JAX's threads, and a forked
        # child of a multithreaded process can deadlock.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(run_case, job, os.fspath(out), settings): job for job in pending}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # a crashed worker (e.g. killed for memory) must not stop the run
                    result = {"key": job.key, "status": "failed", "records": [],
                              "skipped": [skip_entry(r, f"worker failed: {err!r}", "worker process failed")
                                          for r in job.records]}
                finish(job, result)
    bar.close()
    return results


def _index(src, jobs, results, problems, settings, shard_name: str | None) -> dict[str, Any]:
    """The index (or shard part) of this run: records, skips with reasons, notes, summary."""
    prepared = sorted((r for j in jobs for r in results[j.key]["records"]), key=lambda r: r["id"])
    skipped = [dict(s, key=j.key) for j in jobs for s in results[j.key]["skipped"]]
    indexed_labels = {r["source_label"] for r in prepared}
    notes = [{"file": f, "note": p} for f, p in problems if f in indexed_labels]
    skipped += [{"file": f, "reason": p, "kind": p.split(" (")[0]} for f, p in problems if f not in indexed_labels]
    reasons = collections.Counter(s["kind"] for s in skipped)
    summary = {"cases": len(jobs), "failed_cases": sum(results[j.key]["status"] == "failed" for j in jobs),
               "records": len(prepared), "skipped": len(skipped), "skip_reasons": dict(sorted(reasons.items())),
               "notes": len(notes)}
    index = {"format": cache.FORMAT, **settings, "source": _identity_base(src), "summary": summary,
             "records": prepared, "skipped": skipped, "notes": notes}
    if shard_name is not None:
        index.update(shard=shard_name, cases={j.key: j.signature for j in jobs},
                     case_status={j.key: results[j.key]["status"] for j in jobs})
    return index


def prepare_dataset(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spacing_mm: Sequence[float | int] = (1.5, 1.5, 1.5),
    workers: int | None = None,
    min_target_mm3: float | int = UPSTREAM_MIN_TARGET_MM3,
    retry_failed: bool = False,
    progress: bool = True,
    store_kind: str = "npy",
    window: int = 128,
    num_shards: int = 1,
    shard_index: int = 0,
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
        store_kind: "npy" (memory-mapped, single host) or "windows" (window shards, for pods and ``gs://``).
        window: window shards: the stored crop edge (serves crops <= it with an even difference).
        num_shards, shard_index: this run's share of the cases (``--num-shards N --shard-index i``).

    Returns:
        Summary: ``cases``, ``prepared`` (processed now), ``reused`` (already done), ``failed_cases``,
        ``records`` (targets indexed), ``skipped`` (targets left out), ``skip_reasons`` {reason: count}, ``notes``,
        and ``merged`` (whether ``prepared.json`` now covers every shard).

    Raises:
        cli.UsageError: bad settings or OUT (naming the flag). ValueError: ``src`` is neither a dataset nor a
            manifest.
    """
    settings = make_settings(spacing_mm, min_target_mm3, store_kind, window)
    _check_run(workers, num_shards, shard_index)
    out = check_output(src, out, settings)
    jobs, problems = discover_jobs(src, num_shards, shard_index)
    part = out / "parts" / f"part-{shard_index:05d}-of-{num_shards:05d}.json" if num_shards > 1 else None
    index_path = part or out / cache.INDEX_NAME
    previous = cache.read_json(index_path) if index_path.exists() else None
    results = _reusable(jobs, out, settings, retry_failed, previous)
    pending = [j for j in jobs if j.key not in results]
    shard_name = f"shards/part-{shard_index:05d}-of-{num_shards:05d}.windows" if store_kind == "windows" else None
    writer = _ShardWriter(out, shard_name) if store_kind == "windows" and pending else None
    if writer is not None:
        pending, results = jobs, {}  # a shard file is written whole
    try:
        workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
        results.update(_run(pending, out, settings, workers, progress, writer))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    index = _index(src, jobs, results, problems, settings, shard_name)
    # A run that changes nothing leaves the index untouched (it holds no per-run counts).
    if pending or previous != index:
        cache.write_json(index_path, index)
    merged = part is None
    if part is not None:
        try:
            store.merge_parts(out)
            merged = True
        except ValueError:  # other shards still running: the last one (or the first reader) merges
            pass
    return {"cases": len(jobs), "prepared": len(pending), "reused": len(jobs) - len(pending),
            **{k: index["summary"][k] for k in ("failed_cases", "records", "skipped", "skip_reasons", "notes")},
            "merged": merged}


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    cli.quiet_library_logs()
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="dataset folder (upstream or nnU-Net/MSD layout) or manifest .json")
    parser.add_argument("out", help="prepared store folder (local, or gs://... for --store windows)")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.5], help="target spacing in mm (1 or 3 values)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--min-target-mm3", type=float, default=UPSTREAM_MIN_TARGET_MM3,
                        help="drop targets below this volume on the source grid (upstream 10; 0 keeps all)")
    parser.add_argument("--store", default="npy", choices=cache.STORAGE_KINDS,
                        help="npy: memory-mapped arrays for one host (default); windows: crop-window shards for pods")
    parser.add_argument("--window", type=int, default=128, help="--store windows: stored crop edge (default 128)")
    parser.add_argument("--num-shards", type=int, default=1, help="split the cases over this many independent runs")
    parser.add_argument("--shard-index", type=int, default=0, help="which of the --num-shards runs this is")
    parser.add_argument("--retry-failed", action="store_true", help="retry cases that failed in an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = prepare_dataset(args.src, args.out, spacing_mm=args.spacing, workers=args.workers,
                              min_target_mm3=args.min_target_mm3, retry_failed=args.retry_failed,
                              progress=not args.no_progress, store_kind=args.store, window=args.window,
                              num_shards=args.num_shards, shard_index=args.shard_index)
    plural = "" if summary["cases"] == 1 else "s"
    shard = f" (shard {args.shard_index} of {args.num_shards})" if args.num_shards > 1 else ""
    print(f"{args.out}{shard}: {summary['cases']} case{plural} ({summary['prepared']} prepared now, "
          f"{summary['reused']} already done, {summary['failed_cases']} failed), {summary['records']} targets "
          f"indexed, {summary['skipped']} skipped")
    for reason, count in summary["skip_reasons"].items():
        print(f"  skipped {count}: {reason}")
    where = epath.Path(args.out) / (cache.INDEX_NAME if summary["merged"] else "parts")
    if summary["notes"]:
        print(f"  {summary['notes']} notes on indexed targets (e.g. label values missing from dataset.json): "
              f"'notes' in {where}")
    if summary["skipped"]:
        print(f"  details: 'skipped' in {where}")
    if not summary["merged"]:
        print(f"  the index is merged when all {args.num_shards} shards have finished")
    return 0 if summary["records"] or not summary["merged"] else 1


if __name__ == "__main__":
    sys.exit(main())
