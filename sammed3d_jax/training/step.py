"""The train step: upstream's interactive click loop as one pure, jit-able function over a device mesh.

One step = one micro-batch. The encoder runs once; a fixed-length ``lax.scan`` over ``max_clicks`` then simulates
the interaction. ``num_clicks`` is a traced int (drawn on device per step), and steps ``s >= num_clicks`` are skipped
by ``lax.cond``, so changing it never recompiles. The scan body is rematerialised (``jax.checkpoint``) so the backward
pass stores only the small carry per click; ``ModelConfig.remat_encoder_blocks`` does the same for the encoder.

Randomness: the step-level draws (click count, the random prompt-less step) come from
``fold_in(step_root, state.step)``; each sample's clicks from ``fold_in(sample_root, element)``, where ``element`` is
the sample's global index in the data stream, so a sample gets the same clicks on any number of processes or devices
and in any batch row. Where this differs from upstream is tabulated in ``docs/training_vs_upstream.md``.

Box-prompted first step (``box_first_step`` > 0, box-capable models only; not upstream's training): each sample, with
that probability (drawn from its own key), starts from its target's bounding box in the crop instead of a click;
later steps click as usual (the box stays in the prompt only with ``accumulate_clicks``, where every prompt so far is
fed). Rows without a box decode with ``box_present`` False, exactly as without boxes, so one program serves both.

Must not import data/pipeline code or ml_collections; it imports the model, ``data.clicks`` and ``data.augment``
(jnp only) and optax.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

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
      normalization: z-normalisation of raw batches (``"per_volume"``, ``"batch_pooled"`` over the global batch,
        ``"none"``), applied on device by :func:`model_input`.
      box_first_step: probability per sample that the first step is prompted with the target's bounding box instead
        of a click (0: never, the program has no box inputs; needs a model with ``num_point_embeddings == 4``).
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
    normalization: str = "per_volume"
    box_first_step: float = 0.0

    def __post_init__(self):
        if not 1 <= self.min_clicks <= self.max_clicks:
            raise ValueError(f"need 1 <= min_clicks ({self.min_clicks}) <= max_clicks ({self.max_clicks})")
        if self.random_insert and (len(self.random_insert) != 2 or self.random_insert[0] > self.random_insert[1]):
            raise ValueError(f"random_insert must be () or an inclusive (lo, hi), lo <= hi; got {self.random_insert}")
        object.__setattr__(self, "random_insert", tuple(int(v) for v in self.random_insert))
        if not 0.0 <= self.box_first_step <= 1.0:
            raise ValueError(f"box_first_step is a probability in [0, 1], got {self.box_first_step}")


def draw_interaction(key: jax.Array, cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
    """The step-level random choices: the click count and the step made prompt-less at random.

    Args:
      key: this step's key.
      cfg: interaction settings.

    Returns:
      ``(num_clicks, insert_at)``: int32 scalars; ``num_clicks`` uniform in ``[min_clicks, max_clicks]``,
      ``insert_at`` uniform in the inclusive ``random_insert`` range (-1 when disabled).
    """
    k_count, k_insert = jax.random.split(key)
    num_clicks = jax.random.randint(k_count, (), cfg.min_clicks, cfg.max_clicks + 1)
    if cfg.random_insert:
        insert_at = jax.random.randint(k_insert, (), cfg.random_insert[0], cfg.random_insert[1] + 1)
    else:
        insert_at = jnp.asarray(-1, jnp.int32)
    return num_clicks, insert_at


def sample_keys(sample_root: jax.Array, element: jax.Array) -> jax.Array:
    """One PRNG key per sample, ``fold_in(sample_root, element)``, from the samples' global stream indices."""
    return jax.vmap(lambda e: jax.random.fold_in(sample_root, e))(element.astype(jnp.uint32))


# fold_in index of a sample's box draw: far above any click step index, so the click draws never change.
BOX_STREAM = 0x7B0C5


