"""train_and_evaluate(config, workdir): a training run as named steps; the only module of training/ with side effects.

:func:`start_run` checks the config, joins the cluster, checks the devices, builds the mesh and the shared set-up
(``training/setup.py``); :func:`restore_or_init` resumes from the newest intact checkpoint (any topology) or creates
the state; :func:`train_steps` runs the jitted step, writes metrics, validation, checkpoints and profiles, and stops
on a signal (all processes at the same step, ``training/preemption.py``) or on divergence; :func:`finish_run` waits
for the saves, exports ``params/`` (from any number of processes) and prints the summary. Every path is an
``etils.epath`` path (``gs://`` workdirs work). RNG: one ``jax.random.key(config.seed)`` split into ``init`` /
``train`` / ``eval`` streams. Nothing imports this module except entry points and tests.
"""

import dataclasses
import logging
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sammed3d_jax import cluster, parallel, writers
from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.compile_cache import CompileClock
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.training import (data_feed, observe, preemption, run_config, run_record, setup as setup_lib,
                                   state as state_lib, validation)

log = logging.getLogger(__name__)
SCALAR_LAST = ("lr", "updates", "skipped")  # Reported at the interval's end, not averaged.
_HIDDEN = ("stop", "insert_at", "skipped_now")  # Step outputs used by the loop, not logged.


@dataclasses.dataclass
class Run:
    """What every step of a run needs (built by :func:`start_run`)."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    primary: bool
    model_cfg: ModelConfig
    mesh: Any
    setup: setup_lib.TrainSetup
    prepared: str
    total_steps: int
    launched_by: str
    keys: tuple  # (init, train, eval), replicated


def _host(tree: Any) -> Any:
    """Host copy of replicated (or sharded) global arrays, on any number of processes."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else jax.device_get(tree)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def prepared_data_dir(config: ml_collections.ConfigDict, workdir: epath.Path) -> str:
    """The prepared store to train on; generates and prepares a synthetic dataset when configured and none is given."""
    if config.data.prepared_dir:
        if not epath.Path(config.data.prepared_dir).is_dir():
            raise FileNotFoundError(f"--config.data.prepared_dir={config.data.prepared_dir} does not exist; create "
                                    "it with `python -m sammed3d_jax.data.prepare SRC OUT`")
        return str(config.data.prepared_dir)
    if config.data.synthetic_cases <= 0:
        raise ValueError("no training data: set --config.data.prepared_dir=<prepared store> "
                         "(or --config.data.synthetic_cases=N for a synthetic dataset)")
    from sammed3d_jax.data.prepare import prepare_dataset
    from sammed3d_jax.data.synthetic import make_synthetic_dataset

    raw, prepared = workdir / "data" / "synthetic", workdir / "data" / "prepared"
    if jax.process_index() == 0:
        if not (raw / "dataset.json").exists():
            log.info("generating %d synthetic cases in %s", config.data.synthetic_cases, raw)
            make_synthetic_dataset(str(raw), config.data.synthetic_cases, seed=config.seed)
        prepare_dataset(str(raw), str(prepared), workers=1, progress=False)  # Reuses finished cases on a rerun.
    if jax.process_count() > 1:
        parallel.barrier("synthetic data ready")
    return str(prepared)


