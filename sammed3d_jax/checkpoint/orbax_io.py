"""Train-state checkpoints: an Orbax CheckpointManager under ``<workdir>/checkpoints`` (owner: training).

Each checkpoint step holds two items, saved and restored together (MaxText's layout, with our own data item):

* ``"state"``: the whole TrainState (step, params, buffers, optimizer state, skip counter), restored against an
  abstract target that carries the shardings, so every array comes back already placed on the mesh, whatever the
  mesh the checkpoint was written from;
* ``"data"``: the data position as one small JSON object written once by the primary process (next global batch,
  global batch size, the pipeline's fingerprint). It holds no process count or row assignment, so a run saved on
  256 chips resumes on 128 and continues the same global sample stream.

Paths go through ``etils.epath`` unchanged (``gs://bucket/run`` reaches Orbax as given; local relative paths are
made absolute). Saves are asynchronous and atomic: Orbax writes into a temporary folder and renames it when every
process has finished, and ``latest_step``/``all_steps`` never list an unfinished one, so a kill during a save leaves
the previous checkpoints as they were. Orbax keeps no checksums of array data (0.12), so each save records ours in
the data item (``checkpoint/checksum.py``) and :func:`restore` verifies them; :func:`restore_intact` also checks
restored states for finiteness and falls back to older checkpoints. Must not import data/ or ml_collections.
"""

import json
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from sammed3d_jax.checkpoint import checksum
from sammed3d_jax.model.config import ModelConfig

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_FILE = "model_config.json"
CHECKSUM_KEY = "state_checksums"  # In the data item: one [plain, mixed] pair per state leaf (checksum.py).


class DamagedCheckpoint(Exception):
    """A restored state does not match the checksums recorded when it was saved."""


def run_path(path: str | os.PathLike) -> epath.Path:
    """A user path as an ``epath.Path``: URLs (``gs://``, ``s3://``) unchanged, local paths made absolute."""
    text = os.fspath(path)
    return epath.Path(text) if "://" in text else epath.Path(text).expanduser().resolve()


def check_writable(directory: epath.Path) -> None:
    """Creates ``directory`` and writes and deletes a probe file there; raises OSError naming the path if it can't.

    Run before training, so an unwritable or full checkpoint folder fails at once instead of at the first save.
    """
    probe = directory / f".write-probe-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the checkpoint folder {directory}: {err.strerror or err}") from err