def target_boxes(gt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bounding boxes of the targets: ``gt`` bool [b,S,S,S] -> (``boxes`` f32 [b,6] = (d0min, d1min, d2min, d0max,
    d1max, d2max), inclusive voxel indices of the crop in point order; ``present`` bool [b], False (box all 0) for
    an empty target)."""
    size = gt.shape[1]
    index = jnp.arange(size, dtype=jnp.int32)
    lo, hi = [], []
    for axis in (1, 2, 3):
        occupied = jnp.any(gt, axis=tuple(a for a in (1, 2, 3) if a != axis))  # [b, S]
        lo.append(jnp.min(jnp.where(occupied, index, size), axis=1))
        hi.append(jnp.max(jnp.where(occupied, index, -1), axis=1))
    present = jnp.any(gt, axis=(1, 2, 3))
    boxes = jnp.where(present[:, None], jnp.stack(lo + hi, axis=1), 0).astype(jnp.float32)
    return boxes, present


def box_rows(keys: jax.Array, present: jax.Array, probability: float) -> jax.Array:
    """Which samples start from a box: bool [b], each drawn with ``probability`` from ``fold_in(key, BOX_STREAM)``
    and only where the target is not empty."""
    draw = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, BOX_STREAM), probability))(keys)
    return draw & present


def click_per_sample(keys: jax.Array, s: jax.Array, gt: jax.Array, pred: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Click ``s`` of every row: ``sample_click(fold_in(keys[i], s), gt[i], pred[i])`` -> (points [b,3], labels [b]).
    Each row draws from its own key, so a sample's click does not depend on its batch neighbours."""
    def one(key, g, p):
        pt, lb = sample_click(jax.random.fold_in(key, s), g[None], p[None])
        return pt[0], lb[0]

    return jax.vmap(one)(keys, gt, pred)


class ClickContext(NamedTuple):
    """What every click of one interaction reads (constant over the scan): the model variables, the image embedding,
    the targets, the per-sample keys, the step-level draws and, with ``box_first_step``, the boxes and which rows
    start from one (``None`` otherwise)."""

    variables: dict[str, Any]
    emb: jax.Array
    gt: jax.Array
    keys: jax.Array
    num_clicks: jax.Array
    insert_at: jax.Array
    boxes: jax.Array | None
    has_box: jax.Array | None


Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]  # (low-res logits, point, label, buffers...)


