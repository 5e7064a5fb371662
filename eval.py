"""Evaluate a checkpoint with simulated clicks.  `python eval.py` evaluates the default training run (runs/default).

    python eval.py --checkpoint runs/default --data DATASET_DIR_OR_MANIFEST --out runs/default/eval
    python eval.py --checkpoint ckpt/turbo --data Dataset004_Hippocampus --config.click_mode=ritm --config.save_masks
    python eval.py --checkpoint sam_med3d.pth --config.model_config=vit_b_ori --data DATASET   # upstream file
    python eval.py --config sammed3d_jax/evaluation/config.py:paper      # paper-era script (ROI metrics)
    python eval.py --config.crop=first_click      # predict's windows from one click at each target's deepest voxel

JAX's persistent compilation cache is on (``--cache_dir``, default ``$SAMMED3D_JAX_CACHE`` or
``~/.cache/sammed3d_jax/jax``; ``--nocompilation_cache`` turns it off); compile and run time are reported apart.

Exit status: 0 when at least one target was scored, 1 when none was (every case failed or was skipped: see the
reasons printed and summary.json), 2 for bad input (one line naming the file or flag).
"""

import os

from absl import flags
from etils import epath
from ml_collections import config_flags

from sammed3d_jax import cli, compile_cache

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "sammed3d_jax", "evaluation", "config.py")
FLAGS = {}


def _define_flags() -> None:
    FLAGS["config"] = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Evaluation config (path[:arg]).",
                                                      lock_config=True)
    FLAGS["checkpoint"] = flags.DEFINE_string(
        "checkpoint", os.path.join("runs", "default"),
        "Training workdir, Orbax checkpoint dir, converted params dir or upstream file (.pth: also pass "
        "--config.model_config=VARIANT_OR_JSON unless it is vit_b_ori).")
    FLAGS["data"] = flags.DEFINE_list("data", [], "Dataset folders or manifest .json files (default: the training "
                                                  "run's data).")
    FLAGS["out"] = flags.DEFINE_string("out", "", "Output folder (default: <checkpoint>/eval; ./eval for a file).")
    FLAGS["cache"] = compile_cache.define_absl_flags()


def _default_config():
    from sammed3d_jax.evaluation.config import get_config

    return get_config()


def _check_paths(checkpoint: str, data: list[str], out: str) -> epath.Path:
    ckpt = epath.Path(checkpoint)
    if not ckpt.exists():
        raise cli.UsageError(f"--checkpoint {checkpoint}: does not exist; train a model first (`python train.py`), "
                             "convert one (`python -m sammed3d_jax.convert`) or pass --checkpoint PATH")
    for path in data:
        if not epath.Path(path).exists():
            raise cli.UsageError(f"--data {path}: does not exist")
    # Re-running an evaluation replaces its own report files, so an existing folder is fine; an input is not.
    return cli.check_output_path(out, inputs=[checkpoint, *data], overwrite=True, is_dir=True, name="--out")


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --checkpoint, --data, --out, "
                             "--config, --[no]compilation_cache, --cache_dir)")
    cli.quiet_library_logs()
    config, checkpoint, data = FLAGS["config"].value, FLAGS["checkpoint"].value, FLAGS["data"].value
    ckpt = epath.Path(checkpoint)
    out = FLAGS["out"].value or os.fspath((ckpt if ckpt.is_dir() else epath.Path(".")) / "eval")
    _check_paths(checkpoint, data, out)
    from sammed3d_jax.evaluation import runner

    cache_dir = compile_cache.from_absl(FLAGS["cache"])
    summary = runner.evaluate(config, checkpoint, data or None, out, cache_dir)
    if summary["counts"]["scored"] == 0:
        counts = summary["counts"]
        cli.fail(f"no target was scored ({counts['failed']} failed, {counts['skipped']} skipped; the reasons are "
                 f"above and in {os.path.join(out, 'summary.json')})", status=1)
    return 0


if __name__ == "__main__":
    cli.run_absl_app(main, _define_flags, default_config=_default_config,
                     validate=lambda: FLAGS["config"].value.to_dict())
