"""Run time of the CVPR 2025 challenge loop against its 90 s-per-class budget, on a synthetic challenge-sized case.

    python benchmarks/cvpr25_runtime.py --variant tiny --shape 48 96 96             # CPU smoke run
    python benchmarks/cvpr25_runtime.py --variant vit_b_ori --dtype bfloat16 --shape 200 512 512 --classes 5
    python benchmarks/cvpr25_runtime.py --checkpoint ckpt/turbo --shape 200 512 512 --json runtime.json

The case is a ``(z, y, x)`` volume at the given spacing (``x y z`` order, as the challenge stores it) with ``--classes``
ellipsoids of different brightness, boxes by the challenge's rule; the model has random weights unless a checkpoint
is given (scores are then meaningless, times are not). Prints the compile time (once, before the loop), the wall time
of each of the six predictions, their total against ``90 s x classes`` and the number of encodes per step. Runs on
whatever device JAX picks; the evaluation chain needs nibabel on that machine.
"""

import argparse
import json
import time

import numpy as np


def synthetic_case(shape_zyx, spacing_xyz, classes: int, seed: int = 0):
    """A challenge-style Case: textured body, ``classes`` ellipsoids (ids 1..K) of different brightness, boxes."""
    from sammed3d_jax.cvpr25 import boxes
    from sammed3d_jax.cvpr25.cases import Case

    rng = np.random.default_rng(seed)
    mm = np.asarray(spacing_xyz, float)[::-1]  # (z, y, x)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape_zyx, mm, strict=True)], indexing="ij"), -1)
    extent = np.asarray(shape_zyx) * mm
    imgs = 60.0 + 10.0 * rng.standard_normal(shape_zyx)
    gts = np.zeros(shape_zyx, np.uint8)
    for k in range(1, classes + 1):
        centre = extent * rng.uniform(0.3, 0.7, 3)
        radii = np.minimum(extent * 0.2, rng.uniform(15.0, 45.0, 3))
        inside = np.sum(((grid - centre) / radii) ** 2, -1) <= 1.0
        gts[inside] = k
        imgs[inside] += 25.0 * k
    imgs = np.clip(imgs, 1, 255).astype(np.uint8)
    case_boxes = tuple(boxes.challenge_box(gts == k, boxes.box_rng(seed, "bench", k)) for k in range(1, classes + 1)
                       if (gts == k).any())
    return Case("bench.npz", imgs, tuple(float(s) for s in spacing_xyz), gts, case_boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="tiny", help="model variant with random weights (default tiny)")
    parser.add_argument("--checkpoint", default="", help="a checkpoint instead of random weights")
    parser.add_argument("--dtype", default="", help="compute dtype override (e.g. bfloat16 on a GPU)")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96], metavar=("D", "H", "W"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], metavar=("X", "Y", "Z"))
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--json", default="", help="write the numbers here")
    args = parser.parse_args()

    import jax

    from sammed3d_jax.cvpr25.adapter import ChallengePredictor
    from sammed3d_jax.cvpr25.evaluate import evaluate_case
    from sammed3d_jax.cvpr25.metrics import SECONDS_PER_CLASS

    if args.checkpoint:
        from sammed3d_jax.evaluation.checkpoints import load_checkpoint

        loaded = load_checkpoint(args.checkpoint, None, args.dtype)
        variables, cfg = loaded.variables, loaded.cfg
    else:
        from sammed3d_jax.model import ModelConfig, init_variables

        cfg = ModelConfig.variant(args.variant)
        cfg = cfg.replace(dtype=args.dtype) if args.dtype else cfg
        variables = init_variables(cfg, jax.random.key(0))
    case = synthetic_case(tuple(args.shape), tuple(args.spacing), args.classes)
    predictor = ChallengePredictor.from_model(variables, cfg)
    compile_s = predictor.warmup()
    t0 = time.perf_counter()
    result = evaluate_case(predictor, case)
    loop_s = time.perf_counter() - t0
    row = result.row
    steps = [row[f"RunningTime_{i}"] for i in range(1, 7)]
    k = row["num_class"]
    print(f"device {jax.devices()[0].device_kind}; model {args.checkpoint or args.variant} "
          f"({cfg.image_size}^3 crop, dtype {cfg.dtype}); case {tuple(args.shape)} at {tuple(args.spacing)} mm "
          f"(x, y, z), {k} classes; box prompt: {predictor.box_prompt}")
    print(f"compile (once) {compile_s:.2f} s")
    print("step run time (s): " + " ".join(f"{t:.3f}" for t in steps))
    print(f"total {row['TotalRunningTime']:.2f} s = {row['TotalRunningTime'] / (SECONDS_PER_CLASS * k):.4f} of the "
          f"{SECONDS_PER_CLASS * k} s budget ({SECONDS_PER_CLASS} s x {k} classes); loop incl. clicks and scores "
          f"{loop_s:.2f} s")
    if result.notes:
        print("notes: " + "; ".join(result.notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "model": args.checkpoint or args.variant,
                       "dtype": cfg.dtype, "shape_zyx": args.shape, "spacing_xyz": args.spacing, "classes": k,
                       "compile_s": compile_s, "step_s": steps, "total_s": row["TotalRunningTime"],
                       "budget_s": SECONDS_PER_CLASS * k, "loop_s": loop_s}, f, indent=2)


if __name__ == "__main__":
    main()
