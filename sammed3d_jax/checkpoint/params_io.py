"""Converted-weights directories: an Orbax params checkpoint plus a JSON description beside it.

Layout of a params directory::

    <dir>/params/            Orbax (StandardCheckpointer) tree {"params": ..., "buffers": ...}, float32
    <dir>/sammed3d_jax.json  {"format", "model_config", "parameter_count", "buffer_element_count", "leaf_count",
                              "source", "source_sha256", "source_format", "source_key_count", ...}

The JSON is written last, so its presence marks a complete directory. Training and evaluation load weights only
through :func:`load_params` / :func:`load_variables`; they never read ``.pth`` files themselves.

Owns: ``save_params``, ``load_params``, ``load_variables``, ``convert_file``, ``resolve_config``,
``config_for_state_dict``, ``file_sha256``. Imports numpy, orbax and the checkpoint/model-config modules; must not
import torch, flax or the model modules.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from sammed3d_jax.checkpoint.pth_reader import CheckpointError, detect_format, read_state_dict
from sammed3d_jax.checkpoint.resize import resize_variables
from sammed3d_jax.checkpoint.torch_convert import (abstract_variables, check_variables, conversion_table,
                                                   count_parameters, point_embeddings_in, torch_to_flax)
from sammed3d_jax.model.config import VARIANTS, ModelConfig

FORMAT = "sammed3d_jax.params/v1"
METADATA_FILE = "sammed3d_jax.json"
PARAMS_SUBDIR = "params"


def resolve_config(spec: ModelConfig | str | os.PathLike | None) -> ModelConfig:
    """A ModelConfig from a variant name (``"vit_b_ori"``), a config JSON path, a ModelConfig, or None (vit_b_ori).

    Raises:
        ValueError: naming ``spec`` if it is neither a known variant nor a readable config file.
    """
    if spec is None:
        return ModelConfig.variant("vit_b_ori")
    if isinstance(spec, ModelConfig):
        return spec
    if str(spec) in VARIANTS:
        return ModelConfig.variant(str(spec))
    if epath.Path(spec).is_file():
        return ModelConfig.from_json(spec)
    raise ValueError(f"--config {spec!s}: neither a model variant ({', '.join(sorted(VARIANTS))}) nor a config file")


def states_point_embeddings(spec: ModelConfig | str | os.PathLike | None) -> bool:
    """Whether ``spec`` fixes ``num_point_embeddings`` itself: a config JSON that has the key does. A variant name,
    None or a ModelConfig (whose field always has a value, chosen or not) do not: conversion then takes the number
    from the state dict (2 or 4 ``point_embeddings``), which tells the two layouts apart without ambiguity."""
    if spec is None or isinstance(spec, ModelConfig) or str(spec) in VARIANTS:
        return False
    try:
        return "num_point_embeddings" in json.loads(epath.Path(spec).read_text())
    except (OSError, ValueError):
        return False


def config_for_state_dict(cfg: ModelConfig, state_dict: Mapping[str, Any], fixed: bool) -> ModelConfig:
    """``cfg`` with the state dict's number of point embeddings (2 released, 4 box-capable) unless ``fixed``.

    A fixed config that disagrees with the state dict is left alone: the strict conversion then lists the
    offending ``point_embeddings`` entries.
    """
    found = point_embeddings_in(state_dict)
    if not fixed and found in (2, 4) and found != cfg.num_point_embeddings:
        return cfg.replace(num_point_embeddings=found)
    return cfg


def _absolute(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (what Orbax wants); a URL-like path (``gs://...``) as it is."""
    p = epath.Path(path)
    return p if "://" in os.fspath(path) else epath.Path(os.path.abspath(os.fspath(path)))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_params_dir(directory: str | os.PathLike) -> bool:
    """True if ``directory`` looks like a converted params directory (has the JSON description)."""
    return (epath.Path(directory) / METADATA_FILE).is_file()


def _to_numpy_f32(variables):
    if isinstance(variables, Mapping):
        return {str(k): _to_numpy_f32(v) for k, v in variables.items()}
    return np.asarray(variables).astype(np.float32, copy=False)


