"""``python -m sammed3d_jax.convert IN OUT_DIR [--config vit_b_ori|path/to/config.json] [--image-size N] [--overwrite]``

Converts an upstream SAM-Med3D checkpoint (a ``torch.save`` ``.pth``/``.pt`` file, e.g. ``sam_med3d_turbo.pth``, or an
``.npz``/``.safetensors`` state dict) into a params directory: an Orbax checkpoint plus ``sammed3d_jax.json``
(model config, source file name and SHA-256, key and parameter counts). Needs no PyTorch and runs no code from the
file. The number of point embeddings (2 released, 4 box-capable) is read from the file unless the config JSON states
``num_point_embeddings``; ``--image-size`` resamples the position tables for another input size. Owns only the
command line; the work is in ``sammed3d_jax.checkpoint``. Must not import training/evaluation.
"""

import argparse
import sys

from sammed3d_jax.checkpoint.params_io import convert_file, save_params
from sammed3d_jax.checkpoint.pth_reader import CheckpointError
from sammed3d_jax.checkpoint.torch_convert import ConversionError


def main(argv: list[str] | None = None) -> int:
    """Runs the converter CLI; returns the process exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="upstream .pth/.pt, .npz or .safetensors file")
    parser.add_argument("out_dir", help="params directory to create")
    parser.add_argument("--config", default="vit_b_ori",
                        help="model variant name or config JSON (default vit_b_ori, the released architecture)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="input side the converted model runs at (default: the trained one, 128 for vit_b_ori); "
                             "the absolute position table and the global blocks' rel-pos tables are resampled")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        variables, cfg, meta = convert_file(args.checkpoint, args.config, args.image_size)
        written = save_params(args.out_dir, variables, cfg, {**meta, "created_by": "sammed3d_jax.convert"},
                              overwrite=args.overwrite)
    except ConversionError as e:
        print(f"error: {args.checkpoint}: {e.summary()}", file=sys.stderr)
        return 2
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {written['source_key_count']} tensors from {written['source']} "
          f"({written['source_format']}, sha256 {written['source_sha256'][:16]}...)")
    resized = (f", position tables resampled {written['resized_from_image_size']}³ -> {cfg.image_size}³"
               if "resized_from_image_size" in written else "")
    print(f"wrote {args.out_dir}: {written['parameter_count']:,} parameters + "
          f"{written['buffer_element_count']:,} buffer elements in {written['leaf_count']} arrays "
          f"({cfg.num_point_embeddings} point embeddings{resized})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
