"""Resolves the ``--checkpoint`` of eval and predict to model variables plus the model config that travels with them.

Accepted, in this order of detection:

- a converted params directory (``python -m sammed3d_jax.convert``, or ``<workdir>/params`` exported at the end of a
  training run): ``params_io.load_params``, config from its ``sammed3d_jax.json``;
- a training workdir (``model_config.json`` and/or ``checkpoints/``): the latest finished Orbax step, params and
  buffers only (the optimizer state is not read), config from ``model_config.json``; a workdir without any step
  but with an exported ``params/`` uses that;
- an Orbax checkpoint directory: the manager directory (``<workdir>/checkpoints``: latest step), one step
  (``checkpoints/600``) or its ``state`` item; the config is the ``model_config.json`` found in the nearest parent.
  Steps are found by Orbax's own ``CheckpointManager`` (``all_steps``, which skips unfinished saves), opened
  read-only, and restored through it (a partial restore of the ``state`` item's params and buffers);
- an upstream checkpoint file (``.pth``/``.pt``/``.npz``/``.safetensors``), converted on the fly (config from
  ``model_config``, default ``vit_b_ori``).

``model_config`` (variant name or JSON path) is only needed where no config travels with the checkpoint; where one
does, it must describe the same architecture. ``dtype`` overrides the compute dtype (e.g. float32 on CPU). Messages
name the calling command's flag for the model config (``config_flag``).

Imports the checkpoint modules (``params_io``, ``orbax_io``), the converter's command-line helpers and orbax; never
data/, training code or configs.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
from typing import Any

import numpy as np

from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.checkpoint.params_io import is_params_dir, load_params, load_variables
from sammed3d_jax.checkpoint.pth_reader import CheckpointError
from sammed3d_jax.checkpoint.torch_convert import ConversionError, abstract_variables, check_variables
from sammed3d_jax.convert import conversion_message, resolve_model_config
from sammed3d_jax.model.config import ModelConfig

STATE_ITEM = "state"
_TRAIN_FIRST = "train a model first (`python train.py`) or convert one (`python -m sammed3d_jax.convert IN OUT_DIR`)"


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """Variables ``{"params", "buffers"}`` (float32 numpy), their ModelConfig and where they came from.

    Attributes:
        variables: the model variables.
        cfg: the model config (compute dtype possibly overridden).
        kind: "params", "workdir", "orbax" or "file".
        path: the directory or file actually read.
        step: the training step, when known.
    """

    variables: dict[str, Any]
    cfg: ModelConfig
    kind: str
    path: str
    step: int | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for reports."""
        return {"kind": self.kind, "path": self.path, "step": self.step, "model_config": self.cfg.to_dict()}


@contextlib.contextmanager
def _read_only_manager(directory: pathlib.Path):
    """Orbax's CheckpointManager over ``directory``, read-only, for the ``state`` item; its notices kept quiet."""
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "read only" notices at WARNING: expected here, not worth a line
    try:
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                        item_names=(STATE_ITEM,))
    finally:
        absl_logger.setLevel(level)
    try:
        yield manager
    finally:
        manager.close()


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of an Orbax manager directory whose save finished, ascending (``CheckpointManager.all_steps``)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    with _read_only_manager(directory) as manager:
        return sorted(int(s) for s in manager.all_steps())


def _restore_args(cfg: ModelConfig):
    import jax
    import orbax.checkpoint as ocp

    target = abstract_variables(cfg)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32), target)
    return ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)


def _checked(restored: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    import jax

    variables = {k: jax.tree.map(lambda x: np.asarray(x, np.float32), restored[k]) for k in ("params", "buffers")}
    check_variables(variables, cfg)
    return variables


def restore_step_variables(manager_dir: str | os.PathLike, step: int, cfg: ModelConfig) -> dict[str, Any]:
    """Params and buffers of one step of a training run's checkpoints (the optimizer state is not read).

    Raises:
        CheckpointError: naming the step when it cannot be read or does not match ``cfg``.
    """
    import orbax.checkpoint as ocp

    where = pathlib.Path(manager_dir) / str(step)
    with _read_only_manager(pathlib.Path(manager_dir)) as manager:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: _restore_args(cfg)}))
        except Exception as e:  # orbax/tensorstore raise many types; the user needs the step named
            raise CheckpointError(f"{where}: cannot restore params/buffers for the model config "
                                  f"({type(e).__name__}: {_short(e)})") from e
    return _checked(restored[STATE_ITEM], cfg)


