"""Our side of the framework comparison, through the project's public API only.

Weights come from the PyTorch checkpoint through the converter CLI (``python -m sammed3d_jax.convert``, the path a
user takes with a released file) and are read back with ``load_params``. Inference and the encoder are ``Sam3D``
methods jitted here; the training step is the project's (``training.step.jit_train_step``) set up by
:func:`make_train_step`, the one place that knows how the training pieces fit together. Every program is compiled
ahead of time (``lower().compile()``) so compile time and run time are reported apart and XLA's memory analysis of
the very program that runs is available. No torch here.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import compare_common as cc
from sammed3d_jax import convert, parallel
from sammed3d_jax.checkpoint.params_io import load_params
from sammed3d_jax.model import ModelConfig, Sam3D, upsample_logits
from sammed3d_jax.shapes import ABSENT
from sammed3d_jax.training import losses, optim, setup as setup_lib, step as step_lib

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def convert_checkpoint(pth: str, out_dir: str, config: str) -> tuple[dict[str, Any], ModelConfig]:
    """Runs the converter CLI on ``pth`` into ``out_dir`` (replacing an earlier conversion there) and loads the
    result; raises if the CLI fails."""
    status = convert.main([pth, out_dir, "--config", config, "--overwrite"])
    if status:
        raise RuntimeError(f"python -m sammed3d_jax.convert {pth} {out_dir} exited with status {status}")
    variables, cfg, _ = load_params(out_dir)
    return variables, cfg


def with_precision(cfg: ModelConfig, variant: str, attention: str = "auto") -> ModelConfig:
    """``cfg`` computing in the variant's dtype (``fp32`` / ``bf16``) with the given attention implementation."""
    return cfg.replace(dtype=PRECISIONS[variant], attention_impl=attention)


def matmul_precision(cfg: ModelConfig):
    """Strict float32 matmuls and convolutions (no TF32) for float32 programs; the default for the others."""
    return jax.default_matmul_precision("float32" if cfg.dtype == "float32" else None)


def compile_program(fn: Callable, cfg: ModelConfig, *args) -> tuple[Any, float, float]:
    """``(compiled, compile seconds, program MiB)`` for ``jax.jit(fn)`` on ``args``; program memory is XLA's
    arguments + outputs + temporaries - donated aliases (NaN where the backend does not say)."""
    t0 = time.perf_counter()
    with matmul_precision(cfg):
        compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, program_mib(compiled)


def program_mib(compiled) -> float:
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2 ** 20
    except Exception:  # not every backend reports it
        return float("nan")


def encode_fn(cfg: ModelConfig) -> Callable:
    model = Sam3D(cfg)
    return lambda variables, volume: model.apply(variables, volume, method=Sam3D.encode)


def decode_fn(cfg: ModelConfig) -> Callable:
    """``(variables, emb, points, labels, low) -> (low, iou)``, mask token 0."""
    model = Sam3D(cfg)
    return lambda variables, emb, points, labels, low: model.apply(variables, emb, points, labels, low,
                                                                   method=Sam3D.decode)


def inference_fn(cfg: ModelConfig) -> Callable:
    """``(variables, volume, points, labels, zero_low) -> bool mask [b, S, S, S, 1]``: encode + one decode +
    trilinear upsampling + threshold (the same work as the PyTorch side's ``make_inference``)."""
    model = Sam3D(cfg)

    def infer(variables, volume, points, labels, low0):
        emb = model.apply(variables, volume, method=Sam3D.encode)
        low, _ = model.apply(variables, emb, points, labels, low0, method=Sam3D.decode)
        return upsample_logits(low, cfg.image_size) > 0

    return infer


def measure(compiled, args: tuple, warmup: int, repeats: int, device_kind: str, resident_bytes: int,
            compile_s: float, prog_mib: float) -> cc.Measurement:
    """Median seconds of ``compiled(*args)`` and its peak memory: XLA's program memory on accelerators, on CPU the
    measurement both sides share (``compare_common.measure_cpu``)."""
    if device_kind == "cpu":
        m = cc.measure_cpu(lambda: compiled(*args), jax.block_until_ready, warmup, repeats, resident_bytes)
    else:
        times = cc.time_calls(lambda: compiled(*args), jax.block_until_ready, warmup, repeats)
        m = cc.Measurement(seconds=float(np.median(times)), peak_mib=prog_mib, times=times)
    m.compile_s, m.program_mib = compile_s, prog_mib
    return m


def tree_bytes(*trees) -> int:
    return sum(int(x.nbytes) for t in trees for x in jax.tree_util.tree_leaves(t) if hasattr(x, "nbytes"))


