"""Encoder speed: our exact unpadded windowed attention vs upstream's naive padded formulation, same weights.

    python benchmarks/encoder.py                       # CPU: vit_b_ori encoder forward, 128³, batch 1, float32
    python benchmarks/encoder.py --full --batch 1 8 --dtype bfloat16    # accelerator: full inference too

Prints, for each variant, the median time per call, the compiled program's memory (arguments + outputs + temporaries
from XLA's memory analysis), and for the pair the speed ratio and the max abs difference of the outputs. With
``--full`` it also times the full model's inference (encode + one decode + trilinear upsampling to 128³) and reports
volumes/s. Weights are random but non-zero everywhere (upstream zero-initialises pos/rel-pos tables).
Not a test: timings go to BENCHMARKS.md with the machine they came from.
"""

import argparse
import json
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.model import ModelConfig, Sam3D, init_variables, upsample_logits
from sammed3d_jax.model.reference import NaiveEncoderAttention, perturbed


def _time(fn, *args, repeats: int) -> tuple[float, list[float]]:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _memory_mib(fn, *args) -> float:
    try:
        m = fn.lower(*args).compile().memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return total / 2 ** 20
    except Exception:  # not every backend reports it
        return float("nan")


def _peak_device_mib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b_ori")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also time full inference (encode + decode + upsample)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference (e.g. to save time)")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                        help="exact attention backend (auto: cuDNN for bf16 on GPU, else XLA)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    cfg = ModelConfig.variant(args.variant, dtype=args.dtype, attention_impl=args.attention)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {platform.processor() or ''}"
          f" {jax.local_device_count()} device(s); model {args.variant}, dtype {args.dtype}")
    variables = perturbed(init_variables(cfg, jax.random.key(0)), jax.random.key(1), 0.02)
    results = []
    for batch in args.batch:
        try:
            results += _run_batch(cfg, variables, batch, args)
        except Exception as e:  # e.g. a cuDNN shape restriction: say so and measure the XLA path instead
            if cfg.attention_impl == "xla":
                raise
            print(f"batch {batch}: attention {cfg.attention_impl!r} failed ({type(e).__name__}: {str(e)[:300]}); "
                  f"falling back to XLA")
            cfg = cfg.replace(attention_impl="xla")
            results += _run_batch(cfg, variables, batch, args)
    print(f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"peak device memory {_peak_device_mib():.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "dtype": args.dtype, "results": results}, f, indent=1)


def _run_batch(cfg: ModelConfig, variables, batch: int, args) -> list[dict]:
    s = cfg.image_size
    results = []
    vol = jax.random.normal(jax.random.key(2), (batch, s, s, s, 1), jnp.float32)
    fns = {"exact": Sam3D(cfg)}
    if not args.no_naive:
        fns["naive"] = Sam3D(cfg, attention_cls=NaiveEncoderAttention)
    outs, times = {}, {}
    for name, model in fns.items():
        enc = jax.jit(lambda v, x, model=model: model.apply(v, x, method=Sam3D.encode))
        mem = _memory_mib(enc, variables, vol)
        med, _ = _time(enc, variables, vol, repeats=args.repeats)
        outs[name], times[name] = np.asarray(enc(variables, vol), np.float32), med
        row = dict(batch=batch, what=f"encoder ({name} attention)", ms=1e3 * med, program_mib=mem)
        results.append(row)
        print(f"batch {batch:2d}  encoder, {name:5s} attention: {1e3 * med:9.2f} ms   "
              f"program memory {mem:8.1f} MiB")
    if "naive" in outs:
        diff = float(np.max(np.abs(outs["exact"] - outs["naive"])))
        ratio = times["naive"] / times["exact"]
        results.append(dict(batch=batch, what="ratio naive/exact", ratio=ratio, max_abs_diff=diff))
        print(f"batch {batch:2d}  speed-up exact vs naive: {ratio:.2f}x   max |exact - naive| = {diff:.2e}")
    if args.full:
        model = fns["exact"]
        g4 = cfg.low_res_size

        @jax.jit
        def infer(v, x):
            emb = model.apply(v, x, method=Sam3D.encode)
            b = x.shape[0]
            pts = jnp.full((b, 1, 3), s / 2, jnp.float32)
            lab = jnp.ones((b, 1), jnp.int32)
            low, _ = model.apply(v, emb, pts, lab, jnp.zeros((b, g4, g4, g4, 1)), method=Sam3D.decode)
            return upsample_logits(low, s) > 0

        med, _ = _time(infer, variables, vol, repeats=args.repeats)
        results.append(dict(batch=batch, what="full inference", ms=1e3 * med, volumes_per_s=batch / med))
        print(f"batch {batch:2d}  full inference (encode + decode + upsample): {1e3 * med:9.2f} ms   "
              f"{batch / med:8.1f} volumes/s  (attention {cfg.attention_impl})")
    return results


if __name__ == "__main__":
    main()