def _steps_per_epoch(config: ml_collections.ConfigDict, prepared: str) -> int:
    if config.steps_per_epoch:
        return int(config.steps_per_epoch)
    from sammed3d_jax.data import cache, pipeline

    _, records = cache.read_index(prepared)
    eligible = [r for r in records if r.foreground_voxels > config.data.min_crop_foreground]
    train = pipeline.select_subset(eligible, config.validation.holdout_fraction, "train")
    return max(1, len(train) // config.batch_size)


def start_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks the config, joins the cluster, builds the mesh, the data source and the jitted functions."""
    run_config.validate(config)
    opts = run_config.distributed_options(config)
    launched_by = cluster.initialize(opts)
    cluster.check_launch(opts)
    if config.require_init and not config.init_from:
        raise ValueError("this config fine-tunes a converted checkpoint: set --config.init_from=<params dir> "
                         "(python -m sammed3d_jax.convert CHECKPOINT OUT_DIR)")
    path = orbax_io.run_path(workdir)
    if config.resume and not (path / orbax_io.CHECKPOINT_DIR).exists():  # Before anything is written.
        raise FileNotFoundError(f"--resume: {path / orbax_io.CHECKPOINT_DIR} holds no checkpoint to resume from "
                                "(check --workdir, or drop --resume to start a new run)")
    s = config.sharding
    mesh = parallel.make_mesh(tuple(tuple(a) for a in s.mesh), dcn_spec=tuple(tuple(a) for a in s.dcn_mesh),
                              granule=s.dcn_granule)
    parallel.check_batch_divisible(config.batch_size, mesh)
    model_cfg = run_config.model_config(config)
    prepared = prepared_data_dir(config, path)
    steps_per_epoch = _steps_per_epoch(config, prepared)
    total = run_config.total_steps(config, steps_per_epoch)
    if config.optim.warmup_steps * config.optim.accum_steps > total:
        raise ValueError(f"--config.optim.warmup_steps={config.optim.warmup_steps} updates is more than the run's "
                         f"{total // config.optim.accum_steps} updates")
    setup = setup_lib.build(model_cfg, run_config.optim_config(config, steps_per_epoch, total),
                            run_config.step_config(config), mesh, rules=tuple(tuple(r) for r in s.rules),
                            fsdp_axis=s.fsdp_axis, compiler_options=config.compiler_options.to_dict())
    keys = parallel.put_replicated(tuple(jax.random.split(jax.random.key(config.seed), 3)), mesh)
    return Run(config, path, jax.process_index() == 0, model_cfg, mesh, setup, prepared, total, launched_by, keys)


def restore_or_init(run: Run, manager, allow_recipe_change: bool) -> tuple[Any, int, dict[str, Any]]:
    """The starting state: the newest intact checkpoint on ``--resume``, else a fresh or fine-tuning init.

    Returns:
      ``(state, step, data_position)``.
    """
    config, workdir = run.config, run.workdir
    latest = manager.latest_step()
    if latest is not None and not config.resume:
        raise FileExistsError(f"{workdir} already holds a run (checkpoints up to step {latest}); continue it with "
                              f"`python train.py --workdir {workdir} --resume`, or start a new run with another "
                              "--workdir")
    if latest is None and config.resume:
        raise FileNotFoundError(f"--resume: {workdir / orbax_io.CHECKPOINT_DIR} holds no checkpoint to resume "
                                "from (check --workdir, or drop --resume to start a new run)")
    if latest is None:
        state = (run.setup.from_variables(orbax_io.load_init_variables(config.init_from, run.model_cfg))
                 if config.init_from else run.setup.init(run.keys[0]))
        if run.primary:
            run_record.write_config(workdir, config)
            orbax_io.save_model_config(workdir, run.model_cfg)
        return state, 0, {}
    stored = run_record.stored_config(workdir)
    diff = run_record.changes(stored, config) if stored is not None else {}
    run_record.check_changes(diff, workdir, allow_recipe_change)
    orbax_io.check_compatible(orbax_io.load_model_config(workdir), run.model_cfg, str(workdir))
    step, state, position = orbax_io.restore_intact(manager, run.setup.restore_target(),
                                                    lambda s: bool(_host(_all_finite(s))))
    if run.primary:
        run_record.record_resume(workdir, step, diff, f"{jax.process_count()}x{jax.local_device_count()}")
        log.info("resumed from step %d of %s%s", step, workdir,
                 f" with changed settings {sorted(diff)}" if diff else "")
    return state, step, position


def _summarise(pending: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the logging interval (NaN-aware), the last value of counters."""
    fetched = _host(pending)
    out = {}
    for key in fetched[0]:
        if key in _HIDDEN:
            continue
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


def _stopped_message(signals: preemption.StopSignals, step: int, workdir: epath.Path) -> str:
    by = signals.name or "a stop request from another process"
    return (f"stopped by {by} at step {step}; checkpoint {step} saved; resume with: "
            f"python train.py --workdir {workdir} --resume")


def _count_skips(config: ml_collections.ConfigDict, skips: int, step: int, last_saved: int) -> int:
    """Returns ``skips`` (skipped micro-batches in a row up to ``step``); raises ``preemption.Diverged`` at the
    configured limit."""
    if config.optim.max_consecutive_skips and skips >= config.optim.max_consecutive_skips:
        raise preemption.Diverged(
            f"stopped at step {step}: {skips} micro-batches in a row had non-finite gradients (updates skipped); "
            f"nothing saved or exported, the checkpoints up to step {last_saved} are kept; lower --config.optim.lr "
            "or set --config.optim.clip_grad_norm")
    return skips


def train_steps(run: Run, state: Any, start: int, feed: data_feed.DataFeed, manager, writer: writers.MetricWriter,
                validator: validation.Validator | None, signals: preemption.StopSignals) -> tuple[Any, int, dict]:
    """Runs steps ``start + 1 .. total_steps`` (or until a stop); returns ``(state, last step, last summary)``.

    Raises:
      preemption.Preempted: after saving, when a stop signal reached any process.
      preemption.Diverged: after ``optim.max_consecutive_skips`` skipped micro-batches in a row, or non-finite
        params at a save (nothing is saved then).
    """
    config, total = run.config, run.total_steps
    train_fn, train_key = run.setup.train_step, run.keys[1]
    profile = observe.ProfileWindow(tuple(config.profile_steps), str(run.workdir / "profile"))
    timer, flops = None, None
    pending, previous, skips, last_saved, summary, step = [], None, 0, start, {}, start
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not (run.primary and
                                                                                          config.progress))
    writer.echo = bar.write
    try:
        for step in range(start + 1, total + 1):
            if config.stop_after_steps and step - start > config.stop_after_steps:
                step -= 1
                break  # Simulated kill (tests): leave without a final checkpoint.
            profile.before_step(step)
            batch, waited = feed.next(signals.requested)
            if timer is None:  # The first step compiles; its FLOP count comes from the same compilation.
                t0 = time.perf_counter()
                with CompileClock() as clock:
                    flops = setup_lib.compiled_flops(train_fn, state, batch, train_key)
                parallel.barrier("train step compiled")  # Compile times differ; the step's collectives must not.
            state, metrics = train_fn(state, batch, train_key)
            pending.append(metrics)
            bar.update(1)
            profile.after_step(step, metrics)
            if timer is None:
                jax.block_until_ready(metrics)
                hits = f" ({clock.cache_hits} programs from the compilation cache)" if clock.cache_hits else ""
                log.info("first step took %.1f s, compiling %.1f s%s", time.perf_counter() - t0, clock.compile_s, hits)
                timer = observe.StepTimer(config.batch_size, jax.device_count(), flops, observe.peak_flops(
                    jax.devices()[0].device_kind, config.observe.peak_tflops))
            else:
                timer.waited(waited)
                timer.step_done()
            if previous is not None:  # The previous step's verdicts: every process reads the same values.
                stop, skipped = (int(v) for v in _host((previous["stop"], previous["skipped_now"])))
                skips = _count_skips(config, skips + 1 if skipped else 0, step - 1, last_saved)
                if stop and step < total:  # (At the last step the run simply ends, with its final save.)
                    writer.write_scalars(step, _summarise(pending) | timer.summary())  # The record up to the save.
                    _save(run, manager, step, state, metrics, feed, force=True)
                    orbax_io.finish(manager)
                    raise preemption.Preempted(_stopped_message(signals, step, run.workdir), signals.exit_status)
            previous = metrics
            if step % config.log_every_steps == 0 or step == total:
                summary = _summarise(pending) | timer.summary()
                if validator is not None and step % config.validation.every_steps == 0:
                    summary |= validator(state.params, state.buffers)
                writer.write_scalars(step, summary)
                bar.set_postfix(loss=f"{summary['loss']:.3f}", dice=f"{summary['dice_last']:.3f}")
                pending = []
                timer.reset()
            elif validator is not None and step % config.validation.every_steps == 0:
                writer.write_scalars(step, validator(state.params, state.buffers))
            try:
                if _save(run, manager, step, state, metrics, feed, force=step == total and last_saved != step):
                    last_saved = step
            except OSError as err:  # Unwritable or full: stop now, with what could still be exported.
                raise OSError(f"{err}; {_rescue_export(run, state, step)}") from err
            if step % config.plot_every_steps == 0:
                writer.plot(run.workdir / "curves.png")
    finally:
        profile.stop()
        bar.close()
    return state, step, summary