def save_params(directory: str | os.PathLike, variables: Mapping[str, Any], cfg: ModelConfig,
                meta: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``variables`` as an Orbax params checkpoint plus ``sammed3d_jax.json``.

    Args:
        directory: the params directory; must not exist or be empty (or be a params directory with ``overwrite``).
        variables: ``{"params": ..., "buffers": ...}`` matching ``cfg`` exactly (checked first).
        cfg: the model configuration, stored in the JSON.
        meta: extra JSON-serialisable facts, e.g. ``source``, ``source_sha256``, ``source_key_count``.
        overwrite: replace an existing params directory (never any other non-empty directory).

    Returns:
        The metadata dict written to the JSON.

    Raises:
        ConversionError: the tree does not match ``cfg``. FileExistsError: the directory is in use.
    """
    import jax
    import orbax.checkpoint as ocp
    from sammed3d_jax import parallel  # pylint: disable=import-outside-toplevel

    check_variables(variables, cfg)
    # epath: a gs:// folder stays a URL. Several processes (a multi-host training export): every one passes the
    # same host arrays and joins Orbax's save; only the primary prepares the folder and writes the JSON.
    directory = _absolute(directory)
    primary = jax.process_index() == 0
    if primary and directory.exists() and any(directory.iterdir()):
        if not (overwrite and is_params_dir(directory)):
            raise FileExistsError(f"{directory}: exists and is not empty; choose a new directory"
                                  + ("" if overwrite else " (or overwrite an earlier conversion with --overwrite)"))
        directory.rmtree()
    if primary:
        directory.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:
        parallel.barrier("params directory ready")
    counts = count_parameters(variables)
    metadata = {
        "format": FORMAT,
        "model_config": cfg.to_dict(),
        "parameter_count": counts["parameters"],
        "buffer_element_count": counts["buffer_elements"],
        "leaf_count": counts["leaves"],
        **dict(meta or {}),
    }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_SUBDIR, _to_numpy_f32(variables))
    checkpointer.wait_until_finished()
    checkpointer.close()
    if primary:
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def load_params(directory: str | os.PathLike, image_size: int | None = None
                ) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    """Loads a params directory written by :func:`save_params` (e.g. by ``python -m sammed3d_jax.convert``).

    Args:
        directory: the params directory.
        image_size: load the weights into a model at this input size (position tables resampled, see
            ``checkpoint.resize``); None or the stored size loads them as stored.

    Returns:
        ``(variables, cfg, meta)``: variables ``{"params", "buffers"}`` of float32 numpy arrays, the model config
        (the stored one, at ``image_size`` if given), and the JSON metadata.

    Raises:
        CheckpointError: naming the directory if it is not a converted params directory or is damaged.
    """
    import orbax.checkpoint as ocp

    directory = _absolute(directory)
    hint = "create one with `python -m sammed3d_jax.convert CHECKPOINT OUT_DIR`"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such params directory; {hint}")
    if not is_params_dir(directory):
        raise CheckpointError(f"{directory}: not a converted sammed3d_jax params directory (no {METADATA_FILE}); {hint}")
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory / METADATA_FILE}: unreadable params description ({e})") from e
    if not (directory / PARAMS_SUBDIR).is_dir():
        raise CheckpointError(f"{directory}: the Orbax checkpoint {PARAMS_SUBDIR}/ is missing")
    checkpointer = ocp.StandardCheckpointer()
    try:
        variables = checkpointer.restore(directory / PARAMS_SUBDIR, abstract_variables(cfg))
    except Exception as e:  # orbax/tensorstore raise many types; the caller needs the directory named
        raise CheckpointError(f"{directory}: cannot restore {PARAMS_SUBDIR}/ ({type(e).__name__}: {e})") from e
    finally:
        checkpointer.close()
    variables = _to_numpy_f32(variables)
    check_variables(variables, cfg)
    if image_size is not None and image_size != cfg.image_size:
        variables, cfg = resize_variables(variables, cfg, image_size)
    return variables, cfg, meta


def convert_file(path: str | os.PathLike, config: ModelConfig | str | os.PathLike | None = None,
                 image_size: int | None = None) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    """Reads an upstream checkpoint file and converts it, strictly.

    Args:
        path: ``.pth``/``.pt``, ``.npz`` or ``.safetensors`` state dict (or trainer checkpoint).
        config: the architecture: variant name (default vit_b_ori), config JSON or ModelConfig. The number of point
            embeddings comes from the state dict unless ``config`` fixes it (see ``states_point_embeddings``).
        image_size: convert for a model at this input size (position tables resampled); None keeps the trained one.

    Returns:
        ``(variables, cfg, meta)``: float32 numpy variables, the model config they belong to, provenance facts.
    """
    state_dict = read_state_dict(path)
    cfg = config_for_state_dict(resolve_config(config), state_dict, states_point_embeddings(config))
    variables = torch_to_flax(state_dict, cfg)
    meta = {
        "source": epath.Path(path).name,
        "source_sha256": file_sha256(path),
        "source_format": detect_format(path),
        "source_key_count": len(state_dict),
    }
    if image_size is not None and image_size != cfg.image_size:
        meta["resized_from_image_size"] = cfg.image_size
        variables, cfg = resize_variables(variables, cfg, image_size)
    return variables, cfg, meta


def load_variables(source: str | os.PathLike, config: ModelConfig | str | os.PathLike | None = None,
                   image_size: int | None = None) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    """Variables from a converted params directory or directly from a ``.pth``/``.npz``/``.safetensors`` file.

    Args:
        source: a params directory (its stored config is used) or an upstream checkpoint file.
        config: for a file, the architecture (variant name, config JSON path or ModelConfig; default vit_b_ori; the
            number of point embeddings is read from the file unless the config fixes it). For a directory it is
            optional and must describe the same parameter layout as the stored config.
        image_size: load into a model at this input size (position tables resampled); None: as trained.

    Returns:
        ``(variables, cfg, meta)`` as :func:`load_params`.

    Raises:
        CheckpointError / ConversionError: naming the source; ValueError if ``config`` disagrees with a directory.
    """
    if epath.Path(source).is_dir():
        variables, cfg, meta = load_params(source)
        if config is not None:
            wanted = resolve_config(config)
            if not states_point_embeddings(config):
                wanted = wanted.replace(num_point_embeddings=cfg.num_point_embeddings)
            if conversion_table(wanted) != conversion_table(cfg):
                raise ValueError(f"{source}: stored model config has a different parameter layout than "
                                 f"--config {config}")
        if image_size is not None and image_size != cfg.image_size:
            variables, cfg = resize_variables(variables, cfg, image_size)
        return variables, cfg, meta
    return convert_file(source, config, image_size)
