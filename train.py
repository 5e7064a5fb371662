"""Train SAM-Med3D in JAX.  `python train.py` runs the embedded CPU demo (configs/default.py).

    python train.py --config configs/sammed3d.py --workdir runs/sammed3d --config.data.prepared_dir=PREPARED
    python train.py --workdir runs/sammed3d --resume          # continue a killed run
    python train.py --config.total_steps=100 --config.optim.lr=3e-4   # any config key can be overridden
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from sammed3d_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"), "Training config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("runs", "default"), "Run directory (checkpoints, metrics).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the checkpoints in --workdir.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    cli.quiet_library_logs()  # Orbax's INFO line per file operation and jax's backend probing; ours stay.
    # Must join the cluster before anything touches a device.
    from sammed3d_jax import parallel

    parallel.maybe_initialize_distributed(config.distributed)
    from sammed3d_jax.training.loop import train_and_evaluate

    with config.unlocked():
        config.resume = config.resume or _RESUME.value
    logging.info("workdir %s", os.path.abspath(_WORKDIR.value))
    train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
