"""The train step: upstream's interactive click loop as one pure, jit-able function over a device mesh.

One step = one micro-batch. The encoder runs once; a fixed-length ``lax.scan`` over ``max_clicks`` then simulates
the interaction. ``num_clicks`` is a traced int (drawn on device per step), and steps ``s >= num_clicks`` are skipped
by ``lax.cond``, so changing it never recompiles. The scan body is rematerialised (``jax.checkpoint``) so the backward
pass stores only the small carry per click; ``ModelConfig.remat_encoder_blocks`` does the same for the encoder.

Where we follow upstream (``train.py::BaseTrainer``, spec §4.2-4.4) and where we knowingly differ:

=========================================  ====================================================================
Upstream                                   Here
=========================================  ====================================================================
encoder once per batch, trained            same
11 interaction steps, hard-coded           ``max_clicks`` (default 11); ``num_clicks`` drawn in
                                           ``[min_clicks, max_clicks]`` per step (default 11..11 = upstream)
click from ``prev_masks > 0.5`` on LOGITS  same by default (quirk 8, ``click_threshold=0.5``); 0.0 = prob 0.5
(quirk 8); first click from zeros
click drawn every step (numpy global RNG)  drawn every step on device by ``sample_click`` with
                                           ``fold_in(key, s)``; the key is ``fold_in(train_key, state.step)``
prompt-less pass at a random step in       same: ``random_insert`` inclusive range (2, 8) and the last active
{2..8} and at the last step                step (``prompt_less_last``); prompt-less = an all-ABSENT point row,
                                           exactly upstream's ``points=None`` call
only the newest click is fed (quirk 11)    same by default; ``accumulate_clicks`` keeps all clicks so far in an
                                           ABSENT-padded buffer (upstream ``--multi_click``); clicks drawn at
                                           prompt-less steps stay in the buffer
previous low-res logits fed back, NOT      same (quirk 12); ``stop_mask_gradient`` detaches them
detached
DiceCE (MONAI, squared_pred) per click,    same, float32; ``use_bce=False`` gives MONAI < 1.3's Dice-only
summed over the 11 clicks                  loss (quirk 7)
loss / 20 then backward per micro-batch;   mean of micro-batch gradients over ``accum_steps`` (optax.MultiSteps):
update when ``step % 20 == 0 and step``    every update takes exactly ``accum_steps`` micro-batches; upstream's
(first update after 21; quirk 13);         first takes 21. No epoch-end drop of leftover gradients (the
leftovers dropped each epoch               accumulator carries over)
float16 autocast + GradScaler              ``ModelConfig.dtype`` compute (bf16 on accelerators) with float32
                                           params, loss and logits; no loss scaling needed for bf16; non-finite
                                           micro-batches skipped and counted (GradScaler skips fp16 overflows)
DDP never all-reduces gradients: each      the batch is sharded over the mesh and the loss is the mean over
rank trains its own replica (quirk 14)     the GLOBAL batch, so gradients are averaged across devices/hosts
logged Dice = Dice(prev_masks > 0.5)       same threshold on logits; per click, and the final one
=========================================  ====================================================================

Must not import data/pipeline code or ml_collections; it imports the model, ``data.clicks`` (jnp only) and optax.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sammed3d_jax import parallel
from sammed3d_jax.data.clicks import sample_click
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.sam import Sam3D, upsample_logits
from sammed3d_jax.shapes import ABSENT
from sammed3d_jax.training import losses, optim
from sammed3d_jax.training.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The interaction simulated in each train step (defaults = upstream's training).

    Attributes:
      max_clicks: length of the scan (compiled once).
      min_clicks: clicks per step are drawn uniformly in ``[min_clicks, max_clicks]`` on device.
      random_insert: inclusive ``(lo, hi)`` range of the step made prompt-less at random (upstream ``randint(2, 9)``);
        ``()`` disables it.
      prompt_less_last: the last active step is prompt-less (upstream).
      accumulate_clicks: feed all clicks so far instead of only the newest one.
      stop_mask_gradient: detach the fed-back mask logits.
      use_bce: include BCE in the loss.
      click_threshold: logit threshold of the prediction from which clicks are drawn and Dice is measured.
      remat_clicks: rematerialise the scan body in the backward pass (memory: only the carry is stored per click).
    """

    max_clicks: int = 11
    min_clicks: int = 11
    random_insert: tuple[int, ...] = (2, 8)
    prompt_less_last: bool = True
    accumulate_clicks: bool = False
    stop_mask_gradient: bool = False
    use_bce: bool = True
    click_threshold: float = 0.5
    remat_clicks: bool = True

    def __post_init__(self):
        if not 1 <= self.min_clicks <= self.max_clicks:
            raise ValueError(f"need 1 <= min_clicks ({self.min_clicks}) <= max_clicks ({self.max_clicks})")
        if self.random_insert and (len(self.random_insert) != 2 or self.random_insert[0] > self.random_insert[1]):
            raise ValueError(f"random_insert must be () or an inclusive (lo, hi), lo <= hi; got {self.random_insert}")
        object.__setattr__(self, "random_insert", tuple(int(v) for v in self.random_insert))


