"""Periodic validation inside the training loop: interactive Dice on held-out cases through a jitted eval step.

The eval step runs the training interaction forward only, deterministically: ``validation.clicks`` clicks, every
click fed (as interactive evaluation does), no prompt-less steps, the prediction ``logits > 0``, clicks drawn from
the error with per-sample keys ``fold_in(eval_key, element)``, so every validation of a run sees the same clicks and
any topology gives the same numbers. It reports ``val_dice_1`` and ``val_dice_<clicks>``, the mean over the valid
held-out samples (padding rows excluded). Must not import data/ (the loop hands it placed batches) or ml_collections.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sammed3d_jax import parallel
from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
from sammed3d_jax.model.sam import Sam3D
from sammed3d_jax.training import step as step_lib


def eval_step(params: Any, buffers: Any, batch: dict[str, jax.Array], eval_key: jax.Array, *, model: Sam3D,
              cfg: step_lib.StepConfig) -> dict[str, jax.Array]:
    """Dice after each click for each sample (forward only).

    Args:
      params: model params.
      buffers: model buffers.
      batch: ``image``, ``label``, ``element``, ``valid`` (bool [b], False for padding rows).
      eval_key: the run's validation key.
      model: the Sam3D module.
      cfg: a deterministic StepConfig (``run_config.validation_step_config``).

    Returns:
      ``{"dice_sum": f32 [clicks] (sum over valid samples), "count": f32 (valid samples)}``.
    """
    keys = step_lib.sample_keys(eval_key, batch["element"])
    batch, _ = step_lib.model_input(batch, cfg.normalization)
    _, aux = step_lib.interactive_loss(params, buffers, batch, keys, jnp.int32(cfg.max_clicks), jnp.int32(-1),
                                       model=model, cfg=cfg)
    valid = batch["valid"].astype(jnp.float32)
    per_sample = jnp.nan_to_num(aux["dice_per_sample"])  # [clicks, b]
    return {"dice_sum": jnp.sum(per_sample * valid[None], axis=1), "count": jnp.sum(valid)}


class Validator:
    """Runs :func:`eval_step` over fixed held-out batches and reports ``val_dice_1`` / ``val_dice_<n>``.

    Args:
      model_cfg: the architecture.
      cfg: the deterministic interaction.
      mesh: the device mesh.
      param_shardings: shardings of ``(params, buffers)`` as in the TrainState.
      batches: placed validation batches (``data_feed.holdout_input``).
      key: the validation PRNG key (replicated).
      compiler_options: XLA options.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: step_lib.StepConfig, mesh: Mesh, param_shardings: Any,
                 batches: Sequence[dict[str, jax.Array]], key: jax.Array,
                 compiler_options: dict[str, Any] | None = None):
        model_cfg = resolve_attention_impl(model_cfg, jax.default_backend())
        fn = functools.partial(eval_step, model=Sam3D(model_cfg), cfg=cfg)
        rep = parallel.replicated(mesh)
        self._fn: Callable = jax.jit(fn, in_shardings=(*param_shardings, parallel.batch_sharding(mesh), rep),
                                     out_shardings=rep, compiler_options=compiler_options)
        self.batches = list(batches)
        self.key = key
        self.clicks = cfg.max_clicks
        self._compiled = False

    def __call__(self, params: Any, buffers: Any) -> dict[str, float]:
        """Mean Dice after the first and after the last click over the held-out samples."""
        total, count = np.zeros(self.clicks), 0.0
        if self.batches and not self._compiled:  # Compile everywhere first, then meet: compile times differ.
            self._fn.lower(params, buffers, self.batches[0], self.key).compile()
            parallel.barrier("validation step compiled")
            self._compiled = True
        for batch in self.batches:
            out = self._fn(params, buffers, batch, self.key)
            out = (multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1
                   else jax.device_get(out))
            total += np.asarray(out["dice_sum"], np.float64)
            count += float(out["count"])
        if not count:
            return {}
        mean = total / count
        return {"val_dice_1": float(mean[0]), f"val_dice_{self.clicks}": float(mean[-1]), "val_samples": count}
