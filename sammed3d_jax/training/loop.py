"""train_and_evaluate(config, workdir): the training run, and the only module of training/ with side effects.

It turns the ConfigDict into the typed configs of the pure modules (ModelConfig, OptimConfig, StepConfig), builds the
mesh and the data pipeline (each process reads its own shard), creates or restores the sharded TrainState, runs the
jitted step with a tqdm bar, writes metrics (JSON lines + PNG, process 0 only) and Orbax checkpoints, and exports
the final params in the converted-params format for evaluation. RNG: one ``jax.random.key(config.seed)`` split into
named streams ``init`` / ``train``; the step folds its step number into ``train``. Nothing imports this module except
entry points and tests.
"""

import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sammed3d_jax import parallel, writers
from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.sam import init_variables
from sammed3d_jax.training import optim, state as state_lib, step as step_lib

log = logging.getLogger(__name__)
SCALAR_LAST = ("lr", "updates", "skipped")  # Reported at the interval's end, not averaged.


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
        use_bce=config.loss.use_bce, click_threshold=c.threshold, remat_clicks=c.remat)


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


def prepared_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The prepared store to train on; generates and prepares a synthetic dataset when configured and none is given."""
    if config.data.prepared_dir:
        if not os.path.isdir(config.data.prepared_dir):
            raise FileNotFoundError(f"config.data.prepared_dir={config.data.prepared_dir!r} does not exist; create "
                                    "it with `python -m sammed3d_jax.data.prepare SRC OUT`")
        return config.data.prepared_dir
    if config.data.synthetic_cases <= 0:
        raise ValueError("no training data: set --config.data.prepared_dir=<prepared store> "
                         "(or --config.data.synthetic_cases=N for a synthetic dataset)")
    from sammed3d_jax.data.prepare import prepare_dataset
    from sammed3d_jax.data.synthetic import make_synthetic_dataset

    raw = os.path.join(workdir, "data", "synthetic")
    prepared = os.path.join(workdir, "data", "prepared")
    if jax.process_index() == 0:
        if not os.path.exists(os.path.join(raw, "dataset.json")):
            log.info("generating %d synthetic cases in %s", config.data.synthetic_cases, raw)
            make_synthetic_dataset(raw, config.data.synthetic_cases, seed=config.seed)
        prepare_dataset(raw, prepared, workers=1, progress=False)  # Reuses finished cases on a rerun.
    multihost_utils.sync_global_devices("synthetic data ready")
    return prepared


def _eligible_records(prepared: str, min_foreground: int) -> int:
    from sammed3d_jax.data import cache

    _, records = cache.read_index(prepared)
    return sum(r.foreground_voxels > min_foreground for r in records)


def _summarise(pending: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the logging interval (NaN-aware), the last value of counters."""
    fetched = jax.device_get(pending)
    out = {}
    for key in fetched[0]:
        values = np.stack([np.asarray(m[key], np.float64) for m in fetched])
        if key in SCALAR_LAST:
            out[key] = values[-1]
        elif np.all(np.isnan(values)):
            out[key] = float("nan") if values.ndim == 1 else np.full(values.shape[1:], np.nan)
        else:
            with warnings.catch_warnings():  # A click slot inactive for the whole interval is NaN, not a warning.
                warnings.simplefilter("ignore", RuntimeWarning)
                out[key] = np.nanmean(values, axis=0)
    return out


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drops records past the restored step (written by the run that was killed after its last checkpoint)."""
    records = writers.read_metrics(path)
    if any(r["step"] > last_step for r in records):
        with open(path, "w") as f:
            for r in records:
                if r["step"] <= last_step:
                    f.write(json.dumps(r) + "\n")


class _Setup(NamedTuple):
    abstract: Any
    shardings: Any
    init: Callable
    from_variables: Callable
    train_step: Callable


@functools.lru_cache(maxsize=4)
def _setup(cfg: ModelConfig, optim_cfg: optim.OptimConfig, step_cfg: step_lib.StepConfig, mesh: Mesh,
           rules: tuple, fsdp_axis: str, compiler_options: tuple) -> _Setup:
    """The jitted init and train-step functions for one (hashable) configuration.

    Memoised so that runs of the same configuration in one process (a resumed run in tests, a sweep in a notebook)
    reuse jax's compiled executables instead of compiling again.
    """
    optimizer = optim.make_optimizer(optim_cfg)

    def from_variables(variables):
        return state_lib.create_train_state(variables, optimizer.tx)

    def fresh(key):
        return from_variables(init_variables(cfg, key))

    abstract = jax.eval_shape(fresh, jax.random.key(0))
    shardings = state_lib.state_shardings(abstract, rules, mesh, fsdp_axis)
    options = dict(compiler_options) or None
    return _Setup(abstract, shardings, jax.jit(fresh, out_shardings=shardings, compiler_options=options),
                  jax.jit(from_variables, out_shardings=shardings),
                  step_lib.jit_train_step(cfg, optimizer, step_cfg, mesh, shardings, options))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
    """Trains as ``config`` says, writing checkpoints, metrics and curves into ``workdir``.

    Args:
      config: a training ConfigDict (``configs/common.py`` lists every key).
      workdir: run directory; ``checkpoints/``, ``metrics.jsonl``, ``curves.png``, ``model_config.json``,
        ``config.json`` and (single-process) ``params/`` go here.

    Returns:
      The final TrainState (global arrays).
    """
    parallel.maybe_initialize_distributed(config.distributed)
    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
    cfg = model_config(config)
    if config.require_init and not config.init_from:
        raise ValueError("this config fine-tunes a converted checkpoint: set --config.init_from=<params dir> "
                         "(python -m sammed3d_jax.convert CHECKPOINT OUT_DIR)")

    mesh = parallel.make_mesh(tuple(tuple(a) for a in config.sharding.mesh))
    parallel.check_batch_divisible(config.batch_size, mesh)
    prepared = prepared_data_dir(config, workdir)
    steps_per_epoch = config.steps_per_epoch or max(
        1, _eligible_records(prepared, config.data.min_crop_foreground) // config.batch_size)
    total_steps = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
    rules = tuple(tuple(r) for r in config.sharding.rules)
    setup = _setup(cfg, optim_config(config, steps_per_epoch, total_steps), step_config(config), mesh, rules,
                   config.sharding.fsdp_axis, tuple(sorted(config.compiler_options.to_dict().items())))
    init_key, train_key = parallel.put_replicated(tuple(jax.random.split(jax.random.key(config.seed))), mesh)

    from sammed3d_jax.data.pipeline import build_train_iterator

    d = config.data
    data_iter = build_train_iterator(
        prepared, worker_count=d.worker_count, read_threads=d.read_threads, prefetch_batches=d.prefetch_batches,
        crop_size=cfg.image_size, global_batch_size=config.batch_size, seed=config.seed,
        rows=range(jax.process_index() * config.batch_size // jax.process_count(),
                   (jax.process_index() + 1) * config.batch_size // jax.process_count()), normalization=d.normalization,
        ct_clip=d.ct_clip, min_crop_foreground=d.min_crop_foreground, flip_axes=tuple(d.flip_axes))

    from sammed3d_jax.data.augment import finish_batch

    finish = jax.jit(functools.partial(finish_batch, normalization=d.normalization))
    manager = orbax_io.make_manager(workdir, save_every=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
    latest = orbax_io.latest_step(manager)
    writer = writers.MetricWriter(workdir, is_primary=primary)
    if latest is not None and not config.resume:
        manager.close()
        raise FileExistsError(f"{manager.directory} already holds checkpoints (latest step {latest}); pass --resume "
                              "to continue that run or choose a new --workdir")
    if latest is not None:
        orbax_io.check_compatible(orbax_io.load_model_config(workdir), cfg, workdir)
        state = orbax_io.restore(manager, orbax_io.abstract_with_shardings(setup.abstract, setup.shardings),
                                 data_iter)
        if primary:
            _truncate_metrics(writer.path, latest)
        log.info("resumed from step %d", latest)
    elif config.init_from:
        variables = orbax_io.load_init_variables(config.init_from, cfg)
        state = setup.from_variables(variables)
    else:
        state = setup.init(init_key)
    if primary:
        orbax_io.save_model_config(workdir, cfg)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_fn = setup.train_step
    start = int(jax.device_get(state.step))
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (primary and config.progress))
    writer.echo = bar.write
    pending, last_saved, t0, timed = [], latest, time.perf_counter(), 0
    step = start
    for step in range(start + 1, total_steps + 1):
        if config.stop_after_steps and step - start > config.stop_after_steps:
            step -= 1
            break  # Simulated interruption: leave without a final checkpoint.
        host = next(data_iter)
        raw = parallel.shard_host_batch({k: host[k] for k in ("image", "label", "flip", "ct_clip")}, mesh)
        finished = finish(raw)  # Clip, normalisation and flips on the devices (data/augment.py).
        batch = {"image": finished["image"], "label": finished["label"]}
        state, metrics = train_fn(state, batch, train_key)
        pending.append(metrics)
        bar.update(1)
        if step == start + 1:  # The first step compiles: time the throughput from the end of it.
            jax.block_until_ready(metrics)
            log.info("first step (compilation included) took %.1f s", time.perf_counter() - t0)
            t0, timed = time.perf_counter(), 0
        else:
            timed += 1
        if step % config.log_every_steps == 0 or step == total_steps:
            summary = _summarise(pending)
            if timed:
                summary["samples_per_s"] = config.batch_size * timed / max(time.perf_counter() - t0, 1e-9)
            writer.write_scalars(step, summary)
            bar.set_postfix(loss=f"{summary['loss']:.3f}", dice=f"{summary['dice_last']:.3f}")
            pending, t0, timed = [], time.perf_counter(), 0
        if orbax_io.save(manager, step, state, data_iter, force=step == total_steps and last_saved != step):
            last_saved = step
        if step % config.plot_every_steps == 0:
            writer.plot(os.path.join(workdir, "curves.png"))
    bar.close()
    manager.wait_until_finished()
    manager.close()
    data_iter.close()
    writer.plot(os.path.join(workdir, "curves.png"))
    if config.export_params and step == total_steps and jax.process_count() == 1:
        from sammed3d_jax.checkpoint.params_io import save_params

        variables = jax.device_get(state.variables)
        save_params(os.path.join(workdir, "params"), variables, cfg,
                    {"source": "sammed3d_jax training", "workdir": workdir, "step": int(step)}, overwrite=True)
    return state
