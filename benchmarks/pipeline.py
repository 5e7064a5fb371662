"""Host input throughput: crops per CPU-second at 128^3 from a prepared store (the host side of the pipeline).

Not a test. Makes (once, cached in --workdir) a synthetic dataset whose volumes are about 160^3 at 1.5 mm,
prepares it, then times ``pipeline.build_train_iterator`` batches in this process (worker_count 0, one read
thread), from the ``.npy`` store and the window-shard store; then the cost of reading one window per store format,
ArrayRecord included. The host only picks records and flips and copies raw windows; clip, normalisation and flips
run on the accelerator (``augment.finish_batch``, timed here on this CPU for information). Run on a quiet machine:

    python benchmarks/pipeline.py --workdir /tmp/sammed3d_bench

CPU time is this process's user + system time (every thread) per crop delivered. ``cold`` counts from a fresh
iterator, so it includes the first draw of every record (read twice: once to check it, once for the batch);
``warm`` is the steady state once every record has been seen (every later epoch). The host-side pipeline the
project had before (every step on the host, ``tests/data/host_reference.py``) is timed in the same run, and so is
a bare copy of a crop's bytes between large buffers, the ceiling memory bandwidth sets at that moment (on a
shared machine it moves with the other jobs, so compare figures from one run). The last line,
``crops per CPU-second: N``, gives the faster store's steady state.
"""

import argparse
import functools
import json
import os
import pathlib
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "data"))

from sammed3d_jax.data import pipeline, prepare, synthetic  # noqa: E402

# 240 mm field of view: ~200 voxels at ~1.2 mm in-plane and ~84 at ~2.9 mm across, about 160^3 at 1.5 mm.
BENCH_SHAPE = (200, 200, 84)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _time(batches, n: int, batch: int) -> tuple[float, float]:
    """(crops per CPU-second, crops per wall-second) over the next ``n`` batches."""
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    for _ in range(n):
        next(batches)
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    return n * batch / cpu, n * batch / wall


def measure_new(prepared: pathlib.Path, *, crop: int, batch: int, batches: int, stores: list[str]) -> dict:
    out = {}
    for kind in stores:
        source = prepared if kind == "npy" else prepared.parent / f"prepared_{kind}"
        it = pipeline.build_train_iterator(str(source), crop_size=crop, global_batch_size=batch,
                                           rows=range(batch), seed=0, prefetch_batches=1)
        try:
            cold = _time(it, batches, batch)
            warm = _time(it, batches, batch)
        finally:
            it.close()
        out[kind] = {"cold": cold, "warm": warm}
    return out


