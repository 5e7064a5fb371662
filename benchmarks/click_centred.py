"""What a user of ``predict`` gets from one click at each target's deepest voxel, checked against ``eval.py``'s
click-centred protocol on the same cases.

    python train.py --workdir runs/demo_off
    python eval.py --checkpoint runs/demo_off --out runs/demo_off/eval_target
    python eval.py --checkpoint runs/demo_off --config.crop=first_click --out runs/demo_off/eval_click
    python benchmarks/click_centred.py --checkpoint runs/demo_off --cases 3 \
        --eval-csv runs/demo_off/eval_click/per_target.csv --target-csv runs/demo_off/eval_target/per_target.csv

For the first ``--cases`` cases of the dataset (default: the synthetic dataset the training run generated), each
target's deepest voxel is found here, independently of the evaluation code: scipy's Euclidean distance transform in
mm on the file's grid (the volume border counts as background), the first maximum in array order. Each target is
then segmented by ``predict.predict_mask`` (the CLI's own path: a ``Session`` whose first window is centred on the
click and grows where the mask reaches a face) from that single positive click, and scored with Dice against its
label. With ``--eval-csv`` the Dice after one click of the click-centred evaluation (``dice_1``) of the same targets
is compared: the largest difference must stay within ``--tolerance`` (exit status 1 otherwise). ``--target-csv``
adds the target-centred evaluation's ``dice_1`` of the same targets. Prints one row per target, then the mean per
target kind, and writes them as JSON with ``--json``.
"""

import argparse
import csv
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage


def deepest_voxel(mask: np.ndarray, spacing_mm) -> np.ndarray:
    """The voxel of ``mask`` farthest in mm from the background (outside the volume counts as background)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=tuple(float(s) for s in spacing_mm))
    return np.array(np.unravel_index(int(np.argmax(depth[1:-1, 1:-1, 1:-1])), mask.shape), np.float64)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def read_dice_1(path: str | None) -> dict[tuple[str, str], float]:
    """``(case, target) -> dice_1`` of an evaluation's ``per_target.csv`` (scored rows only)."""
    if not path:
        return {}
    with open(path, newline="") as f:
        return {(r["case"], r["target"]): float(r["dice_1"]) for r in csv.DictReader(f) if r.get("dice_1")}


def cases_of(data: str, n: int) -> tuple[list[tuple[str, str, str]], dict[int, str]]:
    """The first ``n`` ``(case, image, label)`` of an nnU-Net-layout dataset and its target names by label value."""
    with open(os.path.join(data, "dataset.json")) as f:
        meta = json.load(f)
    names = {int(v): k for k, v in meta["labels"].items() if int(v) != 0}
    labels = sorted(f for f in os.listdir(os.path.join(data, "labelsTr")) if f.endswith(".nii.gz"))[:n]
    out = []
    for name in labels:
        case = name[: -len(".nii.gz")]
        out.append((case, os.path.join(data, "imagesTr", f"{case}_0000.nii.gz"), os.path.join(data, "labelsTr", name)))
    return out, names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=os.path.join("runs", "default"), help="training workdir or params")
    parser.add_argument("--data", default="", help="nnU-Net-layout dataset (default: <checkpoint>/data/synthetic)")
    parser.add_argument("--cases", type=int, default=3, help="how many cases (the first ones by name)")
    parser.add_argument("--eval-csv", default="", help="per_target.csv of eval.py --config.crop=first_click")
    parser.add_argument("--target-csv", default="", help="per_target.csv of the target-centred eval.py")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest allowed |Dice - eval's dice_1|")
    parser.add_argument("--recentre", type=int, default=0, help="predict's --recentre (first window moved onto its "
                        "own prediction up to this many times)")
    parser.add_argument("--json", default="", help="write the rows and means here")
    args = parser.parse_args(argv)

    from sammed3d_jax import cli, predict
    from sammed3d_jax.data.nifti import read_image, read_label
    from sammed3d_jax.evaluation.checkpoints import load_checkpoint
    from sammed3d_jax.evaluation.objects import ObjectDecoder

    cli.quiet_library_logs()
    data = args.data or os.path.join(args.checkpoint, "data", "synthetic")
    cases, names = cases_of(data, args.cases)
    loaded = load_checkpoint(args.checkpoint)
    decoder = ObjectDecoder.from_model(loaded.variables, loaded.cfg, max_prompts=8)  # as the predict CLI builds it
    click_eval, target_eval = read_dice_1(args.eval_csv), read_dice_1(args.target_csv)
    rows = []
    print(f"{'case':<12} {'target':<10} {'deepest voxel':<16} {'windows':>7} {'predict':>8} {'eval click':>10} "
          f"{'eval target':>11}")
    for case, image_path, label_path in cases:
        image, geom = read_image(image_path, keep_integer=True)
        label, _ = read_label(label_path)
        for value in sorted(int(v) for v in np.unique(label) if v != 0):
            gt = label == value
            click = deepest_voxel(gt, geom.spacing_mm)
            t0 = time.perf_counter()
            result = predict.predict_mask(decoder, image, geom, click[None], np.array([True]), source=image_path,
                                          recentre=args.recentre)
            target = names.get(value, str(value))
            row = {"case": case, "target": target, "click": click.astype(int).tolist(),
                   "windows": len(result.windows), "dice_predict": dice(result.mask, gt),
                   "dice_eval_click": click_eval.get((case, target)), "dice_eval_target": target_eval.get((case, target)),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
            print(f"{case:<12} {target:<10} {str(row['click']):<16} {row['windows']:>7} {row['dice_predict']:>8.4f} "
                  f"{fmt(row['dice_eval_click']):>10} {fmt(row['dice_eval_target']):>11}", flush=True)
    means = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        sel = [r for r in rows if r["target"] == target]
        means[target] = {k: (float(np.mean([r[k] for r in sel])) if all(r[k] is not None for r in sel) else None)
                         for k in ("dice_predict", "dice_eval_click", "dice_eval_target")}
        means[target]["n"] = len(sel)
        m = means[target]
        ratio = (f"; predict / eval target = {m['dice_predict'] / m['dice_eval_target']:.2f}"
                 if m["dice_eval_target"] else "")
        print(f"mean {target:<10} n={len(sel)} predict {m['dice_predict']:.4f}" + ratio)
    status = 0
    compared = [abs(r["dice_predict"] - r["dice_eval_click"]) for r in rows if r["dice_eval_click"] is not None]
    if args.eval_csv:
        if len(compared) != len(rows):
            print(f"only {len(compared)} of {len(rows)} targets are in {args.eval_csv}")
            status = 1
        worst = max(compared, default=float("nan"))
        agree = bool(compared) and worst <= args.tolerance
        print(f"predict vs eval --config.crop=first_click (dice_1): largest difference {worst:.2g} over "
              f"{len(compared)} targets ({'agree' if agree else 'DISAGREE'} within {args.tolerance})")
        status = status or (0 if agree else 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "data": data, "rows": rows, "means": means}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
