"""The optax optimizer of upstream SAM-Med3D, plus the schedule, clipping, accumulation and skip options.

Upstream (spec §4.4): AdamW (b1 0.9, b2 0.999, eps 1e-8) with weight decay 0.1 on every parameter; the image encoder
at ``lr``, prompt encoder and mask decoder at ``0.1 lr``; ``MultiStepLR`` (x0.1 at given epochs); gradients of 20
micro-batches accumulated per update. PyTorch's per-group lr scales the decay term too, so multiplying the final
AdamW update of a group by its factor is exactly the grouped optimizer.

The inner chain, applied to the mean gradient of ``accum_steps`` micro-batches (``optax.MultiSteps``):
``clip_by_global_norm? -> scale_by_adam -> add_decayed_weights -> scale_by_learning_rate(schedule) -> per-path
multiplier``. Non-finite micro-batch gradients are dropped by ``MultiSteps(should_skip_update_fn=skip_not_finite)``
as if the micro-batch never happened; the train state counts them.

Must not import model/, data/ or ml_collections (the loop converts its ConfigDict into :class:`OptimConfig`).
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sammed3d_jax.parallel import path_str

SCHEDULES = ("multistep", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters. Step counts are optimizer updates (one per ``accum_steps`` micro-batches).

    Attributes:
      lr: peak learning rate of the image encoder (upstream 8e-4).
      b1, b2, eps: AdamW moments (upstream 0.9, 0.999, 1e-8).
      weight_decay: decoupled weight decay on every parameter, scaled by the lr (upstream 0.1).
      lr_multipliers: ``(regex, factor)`` on ``/``-joined param paths; the first match wins, default 1.
      frozen: regexes of params never updated (factor 0). Upstream's IoU head and ``no_mask_embed`` are outside the
        loss graph, so PyTorch's AdamW skips them (grad None) and never even decays them; keeping them unchanged
        reproduces that.
      schedule: ``"multistep"`` (lr x gamma at each milestone, as upstream), ``"cosine"`` (to
        ``lr * final_lr_fraction`` at ``total_steps``) or ``"constant"``.
      milestones: update counts at which multistep multiplies the lr by ``gamma``.
      gamma: multistep factor (upstream 0.1).
      warmup_steps: linear warm-up from 0 over this many updates before the schedule (0 = none, as upstream).
      total_steps: cosine length in updates, warm-up included.
      final_lr_fraction: cosine end value as a fraction of ``lr``.
      clip_grad_norm: clip the mean gradient to this global norm (0 = off, as upstream).
      accum_steps: micro-batches per optimizer update.
      skip_nonfinite: drop micro-batches whose gradient holds inf/NaN.
      mu_dtype: dtype of Adam's first moment (None = param dtype).
    """

    lr: float = 8e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    lr_multipliers: tuple[tuple[str, float], ...] = (("^prompt_encoder/", 0.1), ("^mask_decoder/", 0.1))
    frozen: tuple[str, ...] = ("^mask_decoder/iou_prediction_head/", "^prompt_encoder/no_mask_embed/")
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    total_steps: int = 0
    final_lr_fraction: float = 0.0
    clip_grad_norm: float = 0.0
    accum_steps: int = 1
    skip_nonfinite: bool = True
    mu_dtype: str | None = None

    def __post_init__(self):
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            problems.append(f"cosine needs total_steps ({self.total_steps}) > warmup_steps ({self.warmup_steps})")
        if self.accum_steps < 1:
            problems.append(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.lr < 0 or self.weight_decay < 0 or self.clip_grad_norm < 0 or self.warmup_steps < 0:
            problems.append("lr, weight_decay, clip_grad_norm and warmup_steps must be >= 0")
        if list(self.milestones) != sorted(self.milestones):
            problems.append(f"milestones must be increasing, got {self.milestones}")
        for pattern in [p for p, _ in self.lr_multipliers] + list(self.frozen):
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"bad regex {pattern!r}: {e}")
        if problems:
            raise ValueError("invalid optimizer config: " + "; ".join(problems))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "lr_multipliers", tuple((str(p), float(f)) for p, f in self.lr_multipliers))
        object.__setattr__(self, "frozen", tuple(str(p) for p in self.frozen))


class Optimizer(NamedTuple):
    """The gradient transformation and its learning-rate schedule (a function of the update count)."""

    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]


def make_schedule(cfg: OptimConfig) -> Callable[[Any], Any]:
    """Learning rate as a function of the optimizer update count (warm-up, then multistep / cosine / constant)."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else cfg.lr, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.total_steps, end_value=cfg.lr * cfg.final_lr_fraction)
    if cfg.schedule == "multistep":
        # Milestones count from the start of training, warm-up included (as MultiStepLR counts epochs).
        main = optax.piecewise_constant_schedule(cfg.lr, {m: cfg.gamma for m in cfg.milestones})
    else:
        main = optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return main
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return lambda count: jnp.where(count < cfg.warmup_steps, warm(count), main(count))


def lr_multiplier(path: str, cfg: OptimConfig) -> float:
    """The factor applied to the update of the param at ``path`` (0 for frozen params)."""
    if any(re.search(p, path) for p in cfg.frozen):
        return 0.0
    for pattern, factor in cfg.lr_multipliers:
        if re.search(pattern, path):
            return factor
    return 1.0


def scale_by_path(cfg: OptimConfig) -> optax.GradientTransformation:
    """Stateless transform multiplying each update leaf by :func:`lr_multiplier` of its path (static at trace)."""

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: u * jnp.asarray(lr_multiplier(path_str(p), cfg), u.dtype), updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig) -> Optimizer:
    """Builds the accumulated, grouped AdamW of upstream with the configured options.

    Args:
      cfg: optimizer hyper-parameters.

    Returns:
      ``Optimizer(tx, schedule)``; ``tx`` is an ``optax.MultiSteps`` transformation (``.init``/``.update``).
    """
    schedule = make_schedule(cfg)
    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=cfg.mu_dtype),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
        scale_by_path(cfg),
    ]
    skip = optax.skip_not_finite if cfg.skip_nonfinite else None
    tx = optax.MultiSteps(optax.chain(*parts), every_k_schedule=cfg.accum_steps, should_skip_update_fn=skip)
    return Optimizer(tx.gradient_transformation(), schedule)


def update_count(opt_state: optax.MultiStepsState) -> jax.Array:
    """Number of optimizer updates applied so far."""
    return opt_state.gradient_step


def skipped_this_step(opt_state: optax.MultiStepsState) -> jax.Array:
    """1 if the latest micro-batch was dropped for non-finite gradients, else 0 (int32)."""
    skip_state = opt_state.skip_state
    if isinstance(skip_state, dict) and "should_skip" in skip_state:
        return skip_state["should_skip"].astype(jnp.int32)
    return jnp.zeros((), jnp.int32)
