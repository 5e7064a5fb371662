"""Train-state checkpoints: an Orbax CheckpointManager under ``<workdir>/checkpoints`` (owner: training).

Each checkpoint step holds two items, saved and restored together (maxtext's layout):

* ``"state"``: the whole TrainState (step, params, buffers, optimizer state, skip counter), restored against an
  abstract target that carries the shardings, so every array comes back already placed on the mesh;
* ``"iter"``: the Grain iterator state (one JSON file per process, written by Grain's own Orbax handler), so a
  resumed run continues the data stream where it stopped.

Saves are asynchronous (``enable_async_checkpointing``), happen every ``save_every`` steps (plus any forced save, e.g.
at the end), and only the last ``keep`` are kept. The model config goes beside the checkpoints as
``<workdir>/model_config.json``. Initialising from a converted upstream checkpoint goes through H1's
:func:`sammed3d_jax.checkpoint.params_io.load_params`. Must not import data/ or ml_collections.
"""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sammed3d_jax.model.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "model_config.json"


def _grain_args():
    import grain.checkpoint as grain_ckpt  # Lazy: only runs that checkpoint a data iterator need Grain.

    return grain_ckpt.CheckpointSave, grain_ckpt.CheckpointRestore


def make_manager(workdir: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True,
                 with_iter: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager for ``<workdir>/checkpoints``.

    Args:
      workdir: the run directory (created if missing).
      save_every: save when ``step % save_every == 0`` (forced saves ignore this).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread; call ``manager.wait_until_finished()`` before exit.
      with_iter: the checkpoints also hold the data iterator item ``"iter"``.

    Returns:
      The manager (``close()`` it when done).
    """
    if save_every < 1 or keep < 1:
        raise ValueError(f"checkpoint save_every ({save_every}) and keep ({keep}) must be >= 1")
    directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)
    # Every `save_every` steps (and on a preemption notice); unlike Orbax's default there is no extra save at the
    # first step of a run.
    policies = ocp.checkpoint_managers
    policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                     policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    names = ("state", "iter") if with_iter else ("state",)
    return ocp.CheckpointManager(directory, options=options, item_names=names)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any = None, *, force: bool = False
         ) -> bool:
    """Starts saving ``state`` (and the iterator state) as checkpoint ``step``.

    Args:
      manager: from :func:`make_manager`.
      step: checkpoint step number (the train state's step).
      state: the TrainState (global, possibly sharded arrays).
      data_iter: a Grain ``DatasetIterator`` (anything with ``get_state``/``set_state``), or None.
      force: save even if ``step`` is not on the ``save_every`` schedule.

    Returns:
      Whether a save was started.
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["iter"] = _grain_args()[0](data_iter)
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest finished checkpoint step, or None."""
    return manager.latest_step()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """Pairs a ``jax.eval_shape`` tree with a sharding tree into ``ShapeDtypeStruct(..., sharding=...)`` leaves."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any = None, step: int | None = None
            ) -> Any:
    """Restores the TrainState (placed as ``abstract_state``'s shardings) and, if given, the iterator in place.

    Args:
      manager: from :func:`make_manager`.
      abstract_state: TrainState of ``jax.ShapeDtypeStruct`` with ``sharding`` set (see
        :func:`abstract_with_shardings`); its structure must match the saved one exactly.
      data_iter: the freshly built Grain iterator to rewind to the saved position, or None.
      step: the step to restore (default: latest).

    Returns:
      The restored TrainState.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to restore in {manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["iter"] = _grain_args()[1](data_iter)
    try:
        restored = manager.restore(int(step), args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ValueError(f"cannot restore checkpoint {step} from {manager.directory} into the current train state "
                         f"(did the model, optimizer or data config change?): {e}") from e
    return restored["state"]


def save_model_config(workdir: str | os.PathLike, cfg: ModelConfig) -> str:
    """Writes ``<workdir>/model_config.json`` (ModelConfig.to_dict); returns its path."""
    path = os.path.join(os.fspath(workdir), MODEL_CONFIG_FILE)
    os.makedirs(os.fspath(workdir), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    return path


def load_model_config(workdir: str | os.PathLike) -> ModelConfig:
    """Reads the ModelConfig saved beside a run's checkpoints."""
    path = os.path.join(os.fspath(workdir), MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no model config beside the checkpoints")
    return ModelConfig.from_json(path)


def check_compatible(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raises naming ``where`` when two configs differ in architecture (numerics fields may differ)."""
    a, b = saved.architecture(), wanted.architecture()
    diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    if diff:
        raise ValueError(f"{where}: model architecture differs from the config (saved vs wanted): {diff}")


def load_init_variables(directory: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
    """Model variables from a converted params directory (``python -m sammed3d_jax.convert``).

    Args:
      directory: a params checkpoint written by ``params_io.save_params``.
      cfg: the architecture being trained; it must match the checkpoint's (compute dtype and remat may differ).

    Returns:
      ``{"params": ..., "buffers": ...}`` as host/default-device arrays.
    """
    from sammed3d_jax.checkpoint.params_io import load_params  # Owned by H1; imported only when used.

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"init checkpoint directory {directory} does not exist")
    # Another input size is allowed: the position tables are resampled to cfg.image_size.
    variables, saved_cfg, _ = load_params(directory, image_size=cfg.image_size)
    check_compatible(saved_cfg, cfg, os.fspath(directory))
    return variables