def _save(run: Run, manager, step: int, state: Any, metrics: dict, feed: data_feed.DataFeed, force: bool) -> bool:
    """Saves checkpoint ``step`` when due; never a state with non-finite params."""
    if not (force or manager.should_save(step)):
        return False
    if not np.isfinite(float(_host(metrics["param_norm"]))):
        raise preemption.Diverged(f"params became non-finite at step {step}: not saved; the earlier checkpoints are "
                                  "kept; lower --config.optim.lr or set --config.optim.clip_grad_norm")
    return orbax_io.save(manager, step, state, feed.position(), force=force)


def export_params(run: Run, state: Any, step: int) -> epath.Path:
    """Writes ``<workdir>/params`` (the converted-params format of eval/predict) from any number of processes."""
    from sammed3d_jax.checkpoint.params_io import save_params

    target = run.workdir / "params"
    save_params(target, _host(state.variables), run.model_cfg,
                {"source": "sammed3d_jax training", "workdir": str(run.workdir), "step": int(step)}, overwrite=True)
    return target


def _rescue_export(run: Run, state: Any, step: int) -> str:
    """After a failed checkpoint write: exports the params if possible; says what happened."""
    if not run.config.export_params:
        return "no params exported (export_params is off)"
    try:
        return f"params of step {step} exported to {export_params(run, state, step)}"
    except Exception as err:  # pylint: disable=broad-except  # Report both failures in one line.
        return f"the params could not be exported either ({' '.join(str(err).split())})"


