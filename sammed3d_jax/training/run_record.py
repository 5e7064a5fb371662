"""The record of a run's configuration in its workdir, and what a resume may change.

A fresh run writes ``config.json`` once; it is never overwritten. Each resume appends one line to
``resumes.jsonl``: the step it resumed from, the topology, and every config field that differs from the run's
stored config (``config.json`` with the earlier resumes' changes applied). Run settings (steps, topology, logging,
checkpointing: ``run_config.RUN_KEYS``) may change freely; a change of the recipe (model, optimizer, clicks, loss,
data sampling, seed, batch) is refused unless the caller allows it, and is then recorded like the rest.
Must not import jax, data/ or the loop.
"""

import json
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath

from sammed3d_jax import tb_events
from sammed3d_jax.training import run_config

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"


def _plain(value: Any) -> Any:
    """JSON-normal form (tuples -> lists, ConfigDicts -> dicts) for comparisons."""
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, default=str))


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty sections kept as ``{}`` leaves)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def stored_config(workdir: epath.Path) -> dict[str, Any] | None:
    """The run's config as it stands: ``config.json`` plus the changes recorded by earlier resumes (None if none)."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for record in read_resumes(workdir):
        for key, (_, new) in record.get("changes", {}).items():
            _set(config, key, new)
    return config


def read_resumes(workdir: epath.Path) -> list[dict[str, Any]]:
    """The records of earlier resumes (oldest first)."""
    path = workdir / RESUMES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_config(tree: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A ConfigDict from a stored config (lists back to the tuples our configs use)."""
    return ml_collections.ConfigDict(_tuples(dict(tree)))


def with_overrides(stored: Mapping[str, Any], overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The stored config with command-line overrides (``{"optim.lr": 3e-4}``) applied on top."""
    tree = _tuples(_plain(dict(stored)))
    for key, value in overrides.items():
        _set(tree, key, _tuples(_plain(value)))
    return as_config(tree)


def changes(stored: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs between the stored config and ``config``: ``{key: (stored, new)}``."""
    old, new = flatten(_plain(dict(stored))), flatten(_plain(config))
    missing = object()
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing) and k != "resume"}


def check_changes(diff: Mapping[str, tuple[Any, Any]], workdir: epath.Path, allow_recipe_change: bool) -> None:
    """Refuses recipe changes unless allowed (one line listing them and the flag to pass)."""
    recipe = {k: v for k, v in diff.items() if not run_config.is_run_key(k)}
    if recipe and not allow_recipe_change:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in recipe.items())
        raise ValueError(f"resuming {workdir} would change its recipe ({listed}); pass --allow_recipe_change to "
                         "train on with it (recorded in resumes.jsonl), or drop those overrides")


def write_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json`` of a fresh run (an existing one is kept: it records how the run started)."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def record_resume(workdir: epath.Path, step: int, diff: Mapping[str, tuple[Any, Any]], topology: str) -> None:
    """Appends the resume's record to ``resumes.jsonl``."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step), "topology": topology,
              "changes": {k: list(v) for k, v in _plain(dict(diff)).items()}}
    out = tb_events.AppendableFile(workdir / RESUMES_FILE)
    out.append((json.dumps(record) + "\n").encode())
    out.flush()
