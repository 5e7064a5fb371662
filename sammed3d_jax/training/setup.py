"""The one state/sharding/jit set-up of training, shared by the loop, ``benchmarks/train_step.py`` and the tests.

:func:`build` turns typed configs and a mesh into a :class:`TrainSetup`: the abstract TrainState, its shardings,
a jitted init placing a fresh state straight onto the mesh (from a key or from given model variables), the jitted
train step and, on request, the jitted validation step. Memoised on its (hashable) arguments, so runs of the same
configuration in one process (a resumed run in tests, a sweep in a notebook) reuse compiled executables.
Must not import data/, ml_collections or the loop.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from sammed3d_jax import parallel
from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
from sammed3d_jax.model.sam import init_variables
from sammed3d_jax.training import optim, state as state_lib, step as step_lib

REPLICATE = ((".*", "replicate"),)


class TrainSetup(NamedTuple):
    """Everything a run needs to create, restore and advance its sharded TrainState.

    Attributes:
      mesh: the device mesh.
      optimizer: the optax transformation and its schedule.
      abstract: TrainState of ``jax.ShapeDtypeStruct`` (no shardings).
      shardings: TrainState-shaped pytree of ``NamedSharding``.
      init: ``init(key) -> state``: a fresh, placed state.
      from_variables: ``from_variables(variables) -> state``: a placed state at step 0 from model variables.
      train_step: ``train_step(state, batch, train_key) -> (state, metrics)`` (state donated).
    """

    mesh: Mesh
    optimizer: optim.Optimizer
    abstract: Any
    shardings: Any
    init: Callable
    from_variables: Callable
    train_step: Callable

    def restore_target(self) -> Any:
        """The abstract state with shardings attached: the target a checkpoint restores into."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract,
                            self.shardings)


def _options(compiler_options: Sequence[tuple[str, Any]] | dict | None) -> dict[str, Any] | None:
    return dict(compiler_options) or None if compiler_options else None


@functools.lru_cache(maxsize=4)
def _build(model_cfg: ModelConfig, optim_cfg: optim.OptimConfig, step_cfg: step_lib.StepConfig, mesh: Mesh,
           rules: tuple, fsdp_axis: str, compiler_options: tuple) -> TrainSetup:
    optimizer = optim.make_optimizer(optim_cfg)
    options = _options(compiler_options)

    def from_variables(variables):
        return state_lib.create_train_state(variables, optimizer.tx)

    def fresh(key):
        return from_variables(init_variables(model_cfg, key))

    abstract = jax.eval_shape(fresh, jax.random.key(0))
    shardings = state_lib.state_shardings(abstract, rules, mesh, fsdp_axis)
    return TrainSetup(
        mesh=mesh, optimizer=optimizer, abstract=abstract, shardings=shardings,
        init=jax.jit(fresh, out_shardings=shardings, compiler_options=options),
        from_variables=jax.jit(from_variables, out_shardings=shardings, compiler_options=options),
        train_step=step_lib.jit_train_step(model_cfg, optimizer, step_cfg, mesh, shardings, options))


def build(model_cfg: ModelConfig, optim_cfg: optim.OptimConfig, step_cfg: step_lib.StepConfig, mesh: Mesh, *,
          rules: Sequence[tuple[str, str]] = REPLICATE, fsdp_axis: str = "data",
          compiler_options: dict[str, Any] | Sequence[tuple[str, Any]] | None = None) -> TrainSetup:
    """The jitted init and train step for one configuration (memoised).

    Args:
      model_cfg: architecture and compute dtype.
      optim_cfg: optimizer hyper-parameters.
      step_cfg: the simulated interaction.
      mesh: the device mesh.
      rules: ``[(regex, "replicate"|"fsdp"), ...]`` param sharding rules.
      fsdp_axis: mesh axis ``"fsdp"`` rules shard over.
      compiler_options: XLA options of these compilations (None = XLA's defaults).

    Returns:
      The :class:`TrainSetup`.
    """
    items = compiler_options.items() if isinstance(compiler_options, dict) else (compiler_options or ())
    model_cfg = resolve_attention_impl(model_cfg, jax.default_backend())  # "auto": cuDNN for bf16 on a GPU.
    return _build(model_cfg, optim_cfg, step_cfg, mesh, tuple(tuple(r) for r in rules), fsdp_axis,
                  tuple(sorted(tuple(i) for i in items)))


def synthetic_batch(batch_size: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch in the train step's format: noisy boxes brighter than the background, ``element`` = row index.

    For benchmarks and tests that need no data pipeline; every sample holds a box of varied size and position.
    """
    rng = np.random.default_rng(seed)
    label = np.zeros((batch_size, size, size, size), np.uint8)
    for i in range(batch_size):
        lo = rng.integers(2, size // 2, 3)
        hi = lo + rng.integers(6, size // 2, 3)
        label[i, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    image = rng.normal(0.0, 0.5, label.shape).astype(np.float32) + 1.5 * label
    return {"image": image[..., None], "label": label, "element": np.arange(batch_size, dtype=np.int32)}


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, global_batch: int | None = None) -> dict[str, jax.Array]:
    """This process's rows of a host batch as the step's globally sharded input (see ``parallel.shard_host_batch``)."""
    return parallel.shard_host_batch(batch, mesh, global_batch)


def compiled_flops(train_step: Callable, *args: Any) -> float | None:
    """FLOPs of one call of a jitted function on this device, from XLA's cost analysis (None if unavailable).

    ``train_step`` is a jitted function (lowered and compiled for ``args``) or an already compiled one. The
    partitioned program is per device, so this is the work of one device per step.
    """
    try:
        compiled = train_step if hasattr(train_step, "cost_analysis") else train_step.lower(*args).compile()
        analysis = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  # Cost analysis is best effort on every backend.
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
