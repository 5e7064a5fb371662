"""Upstream's from-scratch initialisation (PyTorch defaults) of a Flax model's variables, identical on every platform.

The tree comes from the modules (``jax.eval_shape`` of Flax's own init, recording which module class owns each
variable); the value of each leaf follows :func:`init_rule`. Every random value comes from the default threefry
generator, per leaf from ``fold_in(key, crc32(path))`` (adding or renaming a variable changes no other), in chunks
of ``CHUNK`` values keyed ``fold_in(leaf_key, chunk_index)``; all chunks of all leaves are drawn by one vectorised
call. Drawing leaf by leaf inside Flax's init instead compiles one generator loop per leaf: minutes on a CPU.

- Uniform leaves are ``m · 2^-22 − 1`` for the top 23 bits ``m`` (exact), times the bound: one correctly rounded
  product, so bit-identical on CPU, GPU and TPU. Normal leaves (embedding tables, the Fourier PE matrix) are
  ``√2 · erfinv(u)`` as ``jax.random.normal`` computes them and may differ in the last bit between backends.
- Traced (under the caller's jit) the values are built with jnp; called eagerly, the bits are drawn on the device
  and the leaves assembled on the host and put back explicitly (op-by-op dispatch of a few hundred differently
  shaped leaves would compile a program per shape). Both give the same bits.

No jit in here (callers jit at the top). Imports jax/flax/numpy and the model's layer classes only.
"""

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.model.attention import EncoderAttention
from sammed3d_jax.model.image_encoder import ImageEncoder
from sammed3d_jax.model.layers import Conv3x3, Dense, DepthToSpaceConvTranspose, Embedding, LayerNorm, StridedConv
from sammed3d_jax.model.prompt_encoder import PositionEmbeddingRandom

# Random values are drawn in chunks of this many (changing it changes every initial weight).
CHUNK = 4096
_SQRT2 = np.float32(math.sqrt(2.0))
_LOWEST = np.float32(-1.0 + 2.0 ** -22)  # the open interval (-1, 1) for erf_inv, as jax.random.normal


def init_rule(owner: type, name: str, siblings: dict[str, tuple[int, ...]]) -> tuple[str, float]:
    """Upstream's initialisation of variable ``name`` of a module of class ``owner``.

    Args:
        owner: the Flax module class that declares the variable.
        name: the variable's name in that module.
        siblings: shapes of every variable of that module, by name (a bias takes its fan-in from the kernel).

    Returns:
        ``("uniform", b)`` for U(-b, b), ``("normal", s)`` for N(0, s²) or ``("constant", c)``.

    Raises:
        ValueError: for a module class or variable with no rule (a new layer must state its initialisation here).
    """
    if owner is LayerNorm and name in ("scale", "bias"):
        return ("constant", 1.0 if name == "scale" else 0.0)
    if (owner is Embedding and name == "embedding") or (
            owner is PositionEmbeddingRandom and name == "positional_encoding_gaussian_matrix"):
        return ("normal", 1.0)
    if (owner is ImageEncoder and name == "pos_embed") or (
            issubclass(owner, EncoderAttention) and name in ("rel_pos_d", "rel_pos_h", "rel_pos_w")):
        return ("constant", 0.0)
    kernel = siblings.get("kernel")
    fan_in = None
    if kernel is not None and name in ("kernel", "bias"):
        if owner is Dense:
            fan_in = kernel[0]
        elif owner in (StridedConv, Conv3x3):
            fan_in = math.prod(kernel[:-1])
        elif owner is DepthToSpaceConvTranspose:
            # Parity: torch takes a ConvTranspose3d's fan_in from weight dim 1 (out_channels * k^3).
            fan_in = math.prod(kernel[:3]) * kernel[-1]
    if fan_in is None:
        raise ValueError(f"no initialisation rule for variable {name!r} of {owner.__name__}")
    return ("uniform", 1.0 / math.sqrt(fan_in))


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """What to draw for each leaf of a model's variables (static; computed once per model)."""

    treedef: Any
    names: tuple[str, ...]  # "collection/module/.../variable"
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    rules: tuple[tuple[str, float], ...]

    @property
    def drawn(self) -> tuple[int, ...]:
        return tuple(i for i, (kind, _) in enumerate(self.rules) if kind != "constant")


