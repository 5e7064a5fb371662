"""Train-step throughput and peak memory: the whole jitted step (encoder, click scan, loss, backward, AdamW).

    python benchmarks/train_step.py                    # CPU: vit_b_ori, 128³, batch 1, 1 and 11 clicks, float32
    python benchmarks/train_step.py --mode gpu         # accelerator: batch 12, 1 and 11 clicks, bfloat16
    python benchmarks/train_step.py --mode gpu --json out.json --steps 20
    python benchmarks/train_step.py --scan on          # only the scanned encoder (default: both, to compare)
    python benchmarks/train_step.py --compile-only --clicks 1 --restart   # + the restart from the compile cache

Each (clicks, scan) configuration runs in its own subprocess so that its peak memory is its own: on an accelerator the
peak is ``jax.Device.memory_stats()["peak_bytes_in_use"]``, on CPU the process's ``ru_maxrss``. The step is the
one training uses (``training.step.jit_train_step`` on a one-device mesh, state donated) with upstream's recipe:
AdamW with 20-step accumulation, ``min_clicks = max_clicks = clicks`` (every step runs all clicks), remat of the
click scan and (GPU mode) of the encoder blocks. The batch is random data with a box target, already on device, so
the data pipeline is not measured. ``--scan both`` (the default) runs every configuration with the encoder blocks
unrolled and as a scan over block groups (``ModelConfig.scan_encoder_blocks``) and prints both compile times.
``--restart`` (with ``--compile-only``) compiles each configuration into a fresh persistent compilation cache, then
again in a new process reading it, as a pre-empted ``train.py`` restarting with its cache (on by default) does, and
prints both times: cold compile and restart.
Prints a table; not a test. Targets (one H200): >= 500 samples/s at 1
click, >= 300 at 11 clicks, peak <= 8 GiB; upstream PyTorch: 33.6-33.9 samples/s / 63.5 GiB at 1 click.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

MODES = {
    "cpu": dict(batch=1, clicks=[1, 11], dtype="float32", steps=2, warmup=1, remat_encoder=False),
    "gpu": dict(batch=12, clicks=[1, 11], dtype="bfloat16", steps=10, warmup=2, remat_encoder=True),
}


def run_one(args) -> dict:
    """Compiles and times the train step for one configuration in this process; returns the measurements."""
    import jax
    import numpy as np

    from sammed3d_jax import parallel
    from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
    from sammed3d_jax.training import optim, setup as setup_lib, step as step_lib

    cfg = ModelConfig.variant(args.variant, dtype=args.dtype, remat_policy="full" if args.remat_encoder else "none",
                              attention_impl=args.attention, scan_encoder_blocks=args.scan == "on")
    cfg = resolve_attention_impl(cfg, jax.default_backend())
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    # The loop's own set-up: state shardings, jitted init and the donated train step.
    options = json.loads(args.compiler_options) if args.compiler_options else None
    setup = setup_lib.build(cfg, optim.OptimConfig(accum_steps=20),
                            step_lib.StepConfig(max_clicks=args.clicks, min_clicks=args.clicks), mesh,
                            compiler_options=options)
    # Compile-only: the abstract state (shapes and shardings) is all that lowering needs; no weights are made.
    state = setup.restore_target() if args.compile_only else setup.init(jax.random.key(0))
    fn = setup.train_step
    s, b = cfg.image_size, args.batch
    batch = setup_lib.place_batch(setup_lib.synthetic_batch(b, s), mesh)
    key = parallel.put_replicated(jax.random.key(1), mesh)

    if args.cache_dir:  # Before the first compilation.
        from sammed3d_jax import compile_cache

        compile_cache.enable(args.cache_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    fn = fn.lower(state, batch, key).compile()  # Trace + XLA compilation, timed on their own.
    # CPU seconds of this process too: on a shared machine they depend far less on the load than wall time.
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if args.compile_only:
        return {"variant": args.variant, "image_size": s, "batch": b, "clicks": args.clicks, "dtype": args.dtype,
                "scan_blocks": cfg.scan_encoder_blocks, "compiler_options": options, "compile_s": round(compile_s, 2),
                "compile_cpu_s": round(compile_cpu_s, 2), "device": jax.default_backend(),
                "jax": jax.__version__, "cache": bool(args.cache_dir)}
    t0 = time.perf_counter()
    state, metrics = fn(state, batch, key)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        state, metrics = fn(state, batch, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = fn(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    flops = setup_lib.compiled_flops(fn, state, batch, key)  # The executable is cached: no second compilation.
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, peak_kind = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    else:  # CPU: the process's resident-set peak (ru_maxrss is KiB on Linux).
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process ru_maxrss"
    step_s = float(np.median(times))
    return {
        "device": f"{device.device_kind} ({jax.default_backend()})", "jax": jax.__version__, "variant": args.variant,
        "image_size": s, "batch": b, "clicks": args.clicks, "dtype": args.dtype,
        "remat_encoder": args.remat_encoder, "scan_blocks": cfg.scan_encoder_blocks,
        "compile_s": round(compile_s, 2), "compile_cpu_s": round(compile_cpu_s, 2),
        "first_step_s": round(first_step_s, 2),
        "step_s_median": step_s, "samples_per_s": b / step_s, "peak_gib": peak / 2 ** 30, "peak_kind": peak_kind,
        "loss": float(metrics["loss"]), "steps_timed": args.steps, "flops_per_step": flops,
    }


def _run_config(cmd: list[str]) -> dict:
    """Runs one configuration's subprocess; its RESULT, or ``{"error": output tail}`` (the tail is printed)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": tail[-500:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="cpu")
    parser.add_argument("--variant", default="vit_b_ori")
    parser.add_argument("--batch", type=int, help="override the mode's batch size")
    parser.add_argument("--clicks", type=int, nargs="+", help="override the mode's click counts")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the mode's compute dtype")
    parser.add_argument("--steps", type=int, help="timed steps per configuration")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    parser.add_argument("--no-remat-encoder", action="store_true", help="keep encoder activations (more memory)")
    parser.add_argument("--scan", choices=["both", "on", "off"], default="both",
                        help="encoder blocks as a scan over block groups, unrolled, or both (compile-time comparison)")
    parser.add_argument("--compile-only", action="store_true", help="only trace and compile the step (compile times)")
    parser.add_argument("--compiler-options", help="XLA options of the step as JSON, e.g. configs/default.py's CPU "
                        "'{\"xla_backend_optimization_level\": 1, \"xla_llvm_disable_expensive_passes\": true}'")
    parser.add_argument("--restart", action="store_true", help="with --compile-only: compile each configuration "
                        "into a fresh compilation cache, then time a new process that loads it (a restart)")
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)  # Internal: the persistent cache of one process.
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)  # Internal: run one config here.
    args = parser.parse_args()
    mode = MODES[args.mode]
    args.batch = args.batch or mode["batch"]
    args.dtype = args.dtype or mode["dtype"]
    args.steps = args.steps or mode["steps"]
    args.warmup = mode["warmup"]
    args.remat_encoder = mode["remat_encoder"] and not args.no_remat_encoder
    if args.restart and not args.compile_only:
        parser.error("--restart needs --compile-only")
    if args._one:
        args.clicks = args.clicks[0]
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    results = []
    scans = ["off", "on"] if args.scan == "both" else [args.scan]
    for clicks in args.clicks or mode["clicks"]:
        for scan in scans:
            cmd = [sys.executable, os.path.abspath(__file__), "--_one", "--mode", args.mode, "--variant",
                   args.variant, "--batch", str(args.batch), "--clicks", str(clicks), "--dtype", args.dtype,
                   "--steps", str(args.steps), "--attention", args.attention, "--scan", scan
                   ] + (["--compiler-options", args.compiler_options] if args.compiler_options else []) + (
                       ["--no-remat-encoder"] if args.no_remat_encoder else []) + (
                       ["--compile-only"] if args.compile_only else [])
            print(f"running {args.variant} batch {args.batch} clicks {clicks} {args.dtype} scan {scan} ...",
                  flush=True)
            with tempfile.TemporaryDirectory(prefix="train_step_cache_") as cache:
                if args.restart:
                    cmd += ["--cache-dir", cache]
                result = _run_config(cmd)
                if args.restart and "error" not in result:
                    again = _run_config(cmd)  # A new process: the step comes from the cache the first one wrote.
                    result.update(restart_s=again.get("compile_s"), restart_cpu_s=again.get("compile_cpu_s"),
                                  **({"error": again["error"]} if "error" in again else {}))
            results.append({"clicks": clicks, "batch": args.batch, "scan_blocks": scan == "on", **result})
            if "error" not in result:
                print(f"  compile {result['compile_s']:.1f} s wall, {result['compile_cpu_s']:.1f} s CPU"
                      + (f"; restart from the cache {result['restart_s']:.1f} s wall, {result['restart_cpu_s']:.1f} s"
                         " CPU" if args.restart else ""), flush=True)
            if args.json:  # After every configuration, so that a time limit loses only the one running.
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
    ok = [r for r in results if "error" not in r]
    if args.compile_only:
        for r in results:
            print(f"clicks {r['clicks']:>3}  scan {'on ' if r['scan_blocks'] else 'off'}  "
                  + (f"compile {r['compile_s']:.1f} s wall, {r['compile_cpu_s']:.1f} s CPU" if "error" not in r
                     else "FAILED") + (f"; restart {r['restart_s']:.1f} s wall, {r['restart_cpu_s']:.1f} s CPU"
                                       if "restart_s" in r and "error" not in r else ""))
        for clicks in dict.fromkeys(r["clicks"] for r in ok):
            pair = {r["scan_blocks"]: r for r in ok if r["clicks"] == clicks}
            if len(pair) == 2:
                off, on = pair[False], pair[True]
                print(f"clicks {clicks}: scan speeds compilation up {off['compile_s'] / on['compile_s']:.2f}x (wall), "
                      f"{off['compile_cpu_s'] / on['compile_cpu_s']:.2f}x (CPU)")
        print(f"load average {os.getloadavg()[0]:.1f}")
        sys.exit(0 if len(ok) == len(results) else 1)
    if ok:
        print(f"\ndevice: {ok[0]['device']}, jax {ok[0]['jax']}, host {platform.node()}; {args.variant} "
              f"{ok[0]['image_size']}³, {args.dtype}, remat encoder {args.remat_encoder}; peak = {ok[0]['peak_kind']}")
    print(f"{'clicks':>6} {'batch':>5} {'scan':>5} {'step s':>9} {'samples/s':>10} {'peak GiB':>9} {'compile s':>10}")
    for r in results:
        scan = "on" if r["scan_blocks"] else "off"
        if "error" in r:
            print(f"{r['clicks']:>6} {r['batch']:>5} {scan:>5}  FAILED")
        else:
            print(f"{r['clicks']:>6} {r['batch']:>5} {scan:>5} {r['step_s_median']:>9.4f} {r['samples_per_s']:>10.2f} "
                  f"{r['peak_gib']:>9.2f} {r['compile_s']:>10.1f}")
    if len(ok) < len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