def make_train_step(cfg: ModelConfig, variables: dict[str, Any], image: np.ndarray, label: np.ndarray,
                    clicks: int, accum_steps: int = 20, seed: int = 1):
    """The project's training step at upstream's recipe on one device, ready to call.

    Upstream's recipe: AdamW with 20-step gradient accumulation, ``clicks`` interaction steps per micro-batch
    (``min_clicks = max_clicks``), the click scan rematerialised; ``cfg`` sets the compute dtype and
    ``remat_encoder_blocks``. This function is the only glue between the benchmark and ``sammed3d_jax.training``.

    Args:
      cfg: model config.
      variables: initial ``{"params", "buffers"}`` (the converted weights).
      image: ``[b, S, S, S, 1]`` float32 volumes.
      label: ``[b, S, S, S]`` uint8 targets.
      clicks: interaction steps per micro-batch.
      accum_steps: micro-batches per optimizer update.
      seed: the train key's seed.

    Returns:
      ``(step, state, batch, key)``: ``step(state, batch, key) -> (state, metrics)`` is jitted with the state
      donated; the state, batch and key are already on the device.
    """
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    # The training loop's own set-up (state shardings, donated step); ``element`` keys each row's click draws.
    setup = setup_lib.build(cfg, optim.OptimConfig(accum_steps=accum_steps),
                            step_lib.StepConfig(max_clicks=clicks, min_clicks=clicks), mesh)
    state = setup.from_variables(variables)
    step = setup.train_step
    batch = setup_lib.place_batch({"image": image, "label": label,
                                   "element": np.arange(image.shape[0], dtype=np.int32)}, mesh)
    key = parallel.put_replicated(jax.random.key(seed), mesh)
    return step, state, batch, key


def time_train(cfg: ModelConfig, variables, image, label, clicks: int, warmup: int, steps: int) -> cc.Measurement:
    """Compiles and times the training step (median over ``steps`` after ``warmup`` calls; the state is threaded
    through the calls and donated each time). Peak memory as :func:`measure`."""
    step, state, batch, key = make_train_step(cfg, variables, image, label, clicks)
    t0 = time.perf_counter()
    with matmul_precision(cfg):
        compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        return metrics["loss"]

    m = measure(call, (), warmup, steps, jax.devices()[0].platform, tree_bytes(state, batch), compile_s,
                program_mib(compiled))
    loss = float(call())
    if not np.isfinite(loss):
        return cc.Measurement(note=f"non-finite loss {loss}")
    return m


def click_ops(cfg: ModelConfig, variables, next_click, embedding=None) -> cc.ClickOps:
    """Our operations for ``compare_common.interaction`` (channels-last; ``gt`` is bool ``[b, S, S, S]``).

    A prompt-less pass is the train step's: the click slot marked ``ABSENT``, which the model masks out, exactly
    upstream's ``points=None`` call (one decoder program for both kinds of step). ``embedding`` skips the encoder
    (the loss parity of the loop reuses the parity run's embedding).
    """
    model = Sam3D(cfg)
    g4 = cfg.low_res_size
    encode = jax.jit(encode_fn(cfg))
    dec = jax.jit(lambda v, emb, pts, lbl, low: model.apply(v, emb, pts, lbl, low, method=Sam3D.decode)[0])
    up = jax.jit(lambda low: upsample_logits(low, cfg.image_size)[..., 0])
    loss = jax.jit(losses.dice_ce_loss)

    def decode(emb, pts, lbl, low):
        if pts is None:
            b = emb.shape[0]
            pts, lbl = jnp.zeros((b, 1, 3), jnp.float32), jnp.full((b, 1), ABSENT, jnp.int32)
        return dec(variables, emb, pts, lbl.astype(jnp.int32), low)

    return cc.ClickOps(
        encode=(lambda x: embedding) if embedding is not None else (lambda x: encode(variables, x)),
        decode=decode, upsample=up, loss=loss, next_click=next_click,
        zero_logits=lambda emb: jnp.zeros((emb.shape[0], g4, g4, g4, 1), jnp.float32))


def keyed_clicks(keys: jax.Array, record: list | None = None):
    """A ``next_click`` drawing the train step's clicks (``training.step.click_per_sample`` with its per-sample keys,
    ``training.step.sample_keys``) from ``full > 0.5``; appends each ``(points [b, 3], labels [b])`` as numpy to
    ``record`` when given."""
    draw = jax.jit(step_lib.click_per_sample)

    def next_click(step, gt, full):
        pred = jnp.zeros_like(gt) if full is None else full > cc.CLICK_LOGIT_THRESHOLD
        pts, lbl = draw(keys, step, gt, pred)
        if record is not None:
            record.append((np.asarray(pts), np.asarray(lbl)))
        return pts[:, None, :], lbl[:, None]

    return next_click
