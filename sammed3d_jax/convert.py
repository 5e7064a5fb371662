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

from etils import epath

from sammed3d_jax import cli
from sammed3d_jax.checkpoint.params_io import convert_file, is_params_dir, resolve_config, save_params
from sammed3d_jax.checkpoint.torch_convert import ConversionError
from sammed3d_jax.model.config import VARIANTS, ModelConfig


def resolve_model_config(spec: str | ModelConfig | None, flag: str = "--config") -> ModelConfig:
    """The model config a command-line ``flag`` names: a variant name, a config JSON file or a ModelConfig.

    Raises:
        cli.UsageError: naming ``flag`` and the value, for an unknown name, a missing file or a bad JSON.
    """
    if spec is None or isinstance(spec, ModelConfig) or str(spec) in VARIANTS:
        return resolve_config(spec)
    path = epath.Path(spec)
    if not path.exists():
        raise cli.UsageError(f"{flag} {spec}: neither a model variant ({', '.join(sorted(VARIANTS))}) nor a config "
                             "file (the file does not exist)")
    if not path.is_file():
        raise cli.UsageError(f"{flag} {spec}: is a folder, not a model variant or config file")
    try:
        return ModelConfig.from_json(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        text = cli.one_line(e)
        raise cli.UsageError(f"{flag} {spec}: not a valid model config JSON "
                             f"({text.removeprefix(f'{path}: ')})") from e


def conversion_message(source: str, err: ConversionError, flag: str = "--config", limit: int = 5) -> str:
    """One line for a checkpoint that does not fit the model config: the first ``limit`` problems and the flag to fix.

    Args:
        source: the checkpoint, named first.
        err: the conversion error with its problems.
        flag: the option that names the architecture in the calling command.
        limit: problems listed before "... and N more".
    """
    more = len(err.problems) - limit
    listed = "; ".join(err.problems[:limit]) + (f"; ... and {more} more" if more > 0 else "")
    head = err.header.split("; most entries disagree")[0]
    return (f"{source}: {head}: {listed}. If the checkpoint is another architecture, name it with {flag} "
            "(a variant name or a config.json)")


def check_out_dir(out_dir: str, source: str, overwrite: bool) -> epath.Path:
    """Refuses OUT_DIR before any work: an input, a file, a non-empty folder (``--overwrite`` replaces only an
    earlier conversion), or a folder that cannot be created."""
    out = cli.check_output_path(out_dir, inputs=[source], overwrite=overwrite, name="OUT_DIR", is_dir=True)
    if overwrite and out.exists() and any(out.iterdir()) and not is_params_dir(out):
        raise cli.UsageError(f"OUT_DIR {out} exists and is not an earlier conversion; --overwrite replaces only "
                             "those: choose a new folder")
    return out


@cli.guarded
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
    cli.quiet_library_logs()
    check_out_dir(args.out_dir, args.checkpoint, args.overwrite)
    cfg = resolve_model_config(args.config)
    if args.image_size is not None and (args.image_size <= 0 or args.image_size % cfg.vit_patch_size):
        raise cli.UsageError(f"--image-size {args.image_size}: not a positive multiple of the patch size "
                             f"{cfg.vit_patch_size}")
    try:
        # The name or file as given (not the resolved config): the point-embedding count then comes from the
        # checkpoint unless the config file states it.
        variables, cfg, meta = convert_file(args.checkpoint, args.config, args.image_size)
    except ConversionError as e:
        raise cli.UsageError(conversion_message(args.checkpoint, e)) from e
    written = save_params(args.out_dir, variables, cfg, {**meta, "created_by": "sammed3d_jax.convert"},
                          overwrite=args.overwrite)
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
