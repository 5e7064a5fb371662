"""PyTorch (MedIM, the upstream authors' package) vs this project, side by side, same weights, same process and device.

    pip install -e ".[compare]"                                          # torch + medim; never needed otherwise
    python benchmarks/compare_pytorch.py --device cpu --quick            # a few minutes on 2 CPU cores
    python benchmarks/compare_pytorch.py --device gpu --json out.json    # accelerator: batch 1/8, AMP, train b12

1. Weights: MedIM's ``SAM-Med3D`` (``vit_b_ori``) with PyTorch's seeded initialisation plus seeded noise on every
   tensor, so none is zero (upstream zero-initialises pos_embed, the rel-pos tables and the norm biases); saved with
   ``torch.save`` as ``{"model_state_dict": ...}`` like upstream's trainer, converted with ``python -m
   sammed3d_jax.convert`` and loaded from the params directory, as a user does with a released checkpoint.
2. Parity in float32 on the same inputs: image embeddings, low-res masks, IoU predictions and the upsampled masks,
   plus the per-click losses of an 11-click training interaction fed the same clicks (shared loop, both decoders);
   the fixture tolerances of ``sammed3d_jax.parity``; max abs errors printed; exit 1 if any is out of tolerance.
3. Timings of both frameworks, same device: the encoder and full inference (encode + one click + upsampling +
   threshold) per batch and precision (float32 both; our bf16 vs PyTorch AMP bf16 / fp16; ``torch.compile`` where it
   works), and upstream's training micro-batch (AdamW, 20-step accumulation, 1 and 11 clicks; PyTorch float16 AMP
   with GradScaler on accelerators as upstream, our bf16). Median time, samples/s, peak memory and the time ratio,
   as a Markdown table, then ``ratio torch/jax encode: N.NNx`` (float32, batch 1); ``--json`` writes everything.

Peak memory: on an accelerator PyTorch's allocator peak vs XLA's program size (arguments + outputs + temporaries);
on CPU, for both, the process's resident-set rise during the calls plus what was already resident (weights, inputs,
gradients, optimizer state). Strict float32 on both sides for fp32 rows (no TF32). Not a test; numbers go to
BENCHMARKS.md with the machine.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time

from sammed3d_jax import cli

MODELS = {
    # name: (medim.create_model keyword arguments, our ModelConfig keyword arguments); medim's defaults = vit_b_ori.
    "vit_b_ori": ({}, {}),
    # A small model MedIM can build (its decoder MLP and IoU head widths are fixed), for quick checks of the harness.
    "small": (dict(encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=[1, 3],
                   prompt_embed_dim=48, image_size=64, vit_patch_size=16),
              dict(encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3),
                   prompt_embed_dim=48, image_size=64, vit_patch_size=16)),
}


@dataclasses.dataclass(frozen=True)
class Mode:
    batches: tuple[int, ...]
    repeats: int
    torch_warmup: int  # in quick mode the parity run already warmed PyTorch's encoder and decoder
    variants: tuple[tuple[str, str], ...]  # (PyTorch, JAX) precisions of the encode/inference rows
    train_batch: int
    clicks: tuple[int, ...]
    train_steps: int
    train_warmup: int
    train_variant: tuple[str, str]
    parity_batch: int
    compile: bool
    remat_encoder: bool


MODES = {
    "cpu-quick": Mode((1,), 1, 0, (("fp32", "fp32"),), 1, (1,), 1, 0, ("fp32", "fp32"), 1, False, False),
    "cpu": Mode((1, 2), 3, 1, (("fp32", "fp32"), ("amp-bf16", "bf16")), 1, (1, 11), 2, 1, ("fp32", "fp32"), 2,
                False, False),
    "gpu": Mode((1, 8), 20, 3, (("fp32", "fp32"), ("amp-bf16", "bf16"), ("amp-fp16", "bf16")), 12, (1, 11), 5, 2,
                ("amp-fp16", "bf16"), 2, True, True),
}
PARITY_CLICKS = 11


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU: batch 1, float32, one timed call, train with 1 click")
    p.add_argument("--model", choices=sorted(MODELS), default="vit_b_ori")
    p.add_argument("--mode", choices=sorted(MODES),
                   help="settings of another mode, e.g. a CPU dry run of the gpu settings with --model small")
    p.add_argument("--parts", default="parity,encode,inference,train",
                   help="comma-separated subset of parity,encode,inference,train")
    p.add_argument("--batches", type=int, nargs="+", help="override the mode's inference batch sizes")
    p.add_argument("--repeats", type=int, help="override the mode's timed calls per row")
    p.add_argument("--train-batch", type=int, help="override the mode's training batch")
    p.add_argument("--clicks", type=int, nargs="+", help="override the mode's training click counts")
    p.add_argument("--train-steps", type=int, help="override the mode's timed training micro-batches")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd PyTorch inference (default: on for gpu)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch CPU threads (JAX uses every core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the .pth and the converted params here (default: a temporary folder)")
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"parity", "encode", "inference", "train"}
    if unknown:
        raise cli.UsageError(f"--parts: unknown {sorted(unknown)}")
    if args.quick and args.device != "cpu":
        raise cli.UsageError("--quick is the CPU mode; drop it with --device gpu")
    base = MODES[args.mode or ("cpu-quick" if args.quick else args.device)]
    mode = dataclasses.replace(
        base, batches=tuple(args.batches or base.batches), repeats=args.repeats or base.repeats,
        train_batch=args.train_batch or base.train_batch, clicks=tuple(args.clicks or base.clicks),
        train_steps=args.train_steps or base.train_steps,
        compile=base.compile if args.compile is None else args.compile)
    if min(mode.batches + (mode.train_batch, mode.repeats, mode.train_steps) + mode.clicks) < 1:
        raise cli.UsageError("batch sizes, repeats, steps and clicks must be >= 1")
    if args.json:
        cli.check_output_path(args.json, overwrite=args.overwrite, name="--json")
    return args, parts, mode


def _import_torch_side():
    try:
        import medim  # noqa: F401
        import torch_side
    except ImportError as e:
        raise cli.UsageError(f"the comparison needs the compare extra ({e.name} is missing): "
                             f"pip install -e \".[compare]\"") from e
    return torch_side


@cli.guarded
def main(argv=None) -> int:
    args, parts, mode = parse_args(argv)
    # Before jax is imported: the platform, and on a GPU no preallocation so both frameworks' allocators fit.
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cli.quiet_library_logs()
    ts = _import_torch_side()
    import torch

    import jax

    import compare_common as cc
    import compare_run
    import jax_side
    from sammed3d_jax.model import ModelConfig

    tdev = ts.setup(args.device, args.threads)
    if args.device == "gpu" and (not torch.cuda.is_available() or jax.devices()[0].platform != "gpu"):
        raise cli.UsageError(f"--device gpu: torch sees CUDA {torch.cuda.is_available()}, jax sees "
                             f"{jax.devices()[0].platform}; both need the GPU")
    medim_kwargs, cfg_kwargs = MODELS[args.model]
    machine = {
        "device": torch.cuda.get_device_name(tdev) if tdev.type == "cuda" else (platform.processor() or "cpu"),
        "jax_device": jax.devices()[0].device_kind, "torch": torch.__version__, "jax": jax.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "host": platform.node(),
        "load_average_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
    }
    print(f"device {machine['device']} / {machine['jax_device']}; torch {machine['torch']} "
          f"({machine['torch_threads']} threads), jax {machine['jax']}; {os.cpu_count()} CPUs, load average "
          f"{machine['load_average_start']:.1f}; model {args.model}; mode "
          f"{args.mode or ('cpu-quick' if args.quick else args.device)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="compare_pytorch_") as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        model = ts.create_model(medim_kwargs, args.seed)
        weights = cc.perturb_state_dict(ts.state_dict_numpy(model), args.seed)
        zeros = cc.zero_tensors(weights)
        if zeros:
            raise RuntimeError(f"perturbed weights still hold all-zero tensors: {zeros[:5]}")
        ts.load_numpy(model, weights)
        model = model.to(tdev).eval()
        pth = os.path.join(work, "medim_sam_med3d.pth")
        ts.save_checkpoint(weights, pth)
        config = "vit_b_ori"
        if cfg_kwargs:
            config = os.path.join(work, "config.json")
            with open(config, "w") as f:
                json.dump(ModelConfig(**cfg_kwargs).to_dict(), f)
        # A rerun with the same --workdir replaces its earlier conversion (the converter refuses any other folder).
        variables, cfg = jax_side.convert_checkpoint(pth, os.path.join(work, "converted"), config)
        variables = jax.device_put(variables, jax.devices()[0])
        del weights
        run = compare_run.Runner(ts, jax_side, model, tdev, variables, cfg, mode, args.seed)
        parity_rows, parity_ok = ([], True)
        if "parity" in parts:
            parity_rows, parity_ok = run.parity(PARITY_CLICKS)
        save = functools.partial(_save_json, args.json, machine, mode, args.model, parity_rows)
        rows = run.timings(parts, on_row=save if args.json else None)

    print("\n" + cc.format_table(rows))
    print(cc.ratio_line(rows), flush=True)
    if cc.cpu_ratio_line(rows):
        print(cc.cpu_ratio_line(rows), flush=True)
    failed = [f"{r.task} b{r.batch} {side}" for r in rows for side, m in (("PyTorch", r.torch), ("JAX", r.jax))
              if not m.ok and "compile" not in (r.torch_variant if side == "PyTorch" else r.jax_variant)]
    if args.json:
        save(rows, failed=failed, complete=True)
    if failed:
        print(f"FAILED measurements: {', '.join(failed)}")
    if not parity_ok:
        print("FAILED: parity out of tolerance")
    return 0 if parity_ok and not failed else 1


def _save_json(path, machine, mode, model, parity_rows, rows, failed=(), complete=False) -> None:
    """Writes everything measured so far (called after every timing row, so a time limit loses little)."""
    import compare_common as cc
    from etils import epath

    record = {"machine": {**machine, "load_average_now": os.getloadavg()[0]}, "mode": dataclasses.asdict(mode),
              "model": model, "complete": complete,
              "parity": [dict(name=r.name, shape=list(r.shape), max_abs_err=r.max_abs_err, rtol=r.rtol, atol=r.atol,
                              ok=r.ok) for r in parity_rows],
              "timings": cc.rows_to_json(rows), "ratio_torch_over_jax_encode": cc.encode_ratio(rows),
              "failed": list(failed)}
    epath.Path(path).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
