"""Evaluate a checkpoint with simulated clicks.  `python eval.py` evaluates the default training run (runs/default).

    python eval.py --checkpoint runs/default --data DATASET_DIR_OR_MANIFEST --out runs/default/eval
    python eval.py --checkpoint ckpt/turbo --data Dataset004_Hippocampus --config.click_mode=ritm --config.save_masks
    python eval.py --config sammed3d_jax/evaluation/config.py:paper      # paper-era protocol (ROI metrics)
"""

import logging as std_logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "sammed3d_jax", "evaluation", "config.py"), "Evaluation config (path[:arg]).",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", os.path.join("runs", "default"),
                                  "Training workdir, Orbax checkpoint dir, converted params dir or upstream file.")
_DATA = flags.DEFINE_list("data", [], "Dataset folders or manifest .json files (default: the training run's data).")
_OUT = flags.DEFINE_string("out", "", "Output folder (default: <checkpoint>/eval).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every file operation through absl at INFO (and jax its backend probing): keep the report only.
    for name in ("absl", "jax._src.xla_bridge"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    from sammed3d_jax.checkpoint.pth_reader import CheckpointError
    from sammed3d_jax.evaluation import runner

    config, checkpoint = _CONFIG.value, _CHECKPOINT.value
    if not os.path.exists(checkpoint):
        sys.exit(f"error: no checkpoint at {checkpoint}: run `python train.py` first (or pass --checkpoint DIR)")
    out = _OUT.value or os.path.join(checkpoint if os.path.isdir(checkpoint) else ".", "eval")
    try:
        runner.evaluate(config, checkpoint, _DATA.value or None, out)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
