"""Scaling sweep: train-step cost of model variants x resolutions x batch sizes x remat policies on this device.

    python benchmarks/scaling.py --quick                      # CPU, small variants, a few minutes
    python benchmarks/scaling.py --mode gpu --out runs/scaling_gpu --max-minutes 8
    python benchmarks/scaling.py --variants vit_b_ori vit_b_ori@160 --batch 1 2 --remat none full --out OUT

Each configuration runs in its own subprocess (its peak memory is its own; a crash costs one row). The step is the
training one (``training.step.jit_train_step``: encoder, the click scan, Dice+BCE, backward, AdamW) on one device,
with ``clicks`` clicks per sample on random data. Per configuration: compile time (trace + XLA; also in CPU
seconds, which depend less on a shared machine's load), median step time, samples/s, peak memory (device
``peak_bytes_in_use``, or the process's resident peak on CPU), FLOPs per sample from the compiled step's cost analysis (everything XLA executes, rematerialisation included) and from the analytic count
of ``sammed3d_jax.scaling`` (model FLOPs over real tokens only; upstream's padded count beside it), and MFU =
achieved / peak FLOP/s for both counts. Peak FLOP/s: the data-sheet dense number for known GPUs (bf16, or TF32 for
float32 matmuls), else a measured large-matmul rate of this process (labelled "measured"), or ``--peak-tflops``.
Before anything is allocated the compiled step's memory analysis is compared with the device memory (CPU: available
RAM): configurations that cannot fit are skipped with the reason, as are out-of-memory failures and configurations
beyond ``--max-minutes``. Writes ``scaling.csv`` and ``scaling.png`` (samples/s and peak memory vs parameters) to
``--out`` and prints the table. A benchmark, not a test.
"""

import argparse
import csv
import io
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    "quick": dict(variants=["small", "small@96"], batch=[1, 4], remat=["none", "full"], dtype="float32",
                  clicks=2, steps=2, warmup=1),
    "cpu": dict(variants=["small", "vit_b_ori"], batch=[1], remat=["none", "full"], dtype="float32", clicks=2,
                steps=2, warmup=1),
    # One H200 for a few minutes: every variant and two more resolutions at one batch size (about 40 s each).
    "gpu": dict(variants=["vit_b_ori", "vit_b", "vit_l", "vit_h", "vit_b_ori@160", "vit_b_ori@256"], batch=[4],
                remat=["full"], dtype="bfloat16", clicks=11, steps=5, warmup=2),
}
# Dense data-sheet peaks in FLOP/s: (bfloat16, float32 matmuls at XLA's default GPU precision, i.e. TF32).
GPU_PEAKS = {"H200": (989.4e12, 494.7e12), "H100": (989.4e12, 494.7e12), "A100": (312e12, 156e12),
             "L40S": (362e12, 183e12), "A10": (125e12, 62.5e12)}
FIELDS = ["variant", "image_size", "batch", "remat", "scan", "dtype", "attention", "clicks", "params", "status",
          "reason",
          "compile_s", "compile_cpu_s", "step_s", "samples_per_s", "peak_gib", "needed_gib", "xla_gflop_per_sample",
          "analytic_gflop_per_sample", "padded_gflop_per_sample", "achieved_tflops", "peak_tflops", "peak_source",
          "mfu_xla", "mfu_analytic", "device"]


def _parse_variant(spec: str) -> tuple[str, int | None]:
    name, _, size = spec.partition("@")
    return name, (int(size) if size else None)


def _available_bytes(device) -> tuple[int, str]:
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "device bytes_limit"
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"], "host MemAvailable"


