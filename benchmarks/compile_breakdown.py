"""Where the train step's compile time goes: trace/lower and XLA-compile times of its parts, each in its own process.

    python benchmarks/compile_breakdown.py                         # vit_b_ori, 1 click, float32, every part
    python benchmarks/compile_breakdown.py --parts optimizer adamw --compiler-options '{"xla_backend_optimization_level": 0}'
    python benchmarks/compile_breakdown.py --scan                  # encoder blocks as a scan over block groups

Parts, all against abstract inputs (nothing is allocated or run): ``encode`` (image encoder forward), ``encode_grad``
(its gradient), ``loss_grad`` (the interactive loss and its gradient: encoder, click scan, decoder, DiceCE),
``optimizer`` (the project's update: AdamW chain + accumulation + non-finite skip, as ``training.optim``),
``chain`` (the same AdamW chain without the accumulation wrapper), ``adamw`` (plain ``optax.adamw``), ``norms``
(the three global norms the step logs), ``step`` (the whole jitted train step, as training compiles it). Prints one
JSON line per part. Not a test; the results are in BENCHMARKS.md.
"""

import argparse
import json
import subprocess
import sys
import time

PARTS = ("encode", "encode_grad", "loss_grad", "optimizer", "chain", "adamw", "norms", "step")


def measure(part: str, args) -> dict:
    """Lowers and compiles one part in this process; returns its times."""
    import jax
    import jax.numpy as jnp
    import optax

    from sammed3d_jax import parallel
    from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
    from sammed3d_jax.model.sam import Sam3D
    from sammed3d_jax.training import optim, setup as setup_lib, step as step_lib

    cfg = resolve_attention_impl(ModelConfig.variant(args.variant, dtype="float32", scan_encoder_blocks=args.scan),
                                 jax.default_backend())
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    opt_cfg = optim.OptimConfig(accum_steps=20)
    step_cfg = step_lib.StepConfig(max_clicks=args.clicks, min_clicks=args.clicks)
    setup = setup_lib.build(cfg, opt_cfg, step_cfg, mesh)
    state = setup.restore_target()  # Abstract: shapes and shardings only.
    batch = setup_lib.place_batch(setup_lib.synthetic_batch(1, cfg.image_size), mesh)
    model = Sam3D(cfg)
    params, buffers = state.params, state.buffers
    image = jax.ShapeDtypeStruct((1, *(cfg.image_size,) * 3, 1), jnp.float32)

    def encode(p, b, x):
        return model.apply({"params": p, "buffers": b}, x, method=Sam3D.encode)

    def loss_grad(p, b, batch, key):
        keys = step_lib.sample_keys(key, batch["element"])
        batch, _ = step_lib.model_input(batch, step_cfg.normalization)
        return jax.value_and_grad(step_lib.interactive_loss, has_aux=True)(
            p, b, batch, keys, jnp.int32(args.clicks), jnp.int32(-1), model=model, cfg=step_cfg)

    def update_of(tx):
        return jax.jit(lambda g, s, p: tx.update(g, s, p)), (params, jax.eval_shape(tx.init, params), params)

    chain = optax.chain(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps),
                        optax.add_decayed_weights(opt_cfg.weight_decay),
                        optax.scale_by_learning_rate(optim.make_schedule(opt_cfg)), optim.scale_by_path(opt_cfg))
    fn, fn_args = {
        "encode": lambda: (jax.jit(encode), (params, buffers, image)),
        "encode_grad": lambda: (jax.jit(jax.grad(lambda p, b, x: jnp.sum(encode(p, b, x)))), (params, buffers, image)),
        "loss_grad": lambda: (jax.jit(loss_grad), (params, buffers, batch, jax.random.key(1))),
        "optimizer": lambda: (jax.jit(lambda g, s, p: setup.optimizer.tx.update(g, s, p)),
                              (params, state.opt_state, params)),
        "chain": lambda: update_of(chain),
        "adamw": lambda: update_of(optax.adamw(1e-3)),
        "norms": lambda: (jax.jit(lambda a, b, c: [optax.tree.norm(t) for t in (a, b, c)]), (params,) * 3),
        "step": lambda: (setup.train_step, (state, batch, jax.random.key(1))),
    }[part]()
    t0 = time.perf_counter()
    lowered = fn.lower(*fn_args)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered.compile(args.compiler_options) if args.compiler_options else lowered.compile()
    return {"part": part, "variant": args.variant, "scan": args.scan, "compiler_options": args.compiler_options,
            "lower_s": round(t1 - t0, 1), "compile_s": round(time.perf_counter() - t1, 1),
            "compile_cpu_s": round(time.process_time() - c1, 1), "leaves": len(jax.tree.leaves(params))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--variant", default="vit_b_ori")
    parser.add_argument("--clicks", type=int, default=1)
    parser.add_argument("--scan", action="store_true", help="encoder blocks as a scan over block groups")
    parser.add_argument("--compiler-options", type=json.loads, help="XLA options as JSON, for every part")
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)  # Internal: one part, here.
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(args.parts[0], args)), flush=True)
        return
    for part in args.parts:  # A process per part: no part reuses another's traces or compilations.
        cmd = [sys.executable, __file__, "--_one", "--parts", part, "--variant", args.variant, "--clicks",
               str(args.clicks)] + (["--scan"] if args.scan else []) + (
            ["--compiler-options", json.dumps(args.compiler_options)] if args.compiler_options else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1:] or [f"{part}: failed: {proc.stderr.strip()[-300:]}"]
        print(line[0], flush=True)


if __name__ == "__main__":
    main()
