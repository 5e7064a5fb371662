"""TrainState: the one pytree a training run carries between steps and saves in checkpoints.

``params`` are trained; ``buffers`` (the prompt encoder's Gaussian PE matrix) ride along untouched so the model
variables can be rebuilt from a checkpoint alone. ``step`` counts micro-batches (train-step calls) and seeds the
step's RNG via ``fold_in``, so a resumed run draws the same clicks. Also derives the state's shardings from the
param rules. Must not import data/ or ml_collections.
"""

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sammed3d_jax import parallel


class TrainState(flax.struct.PyTreeNode):
    """Training state.

    Attributes:
      step: int32 scalar, micro-batches processed.
      params: the trainable ``variables["params"]`` tree (float32).
      buffers: ``variables["buffers"]``, constant.
      opt_state: optimizer state (``optax.MultiStepsState``).
      skipped: int32 scalar, micro-batches dropped for non-finite gradients.
    """

    # Leaves are typed Any: the same class also carries shardings and ShapeDtypeStructs (abstract states).
    step: Any
    params: Any
    buffers: Any
    opt_state: Any
    skipped: Any

    @property
    def variables(self) -> dict[str, Any]:
        """The model variables ``{"params", "buffers"}`` for ``Sam3D.apply``."""
        return {"params": self.params, "buffers": self.buffers}


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 from model variables (jit this with ``out_shardings`` to place it).

    Args:
      variables: ``{"params": ..., "buffers": ...}`` as returned by ``init_variables`` or ``load_params``.
      tx: the optimizer.

    Returns:
      The initial TrainState.
    """
    missing = [k for k in ("params", "buffers") if k not in variables]
    if missing:
        raise ValueError(f"model variables lack {missing}; got keys {sorted(variables)}")
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=variables["buffers"],
                      opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))


def state_shardings(abstract_state: TrainState, rules: Sequence[tuple[str, str]], mesh: Mesh,
                    fsdp_axis: str = "data") -> TrainState:
    """Shardings of a TrainState from the param rules; each optimizer leaf follows its param's path.

    Args:
      abstract_state: TrainState of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the init).
      rules: ``[(regex, "replicate"|"fsdp"), ...]`` matched against param paths such as
        ``"image_encoder/blocks_0/attn/qkv/kernel"``.
      mesh: the device mesh.
      fsdp_axis: mesh axis used by ``"fsdp"``.

    Returns:
      A TrainState-shaped pytree of NamedSharding; step, counters and buffers are replicated.
    """
    rep = parallel.replicated(mesh)
    param_paths = {parallel.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state.params)}

    def opt_leaf(path, leaf):
        # Optimizer leaves hold their param's path as a suffix (".../mu/image_encoder/..."); counters have none.
        name = parallel.path_str(path)
        parts = name.split("/")
        for i in range(len(parts)):
            sub = "/".join(parts[i:])
            if sub in param_paths:
                return parallel.leaf_sharding(sub, np.shape(leaf), rules, mesh, fsdp_axis)
        return rep

    return TrainState(
        step=rep, params=parallel.infer_sharding(abstract_state.params, rules, mesh, fsdp_axis),
        buffers=jax.tree.map(lambda _: rep, abstract_state.buffers),
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state), skipped=rep)
