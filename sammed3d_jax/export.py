"""``python -m sammed3d_jax.export CKPT_DIR OUT.safetensors [--overwrite]``

Writes the weights of a params directory (from ``sammed3d_jax.convert`` or training) as a ``.safetensors`` state
dict with upstream key names and PyTorch layouts, so the original PyTorch model can
``load_state_dict(safetensors.torch.load_file(OUT), strict=True)``. An existing OUT is replaced only with
``--overwrite``, and then only once the new file is complete; the file gets the user's normal permissions (umask).
Owns only the command line; the work is in ``sammed3d_jax.checkpoint``. Must not import training/evaluation.
"""

import argparse
import os
import sys

from etils import epath

from sammed3d_jax import cli
from sammed3d_jax.checkpoint.params_io import load_params
from sammed3d_jax.checkpoint.torch_convert import flax_to_torch


def export_safetensors(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Exports ``ckpt_dir`` to ``out_path`` (written beside it first, then moved into place); returns the tensor count.

    Raises:
        CheckpointError: ``ckpt_dir`` is not a readable params directory (naming it).
    """
    from safetensors.numpy import save

    variables, cfg, meta = load_params(ckpt_dir)
    state = flax_to_torch(variables, cfg)
    # "format": "pt" tells Hugging Face tooling these are PyTorch-layout weights.
    data = save(state, metadata={"format": "pt", "source": str(meta.get("source", ckpt_dir))})
    out = epath.Path(out_path)
    partial = out.parent / f".{out.name}.partial"
    try:
        partial.write_bytes(data)  # an ordinary open(): the umask decides the mode, as for any file the user writes
        partial.replace(out)
    finally:
        if partial.exists():
            partial.unlink()
    return len(state)


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    """Runs the export CLI; returns the process exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("ckpt_dir", help="params directory (from sammed3d_jax.convert or training)")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    cli.quiet_library_logs()
    if not args.out.endswith(".safetensors"):
        raise cli.UsageError(f"OUT {args.out}: the file name must end in .safetensors")
    if not epath.Path(args.ckpt_dir).exists():
        raise cli.UsageError(f"CKPT_DIR {args.ckpt_dir}: does not exist")
    cli.check_output_path(args.out, inputs=[args.ckpt_dir], overwrite=args.overwrite, name="OUT")
    n = export_safetensors(args.ckpt_dir, args.out)
    print(f"wrote {args.out}: {n} tensors with upstream names and PyTorch layouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
