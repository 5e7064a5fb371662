"""Stage-by-stage numerical parity against a reference fixture made with the original PyTorch code.

    python -m sammed3d_jax.parity FIXTURE_DIR [--weights FILE] [--allow-unknown] [--scan-blocks]
                                  [--remat-policy NAME]

A fixture folder holds ``config.json`` (upstream builder vocabulary), weights (``checkpoint.pth`` preferred, else
``weights.npz`` or ``weights.safetensors``) and ``golden.npz`` with the inputs (``image``, ``point_coords``,
``point_labels``, ``mask_input``, and ``boxes`` for a box fixture) and reference arrays: encoder stages, prompt
embeddings and decoder outputs, and for box fixtures the ``*_pb`` (points + box), ``*_b`` (box only), ``*_b_nomask``
and ``*_p`` (points only) decoder calls. The model is built from the config, weights go through the checkpoint
converter, every stage present in the golden file is computed in float32 and compared; a table of array, shape, max
abs error and tolerance is printed and the exit status is non-zero when any array is out of tolerance (or, without
``--allow-unknown``, when the golden file holds an array we do not know). Geometry (image size, grid, depth, heads,
global blocks, IoU head, point embeddings, number of points, batch) comes from the files. ``--scan-blocks`` and
``--remat-policy`` run the encoder the way training may (a scan over block groups, rematerialisation): the numbers
must not change.
"""

import argparse
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.checkpoint.params_io import load_variables
from sammed3d_jax.model.attention import EncoderAttention
from sammed3d_jax.model.config import REMAT_POLICIES, ModelConfig
from sammed3d_jax.model.sam import Sam3D, upsample_logits

INPUTS = ("image", "point_coords", "point_labels", "mask_input", "boxes", "enc_first_global_block_index")
# Tolerances of the fixture README: 5–10x headroom over the float32-vs-float64 gap of the reference itself.
ENC_TOL = (1e-5, 5e-5)  # rtol, atol for encoder intermediates
TOL = (1e-5, 2e-5)
WEIGHT_FILES = ("checkpoint.pth", "weights.npz", "weights.safetensors")


@dataclasses.dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    rtol: float
    atol: float
    ok: bool


def _cf(x) -> np.ndarray:
    """Channels-last [b, x, y, z, c] -> the fixture's channels-first [b, c, x, y, z]."""
    return np.moveaxis(np.asarray(x), -1, 1)


def run_model(cfg: ModelConfig, variables, golden: dict[str, np.ndarray],
              attention_cls: type = EncoderAttention) -> dict[str, np.ndarray]:
    """Every stage the fixtures know, computed from the golden inputs, in the fixture's layouts.

    ``attention_cls`` swaps the encoder attention (tests build reference fixtures with the naive padded one).
    """
    model = Sam3D(cfg, attention_cls=attention_cls)
    image = jnp.asarray(np.moveaxis(golden["image"], 1, -1), jnp.float32)
    points = jnp.asarray(golden["point_coords"], jnp.float32)
    labels = jnp.asarray(golden["point_labels"], jnp.int32)
    mask = jnp.asarray(np.moveaxis(golden["mask_input"], 1, -1), jnp.float32)

    @jax.jit
    def encode(v, image):
        return model.apply(v, image, method=Sam3D.encode, mutable=["intermediates"])

    @jax.jit
    def decode(v, emb, mask_prompt):
        out = {}
        for multi in (False, True):
            (low, iou), inter = model.apply(v, emb, points, labels, mask_prompt, multi, method=Sam3D.decode,
                                            mutable=["intermediates"])
            out[multi] = (low, iou, inter["intermediates"])
        return out

    emb, inter = encode(variables, image)
    enc = inter["intermediates"]["image_encoder"]
    res = {"image_embeddings": _cf(emb), "enc_patch_embed_pos": np.asarray(enc["enc_patch_embed_pos"][0])}
    for key, value in enc.items():
        if m := re.fullmatch(r"enc_block(\d+)_out", key):
            res[f"enc_block{m.group(1)}_out"] = np.asarray(value[0])
    first_global = min(cfg.encoder_global_attn_indexes, default=None)
    if first_global is not None:
        res["enc_first_global_block_out"] = res[f"enc_block{first_global}_out"]
    res["dense_pe"] = _cf(jax.jit(lambda v: model.apply(v, method=Sam3D.dense_pe))(variables))
    if "boxes" in golden:
        res.update(_box_calls(model, variables, emb, golden, points, labels, mask))
    for prompt, suffix in ((mask, ""), (None, "_nomask")):
        out = decode(variables, emb, prompt)
        for multi, tag in ((False, "single"), (True, "multi")):
            low, iou, dec = out[multi]
            res[f"low_res_masks_{tag}{suffix}"] = _cf(low)
            res[f"iou_predictions_{tag}{suffix}"] = np.asarray(iou)
        dec = out[False][2]
        res["dense_embeddings" + ("_mask" if prompt is not None else "_nomask")] = _cf(dec["dense_embeddings"][0])
        if prompt is not None:
            res["sparse_embeddings"] = np.asarray(dec["sparse_embeddings"][0])
            md = dec["mask_decoder"]
            res["dec_transformer_queries"] = np.asarray(md["dec_transformer_queries"][0])
            res["dec_transformer_keys"] = np.asarray(md["dec_transformer_keys"][0])
            res["dec_upscaled_embedding"] = _cf(md["dec_upscaled_embedding"][0])
            res["masks_upsampled_single"] = _cf(upsample_logits(out[False][0], cfg.image_size))
    return res