def _summary_line(run: Run, start: int, step: int, summary: dict, params: epath.Path | None, seconds: float) -> str:
    parts = [f"trained steps {start + 1}-{step} of {run.total_steps} in {seconds / 60:.1f} min"]
    for key in ("loss", "dice_last", "val_dice_1", f"val_dice_{run.config.validation.clicks}"):
        if isinstance(summary.get(key), (float, np.floating)) and np.isfinite(summary[key]):
            parts.append(f"{key} {float(summary[key]):.4g}")
    parts.append(f"checkpoints in {run.workdir / orbax_io.CHECKPOINT_DIR}")
    if params is not None:
        parts.append(f"params in {params}; next: python eval.py --checkpoint {run.workdir}")
    return "; ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, allow_recipe_change: bool = False
                       ) -> state_lib.TrainState:
    """Trains as ``config`` says, writing checkpoints, metrics, TensorBoard events and curves into ``workdir``.

    Args:
      config: a training ConfigDict (``configs/common.py`` lists every key).
      workdir: run directory, local or ``gs://...``.
      allow_recipe_change: on resume, accept changes to the run's recipe (they are recorded in ``resumes.jsonl``).

    Returns:
      The final TrainState (global arrays).

    Raises:
      preemption.RunStopped: the run stopped early (signal: checkpoint saved; divergence: nothing saved).
    """
    t_start = time.perf_counter()
    run = start_run(config, workdir)
    c = config.checkpoint
    orbax_io.check_writable(run.workdir / orbax_io.CHECKPOINT_DIR)
    manager = orbax_io.make_manager(run.workdir, save_every=c.every_steps, keep=c.keep, async_save=c.async_save,
                                    async_timeout_s=c.async_timeout_s)
    feed = None
    try:
        state, start, position = restore_or_init(run, manager, allow_recipe_change)
        d = config.data
        settings = data_feed.DataSettings(
            seed=config.seed, crop_size=run.model_cfg.image_size, normalization=d.normalization, ct_clip=d.ct_clip,
            min_crop_foreground=d.min_crop_foreground, flip_axes=tuple(d.flip_axes),
            holdout_fraction=config.validation.holdout_fraction, worker_count=d.worker_count,
            read_threads=d.read_threads, prefetch_batches=d.prefetch_batches,
            target_offset=float(d.get("target_offset", 0.0)),
            target_offset_prob=float(d.get("target_offset_prob", 1.0)),
            offset_mode=str(d.get("offset_mode", "uniform")))
        feed = data_feed.DataFeed(run.prepared, settings, run.mesh, config.batch_size)
        if start:
            feed.restore(position, start)
        if run.primary:
            log.info(cluster.topology_line(run.mesh, global_batch=config.batch_size, rows_per_process=len(feed.rows),
                                           launched_by=run.launched_by))
        writer = writers.MetricWriter(run.workdir, is_primary=run.primary, tensorboard=config.observe.tensorboard,
                                      start_step=start)
        writer.truncate(start)
        validator = None
        if config.validation.every_steps:
            batches = data_feed.holdout_input(run.prepared, settings, run.mesh, config.batch_size,
                                              config.validation.max_batches)
            shardings = (run.setup.shardings.params, run.setup.shardings.buffers)
            validator = validation.Validator(run.model_cfg, run_config.validation_step_config(config), run.mesh,
                                             shardings, batches, run.keys[2], config.compiler_options.to_dict() or None)
        with preemption.StopSignals() as signals:
            state, step, summary = train_steps(run, state, start, feed, manager, writer, validator, signals)
    except BaseException:
        if feed is not None:
            feed.close()
        manager.close()
        raise
    feed.close()
    try:
        orbax_io.finish(manager)
    except OSError as err:
        raise OSError(f"{err}; {_rescue_export(run, state, step)}") from err
    writer.plot(run.workdir / "curves.png")
    params = None
    if config.export_params and step == run.total_steps:
        params = export_params(run, state, step)
    if run.primary and step > start:
        print(_summary_line(run, start, step, summary, params, time.perf_counter() - t_start), flush=True)
    if jax.process_count() > 1:  # Leave together: no process reaches JAX's shutdown barrier while others still work.
        parallel.barrier("run finished")
    return state
