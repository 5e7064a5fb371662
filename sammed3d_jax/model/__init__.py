"""Flax Linen modules of SAM-Med3D. jax/flax/numpy only: never imports data, training or ml_collections."""

from sammed3d_jax.model.config import REMAT_POLICIES, VARIANTS, ModelConfig, resolve_attention_impl
from sammed3d_jax.model.sam import Sam3D, count_params, init_variables, upsample_logits

__all__ = ["REMAT_POLICIES", "VARIANTS", "ModelConfig", "Sam3D", "count_params", "init_variables",
           "resolve_attention_impl", "upsample_logits"]
