"""Resolves the ``--checkpoint`` of eval and predict to model variables plus the model config that travels with them.

Accepted, in this order of detection:

- a converted params directory (``python -m sammed3d_jax.convert``, or ``<workdir>/params`` exported at the end of a
  training run): ``params_io.load_params``, config from its ``sammed3d_jax.json``;
- a training workdir (``model_config.json`` and/or ``checkpoints/``): the latest finished Orbax step, params and
  buffers only (the optimizer state is not read), config from ``model_config.json``; a workdir without any step
  but with an exported ``params/`` uses that;
- an Orbax checkpoint directory: the manager directory (``<workdir>/checkpoints``: latest step), one step
  (``checkpoints/600``) or its ``state`` item; the config is the ``model_config.json`` found in the nearest parent;
- an upstream checkpoint file (``.pth``/``.pt``/``.npz``/``.safetensors``), converted on the fly (config from
  ``model_config``, default ``vit_b_ori``).

``model_config`` (variant name or JSON path) is only needed where no config travels with the checkpoint; where one
does, it must describe the same architecture. ``dtype`` overrides the compute dtype (e.g. float32 on CPU).

Imports the checkpoint modules (H1's params_io, training's orbax_io) and orbax; never data/, training code or configs.
"""

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.checkpoint.params_io import is_params_dir, load_params, load_variables, resolve_config
from sammed3d_jax.checkpoint.pth_reader import CheckpointError
from sammed3d_jax.checkpoint.torch_convert import abstract_variables, check_variables
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


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of an Orbax manager directory that hold a finished ``state`` item, ascending (temporary dirs skipped)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / STATE_ITEM).is_dir() and (p / STATE_ITEM / "_METADATA").exists())


def restore_state_variables(state_dir: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
    """Params and buffers of a saved TrainState item (Orbax partial restore; the optimizer state is not read).

    Raises:
        CheckpointError: naming ``state_dir`` when it cannot be read or does not match ``cfg``.
    """
    import jax
    import orbax.checkpoint as ocp

    target = abstract_variables(cfg)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32), target)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restored = checkpointer.restore(os.fspath(state_dir), args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # orbax/tensorstore raise many types; the user needs the directory named
        raise CheckpointError(f"{state_dir}: cannot restore params/buffers for the model config "
                              f"({type(e).__name__}: {e})") from e
    finally:
        checkpointer.close()
    variables = {k: jax.tree.map(lambda x: np.asarray(x, np.float32), restored[k]) for k in ("params", "buffers")}
    check_variables(variables, cfg)
    return variables


def _find_model_config(start: pathlib.Path, levels: int = 3) -> pathlib.Path | None:
    for folder in [start, *start.parents][: levels + 1]:
        candidate = folder / orbax_io.MODEL_CONFIG_FILE
        if candidate.is_file():
            return candidate
    return None


def _config_for(path: pathlib.Path, model_config) -> ModelConfig:
    found = _find_model_config(path)
    if found is None:
        if model_config in (None, ""):
            raise CheckpointError(f"{path}: no {orbax_io.MODEL_CONFIG_FILE} beside the checkpoint; name the "
                                  "architecture (model config: a variant name or a config JSON)")
        return resolve_config(model_config)
    cfg = ModelConfig.from_json(found)
    if model_config not in (None, ""):
        orbax_io.check_compatible(cfg, resolve_config(model_config), os.fspath(path))
    return cfg


def _from_manager_dir(manager_dir: pathlib.Path, cfg: ModelConfig, kind: str):
    steps = finished_steps(manager_dir)
    if not steps:
        return None
    step = steps[-1]
    state_dir = manager_dir / str(step) / STATE_ITEM
    return LoadedCheckpoint(restore_state_variables(state_dir, cfg), cfg, kind, os.fspath(state_dir), step)


def load_checkpoint(path: str | os.PathLike, model_config: ModelConfig | str | None = None,
                    dtype: str = "") -> LoadedCheckpoint:
    """Loads whatever ``path`` is (see the module docstring) into variables and a ModelConfig.

    Args:
        path: params dir, training workdir, Orbax manager/step/state dir, or an upstream checkpoint file.
        model_config: architecture where none travels with the checkpoint (variant name, JSON path, ModelConfig).
        dtype: compute dtype override ("" keeps the stored one).

    Returns:
        The loaded checkpoint.

    Raises:
        CheckpointError: naming ``path`` when it is missing, empty (e.g. a workdir before training) or unreadable.
    """
    p = pathlib.Path(path).absolute()
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint; {_TRAIN_FIRST}")
    if p.is_file():
        variables, cfg, _ = load_variables(p, model_config)
        loaded = LoadedCheckpoint(variables, cfg, "file", os.fspath(p))
    elif is_params_dir(p):
        variables, cfg, meta = load_params(p)
        if model_config not in (None, ""):
            orbax_io.check_compatible(cfg, resolve_config(model_config), os.fspath(p))
        loaded = LoadedCheckpoint(variables, cfg, "params", os.fspath(p), meta.get("step"))
    elif (p / orbax_io.CHECKPOINT_DIR).is_dir() or (p / orbax_io.MODEL_CONFIG_FILE).is_file():
        cfg = _config_for(p, model_config)
        loaded = _from_manager_dir(p / orbax_io.CHECKPOINT_DIR, cfg, "workdir")
        if loaded is None and is_params_dir(p / "params"):
            variables, cfg, meta = load_params(p / "params")
            loaded = LoadedCheckpoint(variables, cfg, "params", os.fspath(p / "params"), meta.get("step"))
        if loaded is None:
            raise CheckpointError(f"{p}: training workdir without any finished checkpoint; {_TRAIN_FIRST}")
    elif finished_steps(p):
        loaded = _from_manager_dir(p, _config_for(p, model_config), "orbax")
    elif (p / STATE_ITEM / "_METADATA").exists() or (p / "_METADATA").exists():
        state_dir = p / STATE_ITEM if (p / STATE_ITEM).is_dir() else p
        step_dir = state_dir.parent
        step = int(step_dir.name) if step_dir.name.isdigit() else None
        cfg = _config_for(state_dir, model_config)
        loaded = LoadedCheckpoint(restore_state_variables(state_dir, cfg), cfg, "orbax", os.fspath(state_dir), step)
    else:
        raise CheckpointError(f"{p}: neither a params directory, a training workdir nor an Orbax checkpoint; "
                              f"{_TRAIN_FIRST}")
    if dtype:
        loaded = dataclasses.replace(loaded, cfg=loaded.cfg.replace(dtype=dtype))
    return loaded