def measure_bare_copy(crop: int, repeats: int = 20) -> float:
    """Crops per CPU-second of a bare copy of a crop's bytes (image + label) between two large buffers: the ceiling
    that memory bandwidth sets on this machine right now, to read the host pipeline's figure against."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    n = 5 * crop**3
    source = np.ones(8 * n, np.uint8)  # larger than the caches, like the page cache a window comes from
    target = np.empty_like(source)
    target[:] = 0
    cpu0 = _cpu_seconds()
    for i in range(repeats):
        k = i % 8
        target[k * n:(k + 1) * n] = source[k * n:(k + 1) * n]
    return repeats / (_cpu_seconds() - cpu0)


def measure_formats(work: pathlib.Path, crop: int, repeats: int = 3) -> dict[str, float]:
    """CPU milliseconds to read one crop window (image + label) into a buffer, per store format (warm cache).

    ``npy`` and ``windows`` through the pipeline's readers; ArrayRecord (Grain's ``ArrayRecordDataSource``) over
    the same windows, written here once per option string, read and decoded into the same buffers.
    """
    import numpy as np  # pylint: disable=import-outside-toplevel

    from sammed3d_jax.data import sampler, store  # pylint: disable=import-outside-toplevel

    image, label = np.empty((crop,) * 3, np.float32), np.empty((crop,) * 3, np.uint8)

    def per_window(read, n):
        for i in range(n):  # warm the page cache and open files
            read(i)
        cpu0 = _cpu_seconds()
        for _ in range(repeats):
            for i in range(n):
                read(i)
        return 1000 * (_cpu_seconds() - cpu0) / (repeats * n)

    out = {}
    for kind, folder in (("npy", work / "prepared"), ("windows", work / "prepared_windows")):
        if (folder / "prepared.json").exists():
            opened = store.open_store(folder)
            recs = opened.records
            out[kind] = per_window(lambda i: opened.read_window(recs[i], sampler.crop_window(recs[i], crop), image,
                                                                label), len(recs))
    try:
        import grain  # pylint: disable=import-outside-toplevel
        from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    except ImportError:
        return out
    opened = store.open_store(work / "prepared")
    payloads = []
    for r in opened.records:
        opened.read_window(r, sampler.crop_window(r, crop), image, label)
        payloads.append(image.astype("<f4").tobytes() + label.tobytes())
    for options in ("group_size:1,uncompressed", "group_size:1,zstd:1"):
        path = work / f"windows_{options.split(',')[1].replace(':', '')}.array_record"
        if not path.exists():
            writer = array_record_module.ArrayRecordWriter(str(path), options)
            for p in payloads:
                writer.write(p)
            writer.close()
        source = grain.sources.ArrayRecordDataSource([str(path)])

        def read(i, source=source):
            data = source[i]
            image[...] = np.frombuffer(data, "<f4", crop**3).reshape(image.shape)
            label[...] = np.frombuffer(data, np.uint8, crop**3, offset=4 * crop**3).reshape(label.shape)

        mib = path.stat().st_size / len(payloads) / 2**20
        out[f"ArrayRecord {options.split(',')[1]} ({mib:.1f} MiB/record)"] = per_window(read, len(payloads))
    return out


def measure_old(prepared: pathlib.Path, *, crop: int, batch: int, batches: int) -> tuple[float, float]:
    from host_reference import host_batches  # pylint: disable=import-outside-toplevel

    ds = host_batches(str(prepared), global_batch_size=batch, seed=0, crop_size=crop)
    # By index, in this thread: iter(ds) would start Grain's default 16 threads reading 500 elements ahead, whose
    # CPU would be charged to the crops consumed (and keep running after the measurement).
    return _time((ds[j] for j in range(batches)), batches, batch)


def measure_device_finish(crop: int, batch: int, repeats: int = 5) -> float:
    """Milliseconds per crop of ``finish_batch`` (per-volume) on this machine's default jax device."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from sammed3d_jax.data import augment  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    raw = {"image": rng.uniform(0, 100, (batch, crop, crop, crop, 1)).astype(np.float32),
           "label": np.zeros((batch, crop, crop, crop), np.uint8), "flip": rng.random((batch, 3)) < 0.5,
           "ct_clip": np.zeros(batch, bool)}
    raw = jax.device_put(raw)
    fn = jax.jit(functools.partial(augment.finish_batch, normalization="per_volume"))
    jax.block_until_ready(fn(raw))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(raw))
    return 1000 * (time.perf_counter() - t0) / (repeats * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/sammed3d_bench", help="dataset + prepared stores (reused)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=25, help="timed batches per phase")
    parser.add_argument("--stores", nargs="+", default=["npy", "windows"], help="store kinds to read: npy, windows")
    parser.add_argument("--no-old", action="store_true", help="skip the host-side pipeline of before")
    parser.add_argument("--no-device", action="store_true", help="skip timing finish_batch")
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    source, prepared = work / "synthetic", work / "prepared"
    if not (source / "dataset.json").exists():
        t0 = time.perf_counter()
        synthetic.make_synthetic_dataset(source, args.cases, seed=0, shape=BENCH_SHAPE)
        print(f"synthetic dataset: {args.cases} cases {BENCH_SHAPE} in {time.perf_counter() - t0:.1f} s")
    for kind in args.stores:
        out = prepared if kind == "npy" else work / f"prepared_{kind}"
        t0 = time.perf_counter()
        extra = {} if kind == "npy" else {"store_kind": kind, "window": args.crop}
        summary = prepare.prepare_dataset(source, out, progress=False, **extra)
        print(f"prepare ({kind}): {summary['records']} targets ({summary['prepared']} cases prepared, "
              f"{summary['reused']} reused) in {time.perf_counter() - t0:.1f} s")
    shapes = sorted({tuple(r["shape"]) for r in json.loads((prepared / "prepared.json").read_text())["records"]})
    print(f"prepared volume shapes: {shapes}")
    print(f"crop {args.crop}^3, batch {args.batch}, {args.batches} timed batches per phase, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    bare = measure_bare_copy(args.crop)
    results = measure_new(prepared, crop=args.crop, batch=args.batch, batches=args.batches, stores=args.stores)
    for kind, r in results.items():
        print(f"host input ({kind} store): cold {r['cold'][0]:.0f} crops/CPU-s ({r['cold'][1]:.0f}/s wall), "
              f"warm {r['warm'][0]:.0f} crops/CPU-s ({r['warm'][1]:.0f}/s wall)")
    for kind, ms in measure_formats(work, args.crop).items():
        print(f"read one {args.crop}^3 window, {kind}: {ms:.1f} CPU-ms")
    old = None
    if not args.no_old:
        old = measure_old(prepared, crop=args.crop, batch=args.batch, batches=args.batches)
        print(f"before (every step on the host): {old[0]:.0f} crops/CPU-s ({old[1]:.0f}/s wall)")
    if not args.no_device:
        print(f"finish_batch on this CPU (for information; it runs on the accelerator): "
              f"{measure_device_finish(args.crop, args.batch):.1f} ms per crop")
    print(f"bare copy of a crop's {5 * args.crop**3 / 2**20:.0f} MiB between large buffers: {bare:.0f} crops/CPU-s "
          "(the memory-bandwidth ceiling right now)")
    best = max(results, key=lambda kind: results[kind]["warm"][0])
    others = "; ".join(f"{kind} store {r['warm'][0]:.0f}" for kind, r in results.items() if kind != best)
    print(f"crops per CPU-second: {results[best]['warm'][0]:.0f}  ({best} store, steady state; first epoch "
          f"{results[best]['cold'][0]:.0f}{'; ' + others if others else ''}; before {old[0]:.0f})"
          if not args.no_old else f"crops per CPU-second: {results[best]['warm'][0]:.0f}  ({best} store)")

if __name__ == "__main__":
    main()