def interactive_loss(params: Any, buffers: Any, batch: Batch, key: jax.Array, num_clicks: jax.Array, *,
                     model: Sam3D, cfg: StepConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over the active clicks of the DiceCE loss of upstream's simulated interaction.

    Args:
      params: trainable model params.
      buffers: model buffers (constant).
      batch: ``{"image": f32 [b,S,S,S,1], "label": [b,S,S,S] (nonzero = foreground)}``.
      key: PRNG key of this micro-batch.
      num_clicks: int32 scalar in ``[1, max_clicks]``; later scan steps are skipped.
      model: the Sam3D module.
      cfg: interaction settings.

    Returns:
      ``(loss, aux)``: the float32 summed loss and ``{"dice_per_click": f32 [max_clicks] (NaN where inactive),
      "loss_per_click": f32 [max_clicks] (0 where inactive)}``.
    """
    variables = {"params": params, "buffers": buffers}
    image, gt = batch["image"], batch["label"] > 0
    b, size = image.shape[0], image.shape[1]
    emb = model.apply(variables, image, method=Sam3D.encode)
    k_insert, k_clicks = jax.random.split(key)
    if cfg.random_insert:
        insert_at = jax.random.randint(k_insert, (), cfg.random_insert[0], cfg.random_insert[1] + 1)
    else:
        insert_at = jnp.asarray(-1, jnp.int32)
    low_size = model.cfg.low_res_size
    low0 = jnp.zeros((b, low_size, low_size, low_size, 1), jnp.float32)
    # Click 0 comes from an all-background prediction (upstream's zero prev_masks); later clicks are drawn at the end
    # of the previous step from its prediction, so the carry holds only [b, 3] + [b] instead of a full mask.
    pt0, lb0 = sample_click(jax.random.fold_in(k_clicks, 0), gt, jnp.zeros_like(gt))
    n_buf = cfg.max_clicks if cfg.accumulate_clicks else 1
    buf_pts = jnp.zeros((b, n_buf, 3), jnp.float32)
    buf_lbl = jnp.full((b, n_buf), ABSENT, jnp.int32)

    def active_step(carry, s):
        low, pt, lb, buf_pts, buf_lbl = carry
        if cfg.accumulate_clicks:
            buf_pts = buf_pts.at[:, s].set(pt.astype(jnp.float32))
            buf_lbl = buf_lbl.at[:, s].set(lb.astype(jnp.int32))
        else:
            buf_pts = pt.astype(jnp.float32)[:, None]
            buf_lbl = lb.astype(jnp.int32)[:, None]
        prompt_less = s == insert_at
        if cfg.prompt_less_last:
            prompt_less |= s == num_clicks - 1
        labels = jnp.where(prompt_less, ABSENT, buf_lbl)
        mask_in = jax.lax.stop_gradient(low) if cfg.stop_mask_gradient else low
        new_low, _ = model.apply(variables, emb, buf_pts, labels, mask_in, multimask_output=False,
                                 method=Sam3D.decode)
        new_low = new_low.astype(jnp.float32)
        full = upsample_logits(new_low, size)[..., 0]
        loss = losses.dice_ce_loss(full, gt, cfg.use_bce)
        pred = jax.lax.stop_gradient(full) > cfg.click_threshold
        dice = jnp.mean(losses.dice_score(jax.lax.stop_gradient(full), gt, cfg.click_threshold))
        next_pt, next_lb = sample_click(jax.random.fold_in(k_clicks, s + 1), gt, pred)
        return (new_low, next_pt, next_lb, buf_pts, buf_lbl), (loss, dice)

    def skipped_step(carry, s):
        del s
        return carry, (jnp.zeros((), jnp.float32), jnp.full((), jnp.nan, jnp.float32))

    def body(carry, s):
        return jax.lax.cond(s < num_clicks, active_step, skipped_step, carry, s)

    if cfg.remat_clicks:
        body = jax.checkpoint(body, prevent_cse=False)
    carry0 = (low0, pt0, lb0, buf_pts, buf_lbl)
    _, (loss_per_click, dice_per_click) = jax.lax.scan(body, carry0, jnp.arange(cfg.max_clicks, dtype=jnp.int32))
    return jnp.sum(loss_per_click), {"dice_per_click": dice_per_click, "loss_per_click": loss_per_click}


def train_step(state: TrainState, batch: Batch, train_key: jax.Array, *, model: Sam3D, optimizer: optim.Optimizer,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One micro-batch: interactive loss, gradients (averaged over the global batch), accumulated optimizer step.

    Args:
      state: the train state (donated when jitted by :func:`jit_train_step`).
      batch: the global batch (see :func:`interactive_loss`).
      train_key: the run's ``train`` PRNG stream; the step uses ``fold_in(train_key, state.step)``.
      model: the Sam3D module.
      optimizer: from :func:`optim.make_optimizer`.
      cfg: interaction settings.

    Returns:
      ``(new_state, metrics)``; metrics are scalars except ``dice_per_click`` / ``loss_per_click``.
    """
    key = jax.random.fold_in(train_key, state.step)
    k_clicks, k_loss = jax.random.split(key)
    num_clicks = jax.random.randint(k_clicks, (), cfg.min_clicks, cfg.max_clicks + 1)
    grad_fn = jax.value_and_grad(interactive_loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, state.buffers, batch, k_loss, num_clicks, model=model, cfg=cfg)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    skipped_now = optim.skipped_this_step(opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              skipped=state.skipped + skipped_now)
    dice = aux["dice_per_click"]
    metrics = {
        "loss": loss,
        "loss_per_click": jnp.where(jnp.arange(cfg.max_clicks) < num_clicks, aux["loss_per_click"], jnp.nan),
        "dice_per_click": dice,
        "dice_first": dice[0],
        "dice_last": jnp.take(dice, num_clicks - 1),
        "num_clicks": num_clicks,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        "lr": jnp.asarray(optimizer.schedule(optim.update_count(state.opt_state)), jnp.float32),
        "updates": optim.update_count(opt_state),
        "skipped_now": skipped_now,
        "skipped": new_state.skipped,
    }
    return new_state, metrics


def jit_train_step(model_cfg: ModelConfig, optimizer: optim.Optimizer, cfg: StepConfig, mesh: Mesh,
                   state_sharding: Any, compiler_options: dict[str, Any] | None = None
                   ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The train step jitted over ``mesh``: batch on the data axes, state as ``state_sharding``, state donated.

    Args:
      model_cfg: model architecture and compute dtype.
      optimizer: from :func:`optim.make_optimizer`.
      cfg: interaction settings.
      mesh: the device mesh.
      state_sharding: pytree of shardings of the TrainState (``state.state_shardings``).
      compiler_options: XLA options for this compilation only (e.g. ``{"xla_backend_optimization_level": 1}``
        to halve CPU compile time); None = XLA's defaults.

    Returns:
      ``step(state, batch, train_key) -> (state, metrics)``; metrics come back replicated.
    """
    fn = functools.partial(train_step, model=Sam3D(model_cfg), optimizer=optimizer, cfg=cfg)
    data = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    return jax.jit(fn, in_shardings=(state_sharding, {"image": data, "label": data}, rep),
                   out_shardings=(state_sharding, rep), donate_argnums=(0,),
                   compiler_options=dict(compiler_options) if compiler_options else None)