def make_plan(model: nn.Module, method: Callable, *args: Any, collections: tuple[str, ...] = ("params", "buffers")
              ) -> InitPlan:
    """Traces ``model.init(key, *args, method=method)`` abstractly (no computation; ``args`` may be
    ``jax.ShapeDtypeStruct``s), recording the module class behind every variable, and returns the plan."""
    owners: dict[tuple[str, ...], type] = {}

    def record(next_fun, a, kw, context):
        owners[context.module.path] = type(context.module)
        return next_fun(*a, **kw)

    def flax_init(key, *inputs):
        with nn.intercept_methods(record):
            variables = model.init(key, *inputs, method=method)
        return {c: variables[c] for c in collections}

    abstract = jax.eval_shape(flax_init, jax.random.key(0), *args)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    shapes = {p: leaf.shape for p, (_, leaf) in zip(paths, leaves)}
    rules = []
    for p in paths:
        if p[1:-1] not in owners:
            raise ValueError(f"no module recorded for variable {'/'.join(p)}")
        siblings = {q[-1]: shape for q, shape in shapes.items() if q[:-1] == p[:-1]}
        rules.append(init_rule(owners[p[1:-1]], p[-1], siblings))
    names = tuple("/".join(p) for p in paths)
    hashes = [zlib.crc32(names[i].encode()) for i, (kind, _) in enumerate(rules) if kind != "constant"]
    if len(set(hashes)) != len(hashes):
        raise ValueError("two variable paths share a crc32 hash; their initial values would coincide")
    return InitPlan(treedef, names, tuple(shapes[p] for p in paths), tuple(leaf.dtype for _, leaf in leaves),
                    tuple(rules))


def plan_for_tree(tree: Any, rule: tuple[str, float]) -> InitPlan:
    """A plan drawing every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s) with the same ``rule``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = tuple("/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves)
    return InitPlan(treedef, names, tuple(tuple(x.shape) for _, x in leaves), tuple(x.dtype for _, x in leaves),
                    (rule,) * len(leaves))


def _uniform_chunks(key: jax.Array, hashes: list[int], sizes: list[int]) -> tuple[jax.Array, np.ndarray]:
    """``([chunks, CHUNK] float32 uniform on [-1, 1), start offset of each leaf in the flattened array)``."""
    nchunks = [-(-n // CHUNK) for n in sizes]
    owner = np.repeat(np.arange(len(sizes)), nchunks)
    index = np.concatenate([np.arange(c) for c in nchunks])
    leaf_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(np.array(hashes, np.uint32)))
    chunk_keys = jax.vmap(jax.random.fold_in)(leaf_keys[jnp.asarray(owner)], jnp.asarray(index, np.uint32))
    bits = jax.vmap(lambda k: jax.random.bits(k, (CHUNK,), jnp.uint32))(chunk_keys)
    # The top 23 bits as an integer m: m / 2^22 - 1 is exact in float32 (no rounding on any backend).
    u = (bits >> 9).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0 ** -22) - np.float32(1.0)
    return u, np.cumsum([0, *nchunks[:-1]]) * CHUNK


def draw(plan: InitPlan, key: jax.Array) -> Any:
    """The variables of ``plan`` for ``key`` (a new-style or legacy uint32 PRNG key), as a pytree of arrays."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    drawn = plan.drawn
    sizes = [math.prod(plan.shapes[i]) for i in drawn]
    hashes = [zlib.crc32(plan.names[i].encode()) for i in drawn]
    values: list[Any] = [None] * len(plan.names)
    if drawn:
        u, starts = _uniform_chunks(key, hashes, sizes)
        flat = u.reshape(-1)
        normal = [j for j, i in enumerate(drawn) if plan.rules[i][0] == "normal"]
        # The normal leaves' values, gathered into one vector: one erf_inv over all of them.
        where = np.concatenate([np.arange(starts[j], starts[j] + sizes[j]) for j in normal]) if normal else None
        z = _SQRT2 * jax.lax.erf_inv(jnp.maximum(flat[jnp.asarray(where)], _LOWEST)) if normal else None
        traced = isinstance(key, jax.core.Tracer)
        if not traced:
            flat, z = jax.device_get((flat, z))
        offset = 0
        for j, i in enumerate(drawn):
            kind, scale = plan.rules[i]
            if kind == "normal":
                part, offset = z[offset:offset + sizes[j]], offset + sizes[j]
            else:
                part = flat[starts[j]:starts[j] + sizes[j]]
            values[i] = part.reshape(plan.shapes[i]) * np.float32(scale)
    else:
        traced = isinstance(key, jax.core.Tracer)
    full = jnp.full if traced else np.full
    for i, (kind, value) in enumerate(plan.rules):
        if kind == "constant":
            values[i] = full(plan.shapes[i], value, np.float32)
    values = [v.astype(dtype) for v, dtype in zip(values, plan.dtypes)]
    tree = jax.tree_util.tree_unflatten(plan.treedef, values)
    return tree if traced else jax.device_put(tree)