def _present_tokens(sparse, valid) -> np.ndarray:
    """The valid sparse tokens of each row, in order: [b, t_valid, C] (rows of a fixture have equal counts)."""
    sparse, valid = np.asarray(sparse), np.asarray(valid)
    return sparse[valid].reshape(sparse.shape[0], -1, sparse.shape[-1])


def _box_calls(model, variables, emb, golden, points, labels, mask) -> dict[str, np.ndarray]:
    """The box fixture's decoder calls: points + box, box only (with and without the mask prompt), points only."""
    boxes = jnp.asarray(golden["boxes"], jnp.float32)

    @functools.partial(jax.jit, static_argnames=("use_points", "use_box", "use_mask"))
    def call(v, use_points, use_box, use_mask):
        (low, iou), inter = model.apply(
            v, emb, points if use_points else None, labels if use_points else None, mask if use_mask else None,
            boxes=boxes if use_box else None, method=Sam3D.decode, mutable=["intermediates"])
        inter = inter["intermediates"]
        return low, iou, inter["sparse_embeddings"][0], inter["sparse_valid"][0]

    res = {}
    for suffix, flags in (("pb", (True, True, True)), ("b", (False, True, True)), ("b_nomask", (False, True, False)),
                          ("p", (True, False, True))):
        low, iou, sparse, valid = call(variables, *flags)
        res[f"sparse_embeddings_{suffix}"] = _present_tokens(sparse, valid)
        res[f"low_res_masks_{suffix}"] = _cf(low)
        res[f"iou_{suffix}"] = np.asarray(iou)
    return res


def compare(computed: dict[str, np.ndarray], golden: dict[str, np.ndarray]) -> tuple[list[Row], list[str]]:
    """Rows for every golden output array we computed; plus the names of golden arrays we do not know."""
    rows, unknown = [], []
    for name, ref in golden.items():
        if name in INPUTS:
            continue
        if name not in computed:
            unknown.append(name)
            continue
        got = computed[name]
        rtol, atol = ENC_TOL if name.startswith("enc_") else TOL
        if got.shape != ref.shape:
            rows.append(Row(name, tuple(ref.shape), float("inf"), rtol, atol, False))
            continue
        err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
        ok = bool(np.allclose(got, ref, rtol=rtol, atol=atol))
        rows.append(Row(name, tuple(ref.shape), err, rtol, atol, ok))
    return rows, unknown


def _find_weights(fixture_dir: str) -> str:
    for name in WEIGHT_FILES:
        path = os.path.join(fixture_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{fixture_dir}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def check_fixture(fixture_dir: str, weights: str | None = None, **execution) -> tuple[list[Row], list[str]]:
    """Loads a fixture folder, runs the model through the converter-loaded weights, compares every stage.

    ``execution`` overrides execution fields of the model config (``scan_encoder_blocks``, ``remat_policy``, ...).
    """
    cfg = ModelConfig.from_json(os.path.join(fixture_dir, "config.json"))
    golden_path = os.path.join(fixture_dir, "golden.npz")
    if not os.path.exists(golden_path):
        raise FileNotFoundError(f"{golden_path}: missing")
    with np.load(golden_path) as f:
        golden = {k: f[k] for k in f.files}
    missing = [k for k in INPUTS[:4] if k not in golden]
    if missing:
        raise ValueError(f"{golden_path}: missing input arrays {missing}")
    variables, cfg, _ = load_variables(weights or _find_weights(fixture_dir), cfg)
    cfg = cfg.replace(attention_impl="xla", **execution)
    variables = jax.device_put(variables)
    with jax.default_matmul_precision("float32"):
        computed = run_model(cfg, variables, golden)
    return compare(computed, golden)


def format_table(rows: list[Row], unknown: list[str]) -> str:
    lines = [f"{'array':32s} {'shape':22s} {'max abs err':>12s} {'rtol':>8s} {'atol':>8s}  status"]
    for r in rows:
        lines.append(f"{r.name:32s} {str(r.shape):22s} {r.max_abs_err:12.3e} {r.rtol:8.0e} {r.atol:8.0e}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    for name in unknown:
        lines.append(f"{name:32s} {'':22s} {'':>12s} {'':>8s} {'':>8s}  unknown (not compared)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, print_fn: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", help="folder with config.json, golden.npz and checkpoint.pth/weights.npz")
    parser.add_argument("--weights", help="weights file to use instead of the fixture's own")
    parser.add_argument("--allow-unknown", action="store_true", help="do not fail on golden arrays we do not know")
    parser.add_argument("--scan-blocks", action="store_true", help="run the encoder as a scan over block groups")
    parser.add_argument("--remat-policy", default="none", choices=REMAT_POLICIES,
                        help="encoder rematerialisation policy (forward values must not change)")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "float32")
    try:
        rows, unknown = check_fixture(args.fixture_dir, args.weights, scan_encoder_blocks=args.scan_blocks,
                                      remat_policy=args.remat_policy)
    except (OSError, ValueError) as e:
        print_fn(f"error: {e}")
        return 2
    print_fn(format_table(rows, unknown))
    failed = [r.name for r in rows if not r.ok]
    if failed or (unknown and not args.allow_unknown):
        print_fn(f"FAILED: {len(failed)} of {len(rows)} arrays out of tolerance"
                 + (f"; {len(unknown)} unknown arrays" if unknown and not args.allow_unknown else ""))
        return 1
    print_fn(f"all {len(rows)} arrays within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
