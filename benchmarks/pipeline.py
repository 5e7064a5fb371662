"""Training-pipeline throughput from the prepared cache: crops/s at 128^3 for several worker counts.

Not a test. Makes (once, cached in --workdir) a synthetic dataset whose volumes are about 160^3 at 1.5 mm,
prepares it, then times ``pipeline.build_train_iterator`` batches. Run on a quiet machine:

    python benchmarks/pipeline.py --workdir /tmp/sammed3d_bench

"crops/s per core" divides by the processes doing the work: 1 for worker_count 0 (one read thread in the main
process), N for N worker processes. The ``cpu`` column is the measured CPU time (main process plus workers) per
crop consumed (worker start-up included, so an upper bound when workers > 0); 1000 / that is crops per
CPU-second, which is the per-core throughput on a machine shared with other jobs. Target: >= 40 crops/s per core.
"""

import argparse
import json
import os
import pathlib
import resource
import time

from sammed3d_jax.data import pipeline, prepare, synthetic

# 240 mm field of view: ~200 voxels at ~1.2 mm in-plane and ~84 at ~2.9 mm across, about 160^3 at 1.5 mm.
BENCH_SHAPE = (200, 200, 84)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(prepared: pathlib.Path, worker_count: int, *, crop: int, batch: int, batches: int, warmup: int) -> dict:
    cpu0 = _cpu_seconds()
    it = pipeline.build_train_iterator(str(prepared), crop_size=crop, global_batch_size=batch, rows=range(batch), seed=0,
                                       worker_count=worker_count)
    try:
        for _ in range(warmup):  # process start-up and first page-cache reads are not throughput
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        wall = time.perf_counter() - t0
    finally:
        it.close()  # workers exit, so their CPU time shows up in RUSAGE_CHILDREN
    # CPU of everything (worker start-up, warm-up and read-ahead batches included) over the crops consumed:
    # an upper bound on the per-crop cost for worker_count > 0, exact for 0.
    cpu = _cpu_seconds() - cpu0
    crops = batches * batch
    cores = max(1, worker_count)
    return {"workers": worker_count, "crops_per_s": crops / wall, "per_core": crops / wall / cores,
            "cpu_ms_per_crop": 1000 * cpu / ((warmup + batches) * batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/sammed3d_bench", help="dataset + prepared cache (reused)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    source, prepared = work / "synthetic", work / "prepared"
    if not (source / "dataset.json").exists():
        t0 = time.perf_counter()
        synthetic.make_synthetic_dataset(source, args.cases, seed=0, shape=BENCH_SHAPE)
        print(f"synthetic dataset: {args.cases} cases {BENCH_SHAPE} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    summary = prepare.prepare_dataset(source, prepared, progress=False)
    print(f"prepare: {summary['records']} targets ({summary['prepared']} cases prepared, {summary['reused']} reused) "
          f"in {time.perf_counter() - t0:.1f} s")
    shapes = sorted({tuple(r["shape"]) for r in json.loads((prepared / "prepared.json").read_text())["records"]})
    print(f"prepared volume shapes: {shapes}")
    print(f"crop {args.crop}^3, batch {args.batch}, {args.batches} timed batches, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'workers':>7}  {'crops/s':>8}  {'crops/s/core':>12}  {'cpu ms/crop':>11}  {'crops/cpu-s':>11}")
    for workers in args.workers:
        r = measure(prepared, workers, crop=args.crop, batch=args.batch, batches=args.batches, warmup=args.warmup)
        print(f"{r['workers']:>7}  {r['crops_per_s']:>8.1f}  {r['per_core']:>12.1f}  {r['cpu_ms_per_crop']:>11.1f}  "
              f"{1000 / r['cpu_ms_per_crop']:>11.1f}")


if __name__ == "__main__":
    main()
