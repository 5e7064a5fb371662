"""Content checksums of saved train states: Orbax (0.12) keeps none for array data, so a checkpoint whose bytes were
flipped in place (same size) would restore finite but wrong values without them.

One pair of 32-bit sums per array leaf, computed on the devices where the arrays live: every element's bits, widened
to uint32, are summed as they are and after mixing them with their global position (murmur3's finaliser). Both sums
wrap modulo 2**32, and integer addition is associative, so the result is exact and the same for any sharding, mesh
or process count (a checkpoint written on 8 devices verifies when restored onto 1). Any single flipped bit changes
the plain sum; the mixed sum catches moved or compensating changes. This is a corruption check, not a cryptographic
one. Leaves that are not ``jax.Array`` (host numpy values) get no checksum. Must not import data/ or training/.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B1  # Spreads positions before mixing.


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The array's raw bits as uint32 (narrower types widened; bool as 0/1)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize * 8
    if width > 32:
        raise TypeError(f"checksum: {width}-bit arrays are not supported ({x.dtype})")
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index modulo 2**32, built per axis (no reshape of a sharded array)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    return index


@jax.jit
def _sums(leaves: list[jax.Array]) -> jax.Array:
    rows = []
    for x in leaves:
        bits = _bits(x)
        mixed = _fmix32(bits ^ _fmix32(_position(bits.shape) * jnp.uint32(_GOLDEN) + jnp.uint32(1)))
        rows.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_checksums(tree: Any) -> list[list[int] | None]:
    """``[plain_sum, mixed_sum]`` per leaf of ``tree`` (in ``jax.tree.leaves`` order), None for non-``jax.Array``.

    Every process of a multi-process run must call this at the same point (it runs one jitted program over the
    global arrays); each gets the same values.
    """
    leaves = jax.tree.leaves(tree)
    picked = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    out: list[list[int] | None] = [None] * len(leaves)
    if picked:
        sums = _sums([leaves[i] for i in picked])
        host = _to_host(sums)
        for row, i in enumerate(picked):
            out[i] = [int(v) for v in host[row]]
    return out


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
            if want is not None and have is not None and list(want) != have]

