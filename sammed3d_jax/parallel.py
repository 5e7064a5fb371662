"""Device mesh, batch sharding, parameter sharding rules and multi-host start-up.

Owns every sharding decision of training (big_vision style): the mesh comes from a config spec such as
``[("data", -1)]``, batches are sharded over all mesh axes on their leading dimension, and each parameter (or
optimizer-state leaf) gets a rule picked by the first regex of a ``[(regex, rule), ...]`` list that matches its
``/``-joined path: ``"replicate"`` or ``"fsdp"`` (shard the largest dimension divisible by the FSDP axis size,
replicate leaves that have none). Model code never shards anything. Must not import model/, data/ or
ml_collections.
"""

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

RULES = ("replicate", "fsdp")


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Joins a multi-process JAX cluster when the environment describes one.

    Must run before anything touches a JAX device.

    Args:
      mode: ``"auto"`` initialises when the environment names a cluster: ``JAX_COORDINATOR_ADDRESS`` together with
        ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (explicit), or a SLURM / Open MPI job of more than one task
        (auto-detected by ``jax.distributed``). ``"on"`` always calls ``jax.distributed.initialize()`` (e.g. TPU
        pods, whose environment JAX detects itself); ``"off"`` never does.

    Returns:
      True if this call initialised the distributed runtime.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or jax.distributed.is_initialized():
        return False
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        return True
    cluster = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if mode == "on" or cluster:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(spec: Sequence[tuple[str, int]] = (("data", -1),), devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a mesh from ``[(axis_name, size), ...]``; one size may be -1 (all remaining devices).

    Args:
      spec: axis names and sizes, outermost first.
      devices: devices to use (default: all global devices).

    Returns:
      The mesh, with devices laid out by ``jax.make_mesh`` when all global devices are used.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(str(name) for name, _ in spec)
    sizes = [int(size) for _, size in spec]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mesh spec {list(spec)} must name distinct axes")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh spec {list(spec)}: sizes must be positive, with at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh spec {list(spec)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    needed = int(np.prod(sizes))
    if needed < len(devices) and jax.process_count() == 1:
        devices = devices[:needed]  # An explicit smaller mesh (debugging, tests) uses the first devices.
    if needed != len(devices):
        raise ValueError(f"mesh spec {list(spec)} needs {needed} devices, {len(devices)} available")
    # Auto axes: the step is written for GSPMD propagation (jax.make_mesh would default to Explicit axes).
    auto = (AxisType.Auto,) * len(names)
    if len(devices) == jax.device_count():
        return jax.make_mesh(tuple(sizes), names, auto, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def path_str(path: tuple[Any, ...]) -> str:
    """``/``-joined names of a pytree key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], axis: str, axis_size: int) -> P:
    # Shard the largest dimension the axis divides (big_vision's fsdp rule); ties go to the earlier dimension.
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % axis_size == 0 and shape[i] >= axis_size:
            spec = [None] * len(shape)
            spec[i] = axis
            return P(*spec)
    return P()


def _compile_rules(rules: Sequence[tuple[str, str]], mesh: Mesh, fsdp_axis: str) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for pattern, rule in rules:
        if rule not in RULES:
            raise ValueError(f"sharding rule {rule!r} for {pattern!r} is not one of {RULES}")
        compiled.append((re.compile(pattern), rule))
    if any(rule == "fsdp" for _, rule in compiled) and fsdp_axis not in mesh.axis_names:
        raise ValueError(f"fsdp axis {fsdp_axis!r} is not a mesh axis {mesh.axis_names}")
    return compiled


def leaf_sharding(name: str, shape: tuple[int, ...], rules: Sequence[tuple[str, str]], mesh: Mesh,
                  fsdp_axis: str = "data") -> NamedSharding:
    """Sharding of one array named ``name`` (a ``/``-joined path) by the first rule whose regex searches it.

    Args:
      name: the leaf's path, e.g. ``"image_encoder/blocks_0/attn/qkv/kernel"``.
      shape: the leaf's shape.
      rules: ``[(regex, rule), ...]`` with rule ``"replicate"`` or ``"fsdp"``; no match is an error naming the leaf.
      mesh: the device mesh.
      fsdp_axis: mesh axis that ``"fsdp"`` shards over.

    Returns:
      The NamedSharding.
    """
    for regex, rule in _compile_rules(rules, mesh, fsdp_axis):
        if regex.search(name):
            if rule == "fsdp":
                return NamedSharding(mesh, _fsdp_spec(tuple(shape), fsdp_axis, mesh.shape[fsdp_axis]))
            return NamedSharding(mesh, P())
    raise ValueError(f"no sharding rule matches {name!r}; rules: {[p for p, _ in rules]}")


def infer_sharding(tree: Any, rules: Sequence[tuple[str, str]], mesh: Mesh, fsdp_axis: str = "data") -> Any:
    """Shardings for every leaf of a params-like pytree from regex rules (see :func:`leaf_sharding`).

    Args:
      tree: pytree of arrays or ``jax.ShapeDtypeStruct``; leaf names are their ``/``-joined paths.
      rules: ``[(regex, rule), ...]``.
      mesh: the device mesh.
      fsdp_axis: mesh axis that ``"fsdp"`` shards over.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``tree``.
    """
    _compile_rules(rules, mesh, fsdp_axis)  # Validate once, even for an empty tree.
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_sharding(path_str(path), np.shape(leaf), rules, mesh, fsdp_axis), tree)


def shard_host_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's slice of the global batch into globally sharded arrays.

    Each process passes its own rows (its data shard); the global batch is their concatenation in process order.

    Args:
      batch: pytree of host arrays whose leading dimension is the per-process batch.
      mesh: the device mesh.

    Returns:
      The same pytree of global ``jax.Array`` sharded by :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places host values that are identical on every process (e.g. PRNG keys) as replicated global arrays.

    ``jax.device_put`` refuses shardings that span other processes, so each leaf goes through
    ``make_array_from_process_local_data`` (typed PRNG keys via their raw ``key_data``).
    """
    sharding = replicated(mesh)

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(one, tree)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raises a clear error when the global batch cannot be split evenly over the mesh and processes."""
    if global_batch % mesh.size:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {mesh.size} devices of the mesh")
    if global_batch % jax.process_count():
        raise ValueError(f"global batch size {global_batch} is not divisible by {jax.process_count()} processes")
