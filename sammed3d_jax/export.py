"""``python -m sammed3d_jax.export CKPT_DIR OUT.safetensors``

Writes the weights of a params directory (from ``sammed3d_jax.convert`` or training) as a ``.safetensors`` state
dict with upstream key names and PyTorch layouts, so the original PyTorch model can
``load_state_dict(safetensors.torch.load_file(OUT), strict=True)``. Owns only the command line; the work is in
``sammed3d_jax.checkpoint``. Must not import training/evaluation.
"""

import argparse
import os
import sys

from sammed3d_jax.checkpoint.params_io import load_params
from sammed3d_jax.checkpoint.pth_reader import CheckpointError
from sammed3d_jax.checkpoint.torch_convert import ConversionError, flax_to_torch


def export_safetensors(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Exports ``ckpt_dir`` to ``out_path``; returns the number of tensors written."""
    from safetensors.numpy import save_file

    variables, cfg, meta = load_params(ckpt_dir)
    state = flax_to_torch(variables, cfg)
    # "format": "pt" tells Hugging Face tooling these are PyTorch-layout weights.
    save_file(state, os.fspath(out_path), metadata={"format": "pt", "source": str(meta.get("source", ckpt_dir))})
    return len(state)


def main(argv: list[str] | None = None) -> int:
    """Runs the export CLI; returns the process exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("ckpt_dir", help="params directory (from sammed3d_jax.convert or training)")
    parser.add_argument("out", help="output .safetensors file")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: {args.out}: output must end in .safetensors", file=sys.stderr)
        return 2
    try:
        n = export_safetensors(args.ckpt_dir, args.out)
    except ConversionError as e:
        print(f"error: {args.ckpt_dir}: {e.summary()}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n} tensors with upstream names and PyTorch layouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