def run_one(job: dict) -> dict:
    """Compiles, sizes and (if it fits) times one configuration in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sammed3d_jax import parallel, scaling
    from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
    from sammed3d_jax.training import optim, setup as setup_lib, step as step_lib

    name, size = _parse_variant(job["variant"])
    overrides = {"image_size": size} if size else {}
    cfg = ModelConfig.variant(name, dtype=job["dtype"], remat_policy=job["remat"], scan_encoder_blocks=job["scan"],
                              **overrides)
    cfg = resolve_attention_impl(cfg, jax.default_backend())
    device = jax.devices()[0]
    b, s = job["batch"], cfg.image_size
    row = {"variant": name, "image_size": s, "batch": b, "remat": cfg.remat_policy, "scan": cfg.scan_encoder_blocks,
           "dtype": cfg.dtype, "clicks": job["clicks"], "params": scaling.parameter_count(cfg),
           "analytic_gflop_per_sample": scaling.train_step_flops(cfg, job["clicks"]) / 1e9,
           "padded_gflop_per_sample": scaling.train_step_flops(cfg, job["clicks"], padded=True) / 1e9,
           "device": f"{device.device_kind} ({jax.default_backend()})"}

    mesh = parallel.make_mesh(devices=[device])
    optim_cfg = optim.OptimConfig(accum_steps=1)
    step_cfg = step_lib.StepConfig(max_clicks=job["clicks"], min_clicks=job["clicks"])
    data = parallel.batch_sharding(mesh)
    abstract_batch = {"image": jax.ShapeDtypeStruct((b, s, s, s, 1), jnp.float32, sharding=data),
                      "label": jax.ShapeDtypeStruct((b, s, s, s), jnp.uint8, sharding=data),
                      "element": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data)}
    key = parallel.put_replicated(jax.random.key(1), mesh)

    def compile_step(model_cfg):  # The training loop's own set-up: shardings, jitted init, donated step.
        setup = setup_lib.build(model_cfg, optim_cfg, step_cfg, mesh)
        return setup, setup.train_step.lower(setup.restore_target(), abstract_batch, key).compile()

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        setup, compiled = compile_step(cfg)
    except Exception:  # noqa: BLE001 - cuDNN may reject a shape; the portable path is then measured instead
        if cfg.attention_impl != "cudnn":
            raise
        cfg = cfg.replace(attention_impl="xla")
        t0, c0 = time.perf_counter(), time.process_time()
        setup, compiled = compile_step(cfg)
    row["compile_s"], row["compile_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    row["attention"] = cfg.attention_impl
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row["xla_gflop_per_sample"] = float(cost.get("flops", float("nan"))) / b / 1e9
    mem = compiled.memory_analysis()
    if mem is not None:
        need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
        row["needed_gib"] = need / 2 ** 30
        avail, where = _available_bytes(device)
        if need > 0.95 * avail:
            return row | {"status": "skipped", "reason": f"needs {need / 2 ** 30:.1f} GiB (XLA memory analysis), "
                                                          f"{avail / 2 ** 30:.1f} GiB available ({where})"}
    try:
        state = setup.init(jax.random.key(0))
        batch = setup_lib.place_batch(setup_lib.synthetic_batch(b, s), mesh)
        for _ in range(job["warmup"]):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(job["steps"]):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - an accelerator OOM is an XlaRuntimeError; anything else is reported
        text = f"{type(e).__name__}: {e}"
        status = "skipped" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "failed"
        return row | {"status": status, "reason": text.splitlines()[0][:300]}
    step_s = float(np.median(times))
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return row | {"status": "ok", "reason": "", "step_s": step_s, "samples_per_s": b / step_s,
                  "peak_gib": peak / 2 ** 30, "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def peak_flops(dtype: str, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for the default device and compute dtype."""
    import jax
    import jax.numpy as jnp

    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32) in GPU_PEAKS.items():
        if name in kind:
            value = bf16 if dtype in ("bfloat16", "float16") else f32
            return value, f"{name} data sheet ({'bf16' if value == bf16 else 'tf32'} dense)"
    n = 2048
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        out = mm(a)
    out.block_until_ready()
    return 5 * 2.0 * n ** 3 / (time.perf_counter() - t0), f"measured {n}² matmul, {kind}"