def make_manager(workdir: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True,
                 async_timeout_s: int = 600, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager for ``<workdir>/checkpoints`` (items ``"state"`` and ``"data"``).

    Args:
      workdir: the run directory.
      save_every: save when ``step % save_every == 0`` (forced saves ignore this).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread; call ``manager.wait_until_finished()`` before exit.
      async_timeout_s: how long processes wait for each other at the end of an async save.
      read_only: never write or delete (inspecting a run).

    Returns:
      The manager (``close()`` it when done).
    """
    if save_every < 1 or keep < 1:
        raise ValueError(f"checkpoint save_every ({save_every}) and keep ({keep}) must be >= 1")
    directory = run_path(workdir) / CHECKPOINT_DIR
    # Every `save_every` steps; unlike Orbax's default no extra save at a run's first step. Pre-emption saves are
    # forced by the loop, which agrees on the step across processes itself (training/preemption.py).
    policy = ocp.checkpoint_managers.FixedIntervalPolicy(save_every)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policy, max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, async_options=ocp.AsyncOptions(timeout_secs=int(async_timeout_s)))
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_position: dict[str, Any] | None = None, *,
         force: bool = False) -> bool:
    """Starts saving ``state`` (and the data position) as checkpoint ``step``.

    Args:
      manager: from :func:`make_manager`.
      step: checkpoint step number (the train state's step).
      state: the TrainState (global, possibly sharded arrays).
      data_position: JSON-able data position (``{"next_batch", "global_batch_size", "fingerprint"}``), or None.
      force: save even if ``step`` is not on the ``save_every`` schedule.

    Returns:
      Whether a save was started.

    Raises:
      OSError: naming the checkpoint folder, when writing fails (this save's start or an earlier async save).
    """
    data = {**(data_position or {}), CHECKSUM_KEY: checksum.tree_checksums(state)}
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data)}
    try:
        return manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as err:  # pylint: disable=broad-except  # Orbax re-raises background failures in many types.
        raise OSError(f"checkpoint {step} could not be written to {manager.directory}: {_reason(err)}") from err


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for pending async saves and closes the manager; raises OSError naming the folder if a save failed."""
    try:
        manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
        raise OSError(f"a checkpoint could not be written to {manager.directory}: {_reason(err)}") from err
    finally:
        manager.close()


def _reason(err: BaseException) -> str:
    while err.__cause__ is not None and not str(err).strip():
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest finished checkpoint step, or None."""
    return manager.latest_step()


def restore(manager: ocp.CheckpointManager, target: Any, step: int) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step``: the TrainState (placed as ``target``'s shardings) and the data position.

    Args:
      manager: from :func:`make_manager`.
      target: TrainState of ``jax.ShapeDtypeStruct`` with ``sharding`` set (``TrainSetup.restore_target()``); its
        structure must match the saved one exactly.
      step: the checkpoint step.

    Returns:
      ``(state, data_position)`` (an empty dict when the checkpoint has no data item).

    Raises:
      DamagedCheckpoint: the state's arrays differ from the checksums recorded at save (bytes changed on disk).
      ValueError: the checkpoint does not fit ``target``.
    """
    try:
        restored = manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot restore checkpoint {step} from {manager.directory} into the current train state "
                         f"(did the model or optimizer config change?): {_reason(err)}") from err
    state, data = restored["state"], dict(restored["data"] or {})
    expected = data.pop(CHECKSUM_KEY, None)
    if expected is not None:  # (Checkpoints written before checksums were recorded are not checked.)
        bad = checksum.mismatches(state, expected)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise DamagedCheckpoint(f"{len(bad)} of {len(expected)} arrays differ from the checksums written at "
                                    f"save ({shown})")
    return state, data


def restore_intact(manager: ocp.CheckpointManager, target: Any, is_intact: Callable[[Any], bool]
                   ) -> tuple[int, Any, dict[str, Any]]:
    """Restores the newest checkpoint that reads back and passes ``is_intact``, warning about each one skipped.

    Args:
      manager: from :func:`make_manager`.
      target: the restore target (see :func:`restore`).
      is_intact: e.g. "every array is finite"; called on each restored state.

    Returns:
      ``(step, state, data_position)``.

    Raises:
      ValueError: when no checkpoint is intact (each one's problem listed) or the config no longer fits them.
      FileNotFoundError: when there is no checkpoint at all.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint to resume from in {manager.directory}")
    problems = []
    for step in steps:
        try:
            state, data = restore(manager, target, step)
        except DamagedCheckpoint as err:
            problems.append(f"step {step}: damaged ({err})")
        except ValueError:
            if not problems:
                raise  # The newest checkpoint does not fit the config: a config change, not corruption.
            problems.append(f"step {step}: does not restore")
            continue
        except Exception as err:  # pylint: disable=broad-except  # Corrupt files fail in tensorstore, zarr, json...
            reason = _reason(err)
            problems.append(f"step {step}: unreadable ({reason if len(reason) < 300 else reason[:300] + ' ...'})")
        else:
            if is_intact(state):
                if problems:
                    aside = _set_aside(manager, [s for s in steps if s > step])
                    log.warning("skipped damaged checkpoints in %s (%s); moved them to %s; resuming from step %d",
                                manager.directory, "; ".join(problems), aside, step)
                return step, state, data
            problems.append(f"step {step}: holds non-finite values")
        log.warning("checkpoint %s", problems[-1])
    raise ValueError(f"no intact checkpoint in {manager.directory}: " + "; ".join(problems))


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> epath.Path:
    """Moves damaged checkpoints to ``<workdir>/checkpoints_damaged/`` (kept for inspection, out of the way of the
    steps the resumed run saves again); the primary process moves, every process waits for it."""
    import jax
    from sammed3d_jax import parallel  # pylint: disable=import-outside-toplevel

    target = epath.Path(manager.directory).parent / "checkpoints_damaged"
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            source, dest = epath.Path(manager.directory) / str(step), target / str(step)
            if dest.exists():
                dest.rmtree()
            source.rename(dest)
    if jax.process_count() > 1:
        parallel.barrier("damaged checkpoints set aside")
    manager.reload()
    return target


def save_model_config(workdir: str | os.PathLike, cfg: ModelConfig) -> epath.Path:
    """Writes ``<workdir>/model_config.json`` (ModelConfig.to_dict); returns its path."""
    path = run_path(workdir) / MODEL_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    return path


def load_model_config(workdir: str | os.PathLike) -> ModelConfig:
    """Reads the ModelConfig saved beside a run's checkpoints."""
    path = run_path(workdir) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model config beside the checkpoints")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {' '.join(str(err).split())}") from err


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
    from sammed3d_jax.checkpoint.params_io import load_params  # Imported only when fine-tuning.

    if not run_path(directory).is_dir():
        raise FileNotFoundError(f"init checkpoint directory {directory} does not exist "
                                "(--config.init_from; write one with python -m sammed3d_jax.convert)")
    # Another input size is allowed: the position tables are resampled to cfg.image_size.
    variables, saved_cfg, _ = load_params(directory, image_size=cfg.image_size)
    check_compatible(saved_cfg, cfg, os.fspath(directory))
    return variables
