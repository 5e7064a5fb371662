"""Device mesh (ICI and optional DCN axes), batch sharding, the rows each process feeds, parameter sharding rules.

Owns every sharding decision of training (big_vision style): the mesh comes from a config spec such as
``[("data", -1)]`` (plus a DCN spec on multi-slice or multi-node jobs), batches are sharded over all mesh axes on their leading dimension, and each parameter (or
optimizer-state leaf) gets a rule picked by the first regex of a ``[(regex, rule), ...]`` list that matches its
``/``-joined path: ``"replicate"`` or ``"fsdp"`` (shard the largest dimension divisible by the FSDP axis size,
replicate leaves that have none). Model code never shards anything. Must not import model/, data/ or
ml_collections.
"""

import itertools
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

RULES = ("replicate", "fsdp")


_BARRIER_IDS = itertools.count()


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Every process waits here until all have arrived (nothing to do with one process).

    The coordination service's barrier, not a device collective: processes may arrive minutes apart (one still
    compiling, the primary still writing files), where a collective on CPU (gloo) gives up after 30 s. Every process
    must pass the same barriers in the same order (ids are numbered per process).
    """
    if jax.process_count() == 1:
        return
    barrier_id = f"sammed3d_jax/{next(_BARRIER_IDS)}/{name}"
    coordination_client().wait_at_barrier(barrier_id, int(timeout_s * 1000))


def coordination_client() -> Any:
    """The client of ``jax.distributed.initialize()``'s coordination service (barriers and a key-value store shared
    by the processes); JAX exposes it only through a private module, so it is reached here and nowhere else."""
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    return distributed.global_state.client


def _resolve(spec: Sequence[tuple[str, int]], n: int, what: str) -> tuple[tuple[str, ...], list[int]]:
    names = tuple(str(name) for name, _ in spec)
    sizes = [int(size) for _, size in spec]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"{what} {list(spec)} must name distinct axes")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what} {list(spec)}: sizes must be positive, with at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{what} {list(spec)} does not divide {n}")
        sizes[sizes.index(-1)] = n // known
    return names, sizes


def granules(devices: Sequence[Any], granule: str = "auto") -> tuple[str, int]:
    """The unit of the slow (DCN) network and how many there are among ``devices``.

    Args:
      devices: the devices.
      granule: ``"slice"`` (TPU multi-slice: ``device.slice_index``), ``"process"`` (one host or process per
        unit: GPU nodes, CPU tests) or ``"auto"`` (slices when every device has a ``slice_index``).

    Returns:
      ``(attribute, count)``: ``"slice_index"`` or ``"process_index"`` and the number of distinct values.
    """
    if granule not in ("auto", "slice", "process"):
        raise ValueError(f"config.sharding.dcn_granule must be 'auto', 'slice' or 'process', got {granule!r}")
    if granule == "auto":
        granule = "slice" if all(getattr(d, "slice_index", None) is not None for d in devices) else "process"
    attr = f"{granule}_index"
    return attr, len({getattr(d, attr) for d in devices})


def make_mesh(spec: Sequence[tuple[str, int]] = (("data", -1),), devices: Sequence[Any] | None = None, *,
              dcn_spec: Sequence[tuple[str, int]] = (), granule: str = "auto") -> Mesh:
    """Builds a mesh from ``[(axis_name, size), ...]``; one size may be -1 (all remaining devices).

    With ``dcn_spec`` the mesh is hybrid (MaxText's ``ici_*`` / ``dcn_*`` parallelism): ``spec`` lays out the
    devices of one granule (a TPU slice, or a process), ``dcn_spec`` how the granules tile each axis (axes it does
    not name get 1), and every mesh axis has size ``ici * dcn``. The batch is split over all axes, so a
    ``dcn_spec`` of ``(("data", -1),)`` puts the granules on the data axis and keeps FSDP (on another axis, or on
    ``data``'s within-granule part) inside a slice.

    Args:
      spec: axis names and sizes within one granule (the whole job without ``dcn_spec``), outermost first.
      devices: devices to use (default: all global devices).
      dcn_spec: axis names (a subset of ``spec``'s) and the number of granules along each; () = no DCN axis.
      granule: see :func:`granules`.

    Returns:
      The mesh (Auto axis types: the step is written for GSPMD propagation).
    """
    devices = list(jax.devices() if devices is None else devices)
    if dcn_spec:
        attr, n_granules = granules(devices, granule)
        dcn_names, dcn_sizes = _resolve(dcn_spec, n_granules, "config.sharding.dcn_mesh")
        unknown = set(dcn_names) - {str(n) for n, _ in spec}
        if unknown:
            raise ValueError(f"config.sharding.dcn_mesh names axes {sorted(unknown)} that the mesh "
                             f"{[n for n, _ in spec]} does not have")
        if int(np.prod(dcn_sizes)) != n_granules:
            raise ValueError(f"config.sharding.dcn_mesh {list(dcn_spec)} needs {int(np.prod(dcn_sizes))} granules "
                             f"({attr}), the job has {n_granules}")
        names, sizes = _resolve(spec, len(devices) // n_granules, "config.sharding.mesh (per granule)")
        dcn = [dict(zip(dcn_names, dcn_sizes)).get(name, 1) for name in names]
        grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices, process_is_granule=attr == "process_index")
        return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))
    names, sizes = _resolve(spec, len(devices), "mesh spec")
    needed = int(np.prod(sizes))
    if needed < len(devices) and jax.process_count() == 1:
        devices = devices[:needed]  # An explicit smaller mesh (debugging, tests) uses the first devices.
    if needed != len(devices):
        raise ValueError(f"mesh spec {list(spec)} needs {needed} devices, {len(devices)} available")
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


def process_rows(mesh: Mesh, global_batch: int) -> list[int]:
    """The global batch rows this process feeds: those its devices hold under :func:`batch_sharding`.

    Read from the sharding (``addressable_devices_indices_map``), not assumed contiguous by process index, so
    hybrid (DCN) meshes and any device order work; the data pipeline produces exactly these rows, in this order.

    Args:
      mesh: the device mesh.
      global_batch: rows of the global batch.

    Returns:
      Sorted global row indices.
    """
    rows = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(*index[0].indices(global_batch)))
    return sorted(rows)


def shard_host_batch(batch: Any, mesh: Mesh, global_batch: int | None = None) -> Any:
    """Turns this process's rows of the global batch into globally sharded arrays.

    Args:
      batch: pytree of host arrays whose leading dimension holds this process's rows (:func:`process_rows`, in
        that order).
      mesh: the device mesh.
      global_batch: rows of the global batch (default: local rows x process count, the even split).

    Returns:
      The same pytree of global ``jax.Array`` sharded by :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        rows = global_batch if global_batch is not None else x.shape[0] * jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree.map(one, batch)


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