def _child(job: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"over the remaining time budget ({timeout_s:.0f} s)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    why = "killed (out of host memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"status": "failed", "reason": f"{why}: {tail[0][:300]}"}


def write_outputs(rows: list[dict], out: str) -> tuple[str, str]:
    """Writes ``scaling.csv`` and ``scaling.png`` into ``out`` (any epath location); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from etils import epath

    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (out / "scaling.csv").write_text(text.getvalue())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in rows if r.get("status") == "ok"]
    for remat in sorted({r["remat"] for r in ok}):
        sel = [r for r in ok if r["remat"] == remat]
        for ax, key in zip(axes, ("samples_per_s", "peak_gib")):
            ax.scatter([r["params"] for r in sel], [r[key] for r in sel], label=f"remat {remat}")
            for r in sel:
                ax.annotate(f"{r['variant']}@{r['image_size']} b{r['batch']}", (r["params"], r[key]), fontsize=7)
    params = [r["params"] for r in ok]
    for ax, title in zip(axes, ("samples/s", "peak memory (GiB)")):
        if params and max(params) > 10 * min(params):  # A log axis only where it spans a decade or more.
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if ok:
        axes[0].legend(fontsize=8)
        fig.suptitle(f"train step, {ok[0]['device']}, {ok[0]['dtype']}, {ok[0]['clicks']} clicks")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (out / "scaling.png").write_bytes(buf.getvalue())
    return os.fspath(out / "scaling.csv"), os.fspath(out / "scaling.png")


def format_table(rows: list[dict]) -> str:
    head = (f"{'variant':>10} {'size':>4} {'b':>3} {'remat':>22} {'compile s':>9} {'step s':>8} {'samples/s':>9} "
            f"{'peak GiB':>8} {'GFLOP xla':>11} {'analytic':>9} {'MFU xla':>7} {'MFU an.':>7}  status")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['variant']:>10} {r.get('image_size', ''):>4} {r['batch']:>3} {r['remat']:>22}  "
                         f"{r.get('status', 'failed')}: {r.get('reason', '')}")
            continue
        lines.append(
            f"{r['variant']:>10} {r['image_size']:>4} {r['batch']:>3} {r['remat']:>22} {r['compile_s']:>9.1f} "
            f"{r['step_s']:>8.3f} {r['samples_per_s']:>9.2f} {r['peak_gib']:>8.2f} "
            f"{r['xla_gflop_per_sample']:>11.1f} {r['analytic_gflop_per_sample']:>9.1f} "
            f"{100 * r['mfu_xla']:>6.1f}% {100 * r['mfu_analytic']:>6.1f}%  ok")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the quick CPU preset (same as --mode quick)")
    parser.add_argument("--variants", nargs="+", help="variant names, NAME@SIZE for another input size")
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--remat", nargs="+", help="remat policy names (ModelConfig.remat_policy)")
    parser.add_argument("--no-scan", action="store_true", help="unrolled encoder blocks (default: scanned)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--clicks", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per configuration")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device for MFU (default: see above)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="skip configurations beyond this budget")
    parser.add_argument("--out", default="runs/scaling", help="folder for scaling.csv and scaling.png")
    parser.add_argument("--_one", help=argparse.SUPPRESS)  # Internal: run one JSON job in this process.
    args = parser.parse_args()
    if args._one:
        print("RESULT " + json.dumps(run_one(json.loads(args._one))), flush=True)
        return 0
    preset = PRESETS["quick" if args.quick else args.mode]
    dtype = args.dtype or preset["dtype"]
    jobs = [dict(variant=v, batch=b, remat=r, scan=not args.no_scan, dtype=dtype,
                 clicks=args.clicks or preset["clicks"], steps=args.steps or preset["steps"], warmup=preset["warmup"])
            for v in args.variants or preset["variants"] for b in args.batch or preset["batch"]
            for r in args.remat or preset["remat"]]
    peak, peak_source = peak_flops(dtype, args.peak_tflops)
    print(f"{len(jobs)} configurations; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})", flush=True)
    deadline = time.monotonic() + 60 * args.max_minutes
    rows = []
    for job in jobs:
        left = deadline - time.monotonic()
        name, size = _parse_variant(job["variant"])
        base = {"variant": name, **({"image_size": size} if size else {}), "batch": job["batch"],
                "remat": job["remat"], "scan": job["scan"], "dtype": dtype, "clicks": job["clicks"]}
        if left < 5:
            rows.append(base | {"status": "skipped", "reason": f"--max-minutes {args.max_minutes} reached"})
            continue
        print(f"  {job['variant']} batch {job['batch']} remat {job['remat']} ...", flush=True)
        row = base | _child(job, left)
        if row.get("status") == "ok":
            achieved = row["xla_gflop_per_sample"] * 1e9 * row["samples_per_s"]
            row |= {"achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "peak_source": peak_source,
                    "mfu_xla": achieved / peak,
                    "mfu_analytic": row["analytic_gflop_per_sample"] * 1e9 * row["samples_per_s"] / peak}
        rows.append(row)
    print(format_table(rows))
    csv_path, png_path = write_outputs(rows, args.out)
    print(f"wrote {csv_path} and {png_path}")
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
