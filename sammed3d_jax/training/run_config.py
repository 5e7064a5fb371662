"""The training ConfigDict turned into the typed configs of the pure modules, checked up front.

``configs/common.py`` defines every key; this module reads them: :func:`model_config`, :func:`step_config`,
:func:`optim_config`, :func:`distributed_options`, :func:`validate` (every bad value is one ``ValueError`` line
naming the ``--config.`` key) and :func:`near_keys` (the valid keys close to a misspelt one). It also sorts keys into
the *recipe* (what the run learns: model, optimizer, clicks, loss, data sampling, seed, batch) and the *run*
settings (how and where it runs: steps, topology, logging, checkpoints), which resume treats differently.
Must not import the data pipeline (only its dependency-free ``data.offsets``) or the loop.
"""

import difflib
import math
from collections.abc import Iterable
from typing import Any

import ml_collections

from sammed3d_jax.cluster import DistributedOptions
from sammed3d_jax.data import offsets
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.training import optim, step as step_lib

# Keys (or sections, as "name.") that may change when a run resumes without changing what it learns.
RUN_KEYS = ("total_steps", "total_epochs", "resume", "stop_after_steps", "progress", "log_every_steps",
            "plot_every_steps", "profile_steps", "export_params", "compiler_options.", "distributed.", "sharding.",
            "checkpoint.", "validation.every_steps", "validation.max_batches", "observe.", "data.prepared_dir",
            "data.worker_count", "data.read_threads", "data.prefetch_batches", "model.attention_impl",
            "model.remat_encoder_blocks", "clicks.remat", "init_from", "require_init", "data.synthetic_cases")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of ``config.model`` (a variant plus numerics overrides)."""
    m = config.model
    # Optional keys: another input size (weights resampled at load), box-corner embeddings, named remat policy,
    # scanned encoder blocks.
    optional = ("image_size", "num_point_embeddings", "remat_policy", "scan_encoder_blocks")
    extra = {k: m[k] for k in optional if k in m and m[k]}
    return ModelConfig.variant(m.variant, dtype=m.dtype, attention_impl=m.attention_impl,
                               remat_encoder_blocks=bool(m.remat_encoder_blocks), **extra)


def step_config(config: ml_collections.ConfigDict) -> step_lib.StepConfig:
    """The StepConfig of ``config.clicks`` / ``config.loss``."""
    c = config.clicks
    return step_lib.StepConfig(
        max_clicks=c.max_clicks, min_clicks=c.min_clicks, random_insert=tuple(c.random_insert),
        prompt_less_last=c.prompt_less_last, accumulate_clicks=c.accumulate, stop_mask_gradient=c.stop_mask_gradient,
        use_bce=config.loss.use_bce, click_threshold=c.threshold, remat_clicks=c.remat,
        normalization=config.data.normalization, box_first_step=float(c.get("box_first_step", 0.0)))


def validation_step_config(config: ml_collections.ConfigDict) -> step_lib.StepConfig:
    """The deterministic interaction of periodic validation: ``validation.clicks`` clicks, all fed, no prompt-less
    steps, Dice of ``logits > 0`` (probability 0.5, as evaluation)."""
    return step_lib.StepConfig(max_clicks=config.validation.clicks, min_clicks=config.validation.clicks,
                               random_insert=(), prompt_less_last=False, accumulate_clicks=True,
                               use_bce=config.loss.use_bce, click_threshold=0.0, remat_clicks=False,
                               normalization=config.data.normalization)


def optim_config(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optim.OptimConfig:
    """The OptimConfig of ``config.optim``; epoch milestones and the cosine length become optimizer updates."""
    o = config.optim
    updates_per_epoch = steps_per_epoch / o.accum_steps
    return optim.OptimConfig(
        lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        lr_multipliers=tuple(tuple(x) for x in o.lr_multipliers), frozen=tuple(o.frozen), schedule=o.schedule,
        milestones=tuple(round(e * updates_per_epoch) for e in o.milestones_epochs), gamma=o.gamma,
        warmup_steps=o.warmup_steps, total_steps=max(1, total_steps // o.accum_steps),
        final_lr_fraction=o.final_lr_fraction, clip_grad_norm=o.clip_grad_norm, accum_steps=o.accum_steps,
        skip_nonfinite=o.skip_nonfinite, mu_dtype=o.mu_dtype or None)


def distributed_options(config: ml_collections.ConfigDict) -> DistributedOptions:
    """``config.distributed`` as :class:`DistributedOptions` (a bare mode string is accepted too)."""
    d = config.distributed
    if isinstance(d, str):
        return DistributedOptions(mode=d)
    return DistributedOptions.from_mapping(d.to_dict())


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Micro-batches of the run: ``total_steps``, or ``total_epochs`` epochs."""
    return int(config.total_steps or math.ceil(config.total_epochs * steps_per_epoch))