def _short(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (Orbax's can run to pages)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _find_model_config(start: pathlib.Path, levels: int = 3) -> pathlib.Path | None:
    for folder in [start, *start.parents][: levels + 1]:
        candidate = folder / orbax_io.MODEL_CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


def _config_for(path: pathlib.Path, model_config, flag: str) -> ModelConfig:
    found = _find_model_config(path)
    if found is None:
        if model_config in (None, ""):
            raise CheckpointError(f"{path}: no {orbax_io.MODEL_CONFIG_FILE} beside the checkpoint; name the "
                                  f"architecture with {flag} (a variant name or a config JSON)")
        return resolve_model_config(model_config, flag)
    cfg = ModelConfig.from_json(found)
    if model_config not in (None, ""):
        orbax_io.check_compatible(cfg, resolve_model_config(model_config, flag), os.fspath(path))
    return cfg


def _latest(manager_dir: pathlib.Path, cfg: ModelConfig, kind: str, step: int | None = None):
    """The given step (or the latest finished one) of a manager directory, or None when it has none."""
    if step is None:
        steps = finished_steps(manager_dir)
        if not steps:
            return None
        step = steps[-1]
    variables = restore_step_variables(manager_dir, step, cfg)
    return LoadedCheckpoint(variables, cfg, kind, os.fspath(manager_dir / str(step)), step)


def _as_step(p: pathlib.Path) -> tuple[pathlib.Path, int] | None:
    """(manager folder, step) when ``p`` is a finished step of a manager folder, or that step's state item."""
    step_dir = p.parent if p.name == STATE_ITEM else p
    if step_dir.name.isdigit() and int(step_dir.name) in finished_steps(step_dir.parent):
        return step_dir.parent, int(step_dir.name)
    return None


def _from_file(p: pathlib.Path, model_config, flag: str) -> LoadedCheckpoint:
    try:
        variables, cfg, _ = load_variables(p, resolve_model_config(model_config or None, flag))
    except ConversionError as e:
        raise CheckpointError(conversion_message(os.fspath(p), e, flag)) from e
    return LoadedCheckpoint(variables, cfg, "file", os.fspath(p))


def load_checkpoint(path: str | os.PathLike, model_config: ModelConfig | str | None = None,
                    dtype: str = "", *, config_flag: str = "--config") -> LoadedCheckpoint:
    """Loads whatever ``path`` is (see the module docstring) into variables and a ModelConfig.

    Args:
        path: params dir, training workdir, Orbax manager/step/state dir, or an upstream checkpoint file.
        model_config: architecture where none travels with the checkpoint (variant name, JSON path, ModelConfig).
        dtype: compute dtype override ("" keeps the stored one).
        config_flag: the calling command's option for ``model_config``, named in messages.

    Returns:
        The loaded checkpoint.

    Raises:
        CheckpointError: naming ``path`` when it is missing, empty (e.g. a workdir before training) or unreadable,
            or does not fit the model config (naming ``config_flag``).
    """
    p = pathlib.Path(path).absolute()
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint does not exist; {_TRAIN_FIRST}")
    if p.is_file():
        loaded = _from_file(p, model_config, config_flag)
    elif is_params_dir(p):
        variables, cfg, meta = load_params(p)
        if model_config not in (None, ""):
            orbax_io.check_compatible(cfg, resolve_model_config(model_config, config_flag), os.fspath(p))
        loaded = LoadedCheckpoint(variables, cfg, "params", os.fspath(p), meta.get("step"))
    elif (p / orbax_io.CHECKPOINT_DIR).is_dir() or (p / orbax_io.MODEL_CONFIG_FILE).is_file():
        cfg = _config_for(p, model_config, config_flag)
        loaded = _latest(p / orbax_io.CHECKPOINT_DIR, cfg, "workdir")
        if loaded is None and is_params_dir(p / "params"):
            variables, cfg, meta = load_params(p / "params")
            loaded = LoadedCheckpoint(variables, cfg, "params", os.fspath(p / "params"), meta.get("step"))
        if loaded is None:
            raise CheckpointError(f"{p}: training workdir without any finished checkpoint; {_TRAIN_FIRST}")
    elif finished_steps(p):
        loaded = _latest(p, _config_for(p, model_config, config_flag), "orbax")
    elif (step := _as_step(p)) is not None:
        manager_dir, number = step
        loaded = _latest(manager_dir, _config_for(p, model_config, config_flag), "orbax", number)
    else:
        raise CheckpointError(f"{p}: neither a params directory, a training workdir nor an Orbax checkpoint; "
                              f"{_TRAIN_FIRST}")
    if dtype:
        loaded = dataclasses.replace(loaded, cfg=loaded.cfg.replace(dtype=dtype))
    return loaded
