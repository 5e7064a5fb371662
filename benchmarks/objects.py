"""Several objects per encode: one session with every target of a case vs one session per target.

    python benchmarks/objects.py                   # vit_b_ori, random weights, synthetic cases (CPU: ~2 minutes)
    python benchmarks/objects.py --variant small   # quick

Each case of the synthetic dataset holds three targets (ellipsoid, tube, blob). Two layouts: "targets", one positive
click at each target's deepest voxel (the targets lie apart: a window each); "near", three objects clicked within a
few voxels of the ellipsoid's deepest voxel (structures that share a window, as neighbouring organs do). Both sides
use the same session code (``sammed3d_jax/session.py``), windows on the shared lattice (``windows="grid"``), no
growth:

- together: one session, the three objects computed in one call (windows shared by objects are encoded once, the
  decodes of all objects batched);
- apart: a fresh session per target (what a one-object tool does: an encode per object).

Prints encodes and wall time per case for both, after a warm-up case that compiles everything, and the masks'
agreement (the batched decode must give the same masks). Random weights: the timing does not depend on them.
"""

import argparse
import time

import jax
import numpy as np
from scipy import ndimage

from sammed3d_jax.checkpoint.torch_convert import abstract_variables
from sammed3d_jax.data.nifti import read_image
from sammed3d_jax.data.synthetic import make_synthetic_dataset
from sammed3d_jax.evaluation.objects import ObjectDecoder
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.session import Session


def deepest_voxel(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel of ``mask`` farthest from its boundary (ties: the first in C order)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), mask.shape))


def run_case(decoder, image, affine, clicks, together: bool) -> tuple[int, float, list[np.ndarray]]:
    """(encodes, seconds, masks) for one case."""
    t0 = time.perf_counter()
    sessions, masks, encodes = [], [], 0
    groups = [clicks] if together else [[c] for c in clicks]
    for group in groups:
        session = Session(decoder, windows="grid", grow=False)
        session.open(image, affine)
        ids = []
        for click in group:
            ids.append(session.add_object())
            session.add_point(ids[-1], click)
        session.compute(ids)
        masks += [session.mask(i) for i in ids]
        encodes += session.encodes
        sessions.append(session)
    return encodes, time.perf_counter() - t0, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit_b_ori")
    parser.add_argument("--cases", type=int, default=3, help="timed cases (after one warm-up case)")
    parser.add_argument("--workdir", default="/tmp/sammed3d_objects_bench")
    args = parser.parse_args()

    cfg = ModelConfig.variant(args.variant)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: (0.05 * rng.normal(size=x.shape)).astype(np.float32), abstract_variables(cfg))
    decoder = ObjectDecoder.from_model(variables, cfg)
    root = make_synthetic_dataset(f"{args.workdir}/data", args.cases + 1, seed=0)
    rows = []
    for k, image_path in enumerate(sorted((root / "imagesTr").glob("*.nii.gz"))):
        image, geom = read_image(image_path)
        label, _ = read_image(root / "labelsTr" / image_path.name.replace("_0000", ""))
        targets = [deepest_voxel(label == v) for v in np.unique(label) if v > 0]
        c = np.asarray(targets[0])
        layouts = {"targets": targets, "near": [tuple(int(x) for x in c + d) for d in ((0, 0, 0), (4, 0, 0), (0, 4, 0))]}
        for layout, clicks in layouts.items():
            together = run_case(decoder, image, geom.affine, clicks, True)
            apart = run_case(decoder, image, geom.affine, clicks, False)
            same = all(np.array_equal(a, b) for a, b in zip(together[2], apart[2], strict=True))
            note = "  (warm-up: compiles)" if k == 0 else ""
            print(f"case {k} {layout}: {len(clicks)} objects; together {together[0]} encodes {together[1]:.2f} s; "
                  f"apart {apart[0]} encodes {apart[1]:.2f} s; same masks: {same}{note}")
            if k > 0:
                rows.append((layout, together[0], together[1], apart[0], apart[1], same))
    print(f"{jax.devices()[0].device_kind}, {args.variant}, per case (mean over {args.cases} cases):")
    for layout in ("targets", "near"):
        r = [x for x in rows if x[0] == layout]
        t, a = np.mean([x[2] for x in r]), np.mean([x[4] for x in r])
        print(f"  {layout}: together {np.mean([x[1] for x in r]):.1f} encodes {t:.2f} s, apart "
              f"{np.mean([x[3] for x in r]):.1f} encodes {a:.2f} s; time saved {1 - t / a:.0%} ({a / t:.2f}x); "
              f"masks identical: {all(x[5] for x in r)}")


if __name__ == "__main__":
    main()