def _check(problems: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        problems.append(f"--config.{key}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the values the typed configs do not (all at once); raises one ValueError line listing each problem."""
    p: list[str] = []
    _check(p, config.batch_size >= 1, "batch_size", f"must be >= 1, got {config.batch_size}")
    _check(p, config.total_steps >= 0, "total_steps", f"must be >= 0 (0 = total_epochs), got {config.total_steps}")
    _check(p, config.total_steps > 0 or config.total_epochs > 0, "total_epochs",
           "must be > 0 when total_steps is 0")
    for key in ("log_every_steps", "plot_every_steps", "checkpoint.every_steps", "checkpoint.keep",
                "optim.accum_steps", "validation.clicks"):
        value = config[key.split(".")[0]] if "." not in key else config[key.split(".")[0]][key.split(".")[1]]
        _check(p, value >= 1, key, f"must be >= 1, got {value}")
    _check(p, config.stop_after_steps >= 0, "stop_after_steps", f"must be >= 0, got {config.stop_after_steps}")
    _check(p, config.optim.max_consecutive_skips >= 0, "optim.max_consecutive_skips", "must be >= 0 (0 = never stop)")
    _check(p, config.validation.every_steps >= 0 and config.validation.max_batches >= 0, "validation",
           "every_steps and max_batches must be >= 0")
    _check(p, 0.0 <= config.validation.holdout_fraction < 1.0, "validation.holdout_fraction",
           f"must be in [0, 1), got {config.validation.holdout_fraction}")
    _check(p, not config.validation.every_steps or config.validation.holdout_fraction > 0,
           "validation.holdout_fraction", "must be > 0 when validation.every_steps is set (no held-out cases)")
    for name, problem in offsets.offset_problems(float(config.data.get("target_offset", 0.0)),
                                                 float(config.data.get("target_offset_prob", 1.0)),
                                                 str(config.data.get("offset_mode", "uniform"))):
        p.append(f"--config.data.{name}: {problem}")
    profile = tuple(config.profile_steps)
    _check(p, profile == () or (len(profile) == 2 and 1 <= profile[0] <= profile[1]), "profile_steps",
           f"must be () or (first, last) with 1 <= first <= last, got {profile}")
    if config.total_steps and config.optim.warmup_steps * config.optim.accum_steps > config.total_steps:
        p.append(f"--config.optim.warmup_steps={config.optim.warmup_steps} optimizer updates is more than the run's "
                 f"{config.total_steps // config.optim.accum_steps} (total_steps {config.total_steps} / accum_steps "
                 f"{config.optim.accum_steps})")
    if p:
        raise ValueError("bad config: " + "; ".join(p))
    try:  # The typed configs check the rest (variant names, click ranges, schedules, regexes).
        model_cfg = model_config(config)
        step_cfg = step_config(config)
        optim_config(config, 1, max(config.total_steps, 1))
        distributed_options(config)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"bad config: {' '.join(str(err).split())}") from err
    if step_cfg.box_first_step > 0 and not model_cfg.supports_boxes:
        raise ValueError(f"bad config: --config.clicks.box_first_step={step_cfg.box_first_step} needs a box-capable "
                         f"model (--config.model.num_point_embeddings=4); this model has "
                         f"{model_cfg.num_point_embeddings} point embeddings")


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a (nested) ConfigDict or dict, dotted."""
    out = []
    for key, value in (config.items() if hasattr(config, "items") else []):
        if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
            out += flat_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def near_keys(key: str, valid: Iterable[str], n: int = 6) -> list[str]:
    """The valid keys closest to a misspelt ``key`` (same section first, then by similarity)."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=n, cutoff=0.5)
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in valid if section and k.startswith(section) and k not in close]
    return (close + siblings)[:n] or difflib.get_close_matches(key, valid, n=n, cutoff=0.0)


def is_run_key(key: str) -> bool:
    """Whether a dotted key is a run setting (free to change on resume) rather than part of the recipe."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUN_KEYS)