def step_prompt(ctx: ClickContext, carry: Carry, s: jax.Array, cfg: StepConfig
                ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """The prompt of click ``s``: ``(points f32 [b,n,3], labels int32 [b,n], prompt_less, box_kwargs)``.

    ``points``/``labels`` are the click buffers to carry (``n`` = 1 for the newest click only, ``max_clicks`` with
    ``accumulate_clicks``); the caller masks the labels to ABSENT where ``prompt_less`` (a bool scalar) holds, and
    passes ``box_kwargs`` (empty without ``box_first_step``) to ``Sam3D.decode``."""
    _, pt, lb, buf_pts, buf_lbl = carry
    if ctx.has_box is not None:
        lb = jnp.where((s == 0) & ctx.has_box, ABSENT, lb)  # The box replaces these rows' first click.
    if cfg.accumulate_clicks:
        buf_pts = buf_pts.at[:, s].set(pt.astype(jnp.float32))
        buf_lbl = buf_lbl.at[:, s].set(lb.astype(jnp.int32))
    else:
        buf_pts = pt.astype(jnp.float32)[:, None]
        buf_lbl = lb.astype(jnp.int32)[:, None]
    prompt_less = s == ctx.insert_at
    if cfg.prompt_less_last:
        prompt_less |= s == ctx.num_clicks - 1
    box_kwargs = {}
    if ctx.has_box is not None:
        box_now = ctx.has_box & ~prompt_less
        if not cfg.accumulate_clicks:
            box_now &= s == 0
        box_kwargs = {"boxes": ctx.boxes, "box_present": box_now}
    return buf_pts, buf_lbl, prompt_less, box_kwargs


def active_click(ctx: ClickContext, carry: Carry, s: jax.Array, *, model: Sam3D, cfg: StepConfig):
    """One simulated click: decode from the prompt and the previous logits, score it, draw the next click."""
    buf_pts, buf_lbl, prompt_less, box_kwargs = step_prompt(ctx, carry, s, cfg)
    labels = jnp.where(prompt_less, ABSENT, buf_lbl)
    low = carry[0]
    mask_in = jax.lax.stop_gradient(low) if cfg.stop_mask_gradient else low
    new_low, _ = model.apply(ctx.variables, ctx.emb, buf_pts, labels, mask_in, multimask_output=False,
                             method=Sam3D.decode, **box_kwargs)
    new_low = new_low.astype(jnp.float32)
    full = upsample_logits(new_low, ctx.gt.shape[1])[..., 0]
    loss = losses.dice_ce_loss(full, ctx.gt, cfg.use_bce)
    pred = jax.lax.stop_gradient(full) > cfg.click_threshold
    dice = losses.dice_score(jax.lax.stop_gradient(full), ctx.gt, cfg.click_threshold)
    next_pt, next_lb = click_per_sample(ctx.keys, s + 1, ctx.gt, pred)
    return (new_low, next_pt, next_lb, buf_pts, buf_lbl), (loss, dice, prompt_less)


def skipped_click(ctx: ClickContext, carry: Carry, s: jax.Array):
    """A scan step past ``num_clicks``: the carry unchanged, zero loss, NaN Dice."""
    del s
    b = ctx.gt.shape[0]
    return carry, (jnp.zeros((), jnp.float32), jnp.full((b,), jnp.nan, jnp.float32), jnp.zeros((), bool))


def click_body(ctx: ClickContext, carry: Carry, s: jax.Array, *, model: Sam3D, cfg: StepConfig):
    """The scan body: an active click for ``s < num_clicks``, else a skipped one (``lax.cond``: no recompilation)."""
    active = functools.partial(active_click, ctx, model=model, cfg=cfg)
    return jax.lax.cond(s < ctx.num_clicks, active, functools.partial(skipped_click, ctx), carry, s)


def interactive_loss(params: Any, buffers: Any, batch: Batch, keys: jax.Array, num_clicks: jax.Array,
                     insert_at: jax.Array, *, model: Sam3D, cfg: StepConfig
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over the active clicks of the DiceCE loss of upstream's simulated interaction.

    Args:
      params: trainable model params.
      buffers: model buffers (constant).
      batch: ``{"image": f32 [b,S,S,S,1], "label": [b,S,S,S] (nonzero = foreground), ...}``.
      keys: one PRNG key per sample (:func:`sample_keys`).
      num_clicks: int32 scalar in ``[1, max_clicks]``; later scan steps are skipped.
      insert_at: int32 scalar, the scan step made prompt-less at random (-1: none).
      model: the Sam3D module.
      cfg: interaction settings.

    Returns:
      ``(loss, aux)``: the float32 summed loss and ``{"dice_per_click": f32 [max_clicks] (batch mean, NaN where
      inactive), "dice_per_sample": f32 [max_clicks, b], "loss_per_click": f32 [max_clicks] (0 where inactive),
      "prompt_less": bool [max_clicks]}`` (plus ``"box_rows": bool [b]`` when ``cfg.box_first_step`` > 0).
    """
    if cfg.box_first_step > 0 and not model.cfg.supports_boxes:
        raise ValueError("box_first_step needs a model with num_point_embeddings=4 (box-corner embeddings); "
                         "this model has 2")
    variables = {"params": params, "buffers": buffers}
    image, gt = batch["image"], batch["label"] > 0
    b = image.shape[0]
    emb = model.apply(variables, image, method=Sam3D.encode)
    boxes, has_box = None, None
    if cfg.box_first_step > 0:
        boxes, present = target_boxes(gt)
        has_box = box_rows(keys, present, cfg.box_first_step)
    ctx = ClickContext(variables, emb, gt, keys, num_clicks, insert_at, boxes, has_box)
    # Click 0 comes from an all-background prediction (upstream's zero prev_masks); later clicks are drawn at the end
    # of the previous step from its prediction, so the carry holds only [b, 3] + [b] instead of a full mask.
    pt0, lb0 = click_per_sample(keys, jnp.int32(0), gt, jnp.zeros_like(gt))
    n_buf = cfg.max_clicks if cfg.accumulate_clicks else 1
    low_size = model.cfg.low_res_size
    carry0 = (jnp.zeros((b, low_size, low_size, low_size, 1), jnp.float32), pt0, lb0,
              jnp.zeros((b, n_buf, 3), jnp.float32), jnp.full((b, n_buf), ABSENT, jnp.int32))
    body = functools.partial(click_body, ctx, model=model, cfg=cfg)
    if cfg.remat_clicks:
        body = jax.checkpoint(body, prevent_cse=False)
    _, (loss_per_click, dice_per_sample, prompt_less) = jax.lax.scan(
        body, carry0, jnp.arange(cfg.max_clicks, dtype=jnp.int32))
    aux = {"dice_per_click": jnp.mean(dice_per_sample, axis=1), "dice_per_sample": dice_per_sample,
           "loss_per_click": loss_per_click, "prompt_less": prompt_less}
    if has_box is not None:
        aux["box_rows"] = has_box
    return jnp.sum(loss_per_click), aux


def model_input(batch: Batch, normalization: str) -> tuple[Batch, jax.Array]:
    """The model input of a batch: a raw batch from the host pipeline (crop windows with ``flip`` and ``ct_clip``
    per row) is clipped, normalised and flipped here on the devices (``data.augment.finish_batch``, jnp only); a
    batch without ``flip`` is already finished. Returns the batch and the number of degenerate rows (zeroed)."""
    if "flip" not in batch:  # Static under jit: the batch's keys are part of its structure.
        return batch, jnp.zeros((), jnp.int32)
    from sammed3d_jax.data.augment import finish_batch  # pylint: disable=import-outside-toplevel

    finished = finish_batch(batch, normalization=normalization)
    return ({**batch, "image": finished["image"], "label": finished["label"]},
            jnp.sum(finished["degenerate"], dtype=jnp.int32))


def train_step(state: TrainState, batch: Batch, train_key: jax.Array, *, model: Sam3D, optimizer: optim.Optimizer,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One micro-batch: interactive loss, gradients (averaged over the global batch), accumulated optimizer step.

    Args:
      state: the train state (donated when jitted by :func:`jit_train_step`).
      batch: the global batch: ``image``, ``label``, ``element`` (int32 [b], each sample's global stream index),
        ``flip`` and ``ct_clip`` when the host sent raw crops (see :func:`model_input`), and optionally ``stop`` (int32 [b], nonzero where the feeding process asks the run to stop).
      train_key: the run's ``train`` PRNG stream.
      model: the Sam3D module.
      optimizer: from :func:`optim.make_optimizer`.
      cfg: interaction settings.

    Returns:
      ``(new_state, metrics)``; metrics are scalars except ``dice_per_click`` / ``loss_per_click``; ``stop`` is 1
      when any process asked to stop (every process reads the same value, which is how they agree on the step).
    """
    step_root, sample_root = jax.random.split(train_key)
    num_clicks, insert_at = draw_interaction(jax.random.fold_in(step_root, state.step), cfg)
    keys = sample_keys(sample_root, batch["element"])
    batch, degenerate = model_input(batch, cfg.normalization)
    grad_fn = jax.value_and_grad(interactive_loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, state.buffers, batch, keys, num_clicks, insert_at,
                                 model=model, cfg=cfg)
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
        "insert_at": insert_at,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        "lr": jnp.asarray(optimizer.schedule(optim.update_count(state.opt_state)), jnp.float32),
        "updates": optim.update_count(opt_state),
        "skipped_now": skipped_now,
        "skipped": new_state.skipped,
        "degenerate_rows": degenerate,
        **({"box_first_rows": jnp.sum(aux["box_rows"], dtype=jnp.int32)} if "box_rows" in aux else {}),
        "stop": jnp.max(batch["stop"]).astype(jnp.int32) if "stop" in batch else jnp.zeros((), jnp.int32),
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
    # One sharding for the whole batch dict (a pytree prefix): every batch array is split on its leading axis.
    return jax.jit(fn, in_shardings=(state_sharding, data, rep),
                   out_shardings=(state_sharding, rep), donate_argnums=(0,),
                   compiler_options=dict(compiler_options) if compiler_options else None)
