"""What the optimizer update's XLA compile time follows: the number of leaves, or the number of distinct kernels.

    python benchmarks/optimizer_compile.py            # every case below, each in its own process

Each case jit-compiles the project's optimizer update (``training.optim.make_optimizer``: AdamW chain inside
``MultiSteps`` with accumulation 20 and the non-finite skip) plus ``optax.apply_updates``, against abstract inputs
(nothing is allocated or run), and prints one JSON line with its lowering and compile seconds:

- ``same:N`` / ``distinct:N``: N synthetic leaves of one shape (8, 10, 12) / of N different shapes (8, 10, 12 + i);
- ``factors:N``: N leaves of one shape, each with its own per-path lr factor (a different constant per leaf);
- ``vit_b_ori`` / ``vit_b_ori_stacked``: the released model's params as the train state holds them (323 leaves, 37
  shapes), and with the 12 encoder blocks' leaves stacked per shape group (the layout a stacked train state would
  have: 173 leaves).

Not a test; the results are in BENCHMARKS.md ("Where the step's compile time goes").
"""

import json
import subprocess
import sys
import time

CASES = ("same:100", "distinct:100", "factors:100", "vit_b_ori", "vit_b_ori_stacked")


def params_of(case: str):
    import jax
    import jax.numpy as jnp

    if case.startswith(("same:", "distinct:", "factors:")):
        kind, n = case.split(":")
        shape = (lambda i: (8, 10, 12 + i)) if kind == "distinct" else (lambda i: (8, 10, 12))
        return {f"w{i}": jax.ShapeDtypeStruct(shape(i), jnp.float32) for i in range(int(n))}
    from sammed3d_jax.model import ModelConfig, init_variables

    cfg = ModelConfig.variant("vit_b_ori", dtype="float32")
    params = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))["params"]
    if case == "vit_b_ori_stacked":
        encoder = dict(params["image_encoder"])
        groups: dict[tuple, list] = {}
        for i in range(cfg.encoder_depth):  # windowed and global blocks differ in their rel-pos shapes
            block = encoder.pop(f"blocks_{i}")
            groups.setdefault(tuple(x.shape for x in jax.tree.leaves(block)), []).append(block)
        for j, blocks in enumerate(groups.values()):
            encoder[f"stack_{j}"] = jax.tree.map(
                lambda *xs: jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype), *blocks)
        params = {**params, "image_encoder": encoder}
    return params


def measure(case: str) -> dict:
    import jax
    import optax

    from sammed3d_jax.training import optim

    params = params_of(case)
    factors = tuple((f"^{name}$", 1.0 + i / 1000) for i, name in enumerate(params)) if case.startswith(
        "factors:") else optim.OptimConfig.lr_multipliers
    tx = optim.make_optimizer(optim.OptimConfig(accum_steps=20, lr_multipliers=factors)).tx

    def update(grads, state, p):
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    t0 = time.perf_counter()
    lowered = jax.jit(update).lower(params, jax.eval_shape(tx.init, params), params)
    t1 = time.perf_counter()
    lowered.compile()
    leaves = jax.tree.leaves(params)
    return {"case": case, "leaves": len(leaves), "shapes": len({x.shape for x in leaves}),
            "lower_s": round(t1 - t0, 1), "compile_s": round(time.perf_counter() - t1, 1)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])), flush=True)
        return
    for case in sys.argv[1:] or CASES:  # A process per case: no case reuses another's compilations.
        proc = subprocess.run([sys.executable, __file__, "--one", case], capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        print(lines[-1] if lines else f"{case}: failed: {proc.stderr.strip()[-300:]}", flush=True)


if __name__ == "__main__":
    main()
