"""Content checksums of saved train states: Orbax (0.12) keeps none for array data, so a checkpoint whose bytes were
flipped in place (same size) would restore finite but wrong values without them.

Two sums per array leaf over its elements' raw bits ``b_i`` (the unsigned integer of the element's width) and their
global row-major positions ``i``, both modulo 2**64: ``Σ b_i`` and ``Σ b_i·(2i + 1)``. Any single changed element
changes the first; swapped or compensating changes move the second. Both are linear, so they are summed shard by
shard (each distinct shard once, on the process that holds it) and then over processes: the result is exact and the
same for any sharding, mesh or process count (a checkpoint written on 8 devices verifies when restored onto 1).
Computed on the host with numpy (two reductions per shard, no compilation). A corruption check, not a
cryptographic one. Must not import data/ or training/.
"""

import itertools
import json
from typing import Any

import jax
import numpy as np

from sammed3d_jax import parallel

_MOD = 1 << 64
_EXCHANGES = itertools.count()


def _bits(block: np.ndarray) -> np.ndarray:
    """The elements' raw bits as an unsigned integer array of the same shape (at least 1-D)."""
    block = np.ascontiguousarray(np.atleast_1d(block))
    if block.dtype == np.bool_:
        return block.view(np.uint8)
    return block.view(f"u{block.dtype.itemsize}")


def _block_sums(block: np.ndarray, shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, int]:
    """``(Σ b, Σ b·(2i + 1))`` mod 2**64 of one block of a global array of ``shape`` at ``index``."""
    bits = _bits(block)
    if bits.size == 0:
        return 0, 0
    shape = tuple(shape) or (1,)
    starts = [sl.start or 0 for sl in index] or [0]
    cols = shape[-1]
    flat = bits.reshape(-1, bits.shape[-1])
    row_sums = flat.sum(axis=1, dtype=np.uint64)  # < 2**32 * cols: exact
    col_sums = flat.sum(axis=0, dtype=np.uint64)  # < 2**32 * rows: exact
    # Global row index of each local row (leading axes, row-major) and the weight of each local column.
    rows = np.zeros((1,), np.uint64)
    for axis in range(len(shape) - 1):
        stride = int(np.prod(shape[axis + 1:-1], dtype=np.int64))
        local = np.arange(starts[axis], starts[axis] + bits.shape[axis], dtype=np.uint64) * np.uint64(stride)
        rows = (rows[:, None] + local[None, :]).reshape(-1)
    col_weights = 2 * np.arange(starts[-1], starts[-1] + bits.shape[-1], dtype=np.uint64) + np.uint64(1)
    # Σ b·(2(row·cols + col) + 1) = 2·cols·Σ_r row·rowsum + Σ_c (2·col + 1)·colsum; uint64 products wrap mod 2**64.
    mixed = (2 * cols * int(np.dot(rows, row_sums)) + int(np.dot(col_weights, col_sums))) % _MOD
    return int(row_sums.sum(dtype=np.uint64)) % _MOD, mixed


def _leaf_sums(x: Any) -> tuple[int, int]:
    """This process's share of a leaf's sums: every shard it holds with replica id 0 (a host array: all of it)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        total = [0, 0]
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                s = _block_sums(np.asarray(shard.data), x.shape, shard.index)
                total = [(total[0] + s[0]) % _MOD, (total[1] + s[1]) % _MOD]
        return total[0], total[1]
    block = np.asarray(x)
    return _block_sums(block, block.shape, tuple(slice(0, n) for n in block.shape))


def tree_checksums(tree: Any) -> list[list[int]]:
    """``[plain_sum, mixed_sum]`` per leaf of ``tree`` (in ``jax.tree.leaves`` order).

    Every process of a multi-process run must call this, in the same order as the others (the partial sums of arrays
    spread over processes are exchanged); each gets the same values.
    """
    leaves = jax.tree.leaves(tree)
    sums = [_leaf_sums(x) for x in leaves]
    spread = [n for n, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if jax.process_count() > 1 and spread:  # Host values and process-local arrays are whole on every process.
        parts = _exchange([sums[n] for n in spread])
        for i, n in enumerate(spread):
            sums[n] = tuple(sum(int(part[i][k]) for part in parts) % _MOD for k in (0, 1))
    return [[int(a), int(b)] for a, b in sums]


def _exchange(partial: list[tuple[int, int]], timeout_s: float = 3600.0) -> list[list[list[int]]]:
    """Every process's partial sums, through the coordination service's key-value store (not a device collective:
    processes may reach a save seconds or minutes apart). Calls are numbered per process, like ``parallel.barrier``."""
    client = parallel.coordination_client()
    key = f"sammed3d_jax/checksums/{next(_EXCHANGES)}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps([list(p) for p in partial]))
    return [json.loads(client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000)))
            for p in range(jax.process_count())]


def mismatches(tree: Any, expected: list[list[int] | None]) -> list[str]:
    """Paths of the leaves of ``tree`` whose checksum differs from ``expected`` (from :func:`tree_checksums`).

    Raises:
      ValueError: when ``expected`` has another number of leaves than ``tree``.
    """
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    if len(expected) != len(with_paths):
        raise ValueError(f"checksums for {len(expected)} arrays, the state has {len(with_paths)}")
    got = tree_checksums(tree)
    return [jax.tree_util.keystr(path) for (path, _), want, have in zip(with_paths, expected, got)
            if want is not None and list(want) != have]
