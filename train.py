"""Train SAM-Med3D in JAX.  `python train.py` runs the embedded CPU demo (configs/default.py).

    python train.py --config configs/sammed3d.py --workdir runs/sammed3d --config.data.prepared_dir=PREPARED
    python train.py --workdir runs/sammed3d --resume          # continue a stopped run with its stored config
    python train.py --config.total_steps=100 --config.optim.lr=3e-4   # any config key can be overridden

Every mistake (a bad flag or config value, a misspelt --config. key, a workdir that already holds a run) ends with
one line on stderr and a non-zero status; a run stopped by SIGTERM/SIGINT saves a checkpoint first and says how to
resume. On --resume the run's stored config is used, with any --config. overrides on top (a recipe change needs
--allow_recipe_change); an explicit --config file replaces it. JAX's persistent compilation cache is on
(``--cache_dir``, default ``$SAMMED3D_JAX_CACHE`` or ``~/.cache/sammed3d_jax/jax``; ``--nocompilation_cache`` turns it
off), so a restarted run loads its compiled steps; on machines that are lost when pre-empted give a folder that
outlives them (``gs://...``; the cache is run as code, so use a folder only the job's owner can write).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sammed3d_jax import compile_cache

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("runs", "default"), "Run directory (local or gs://...).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the checkpoints in --workdir.")
_ALLOW_RECIPE_CHANGE = flags.DEFINE_bool("allow_recipe_change", False,
                                         "On --resume, accept changed model/optimizer/click/data settings.")
_CACHE = compile_cache.define_absl_flags()


def _valid_keys(argv) -> list[str]:
    from sammed3d_jax.training import run_config

    path = _DEFAULT_CONFIG
    for i, arg in enumerate(argv):  # The config file the command names, if any.
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    try:
        return run_config.flat_keys(config_flags.config_flags._LoadConfigModule("config", path.split(":")[0])
                                    .get_config(*path.split(":")[1:2]))
    except Exception:  # pylint: disable=broad-except  # Only for the hint; the error itself is reported anyway.
        return []


def _report_flag_error(err: BaseException, argv) -> None:
    """One line for a flag error (a misspelt --config. key lists the valid keys near it), then exit 2."""
    from sammed3d_jax import cli
    from sammed3d_jax.training import run_config

    valid = _valid_keys(argv)
    bad = next((a.split("=", 1)[0][len("--config."):] for a in argv[1:] if a.startswith("--config.") and
                a.split("=", 1)[0][len("--config."):] not in valid), None)
    if bad and valid:
        cli.fail(f"unknown config key --config.{bad}; valid keys near it: "
                 + ", ".join(f"--config.{k}" for k in run_config.near_keys(bad, valid)))
    cli.fail(f"bad command line: {' '.join(str(err).split())}")


def _parse_flags(argv):
    """absl's parsing with one-line errors."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # pylint: disable=broad-except  # absl and ml_collections raise many types here.
        _report_flag_error(err, argv)


try:  # ml_collections parses the default config and the --config. overrides as soon as the flag is defined.
    _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file (path[:arg]).",
                                              lock_config=True)
except Exception as _err:  # pylint: disable=broad-except
    _report_flag_error(_err, sys.argv)


def main(argv):
    from sammed3d_jax import cli

    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]} (options are --config, --config.KEY=VALUE, --workdir, --resume, "
                 "--[no]compilation_cache, --cache_dir)")
    cli.quiet_library_logs()
    cli.guarded(_train)()


def _train():
    import jax
    from ml_collections import config_flags as cf

    from sammed3d_jax import cli
    from sammed3d_jax.checkpoint.orbax_io import run_path
    from sammed3d_jax.training import preemption, run_record

    config = _CONFIG.value
    workdir = run_path(_WORKDIR.value)
    if _RESUME.value:
        stored = run_record.stored_config(workdir) if workdir.exists() else None
        if stored is not None and not flags.FLAGS["config"].present:
            # The run's own config, with this command's --config. overrides on top.
            config = run_record.with_overrides(stored, cf.get_override_values(flags.FLAGS["config"]))
        with config.unlocked():
            config.resume = True
    # CPU collectives between processes (multi-process CPU runs); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    cache_dir = compile_cache.from_absl(_CACHE)  # Before any compilation.
    from sammed3d_jax.training.loop import train_and_evaluate

    logging.info("workdir %s; compilation cache %s", workdir, cache_dir or "off")
    try:
        train_and_evaluate(config, str(workdir), allow_recipe_change=_ALLOW_RECIPE_CHANGE.value)
    except preemption.RunStopped as stopped:
        cli.fail(str(stopped), stopped.exit_status)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
