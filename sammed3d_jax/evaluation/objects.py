"""Several objects per encode: one image embedding per window, the prompts of N objects decoded together.

An *object* is one target being segmented; a *chain* is an object's interaction inside one window: its click buffer,
its box, and the latest low-res logits, which the next decode takes as its mask prompt (upstream's interactive loop).
``ObjectDecoder`` advances many chains at once: rows of one batch may belong to different objects and windows (each
row carries its window's embedding, gathered on the host once per call), each step writes at most one prompt per
row (a click into the row's next buffer slot, or a box) and decodes every row in one program. Rows without a prompt
at a step keep their state exactly (they are computed and discarded), so chains of different lengths share calls.

Batches are padded to a power of two (at most ``max_batch`` rows per call; larger requests are split), so a few
compilations serve every object count. Row results equal one-object decodes up to float round-off of the batched
matmuls (a test holds the two to 1e-5).

- ``decode_chains(embeddings, chains, prompts)``: user prompts (the session, ``predict``, the challenge adapter).
- ``simulate(embeddings, gts, keys, n_clicks, rules, first_clicks)``: simulated users for evaluation, every click
  drawn on device from each row's own ground truth and current prediction (``data/clicks.py``), per-row keys, so a
  row's clicks are those a one-object run with the same key would draw.

Imports the model and ``data/clicks.py`` through ``evaluation/inference.py``; never the training code or configs.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float

from sammed3d_jax.data import clicks as click_lib
from sammed3d_jax.evaluation import inference
from sammed3d_jax.model.config import ModelConfig, resolve_attention_impl
from sammed3d_jax.model.sam import Sam3D, upsample_logits
from sammed3d_jax.shapes import ABSENT, NEGATIVE, POSITIVE

BoxDecodeFn = Callable[..., tuple[jax.Array, jax.Array]]


@functools.lru_cache(maxsize=8)
def box_decode_function(cfg: ModelConfig) -> BoxDecodeFn:
    """``decode(variables, emb, points, labels, low, boxes [b, 6], box_present [b]) -> (low, full)``: ``Sam3D.decode``
    with box rows (rows without a box decode as if no box were given), mask token 0, ``full`` upsampled to ``S``³."""
    model = Sam3D(resolve_attention_impl(cfg, jax.default_backend()))

    def decode(variables, embedding, points, labels, low_logits, boxes, box_present):
        low, _ = model.apply(variables, embedding, points, labels, low_logits, multimask_output=False, boxes=boxes,
                             box_present=box_present, method=Sam3D.decode)
        return low, upsample_logits(low, cfg.image_size)

    return decode


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt for one window, in that window's voxel coordinates (array-axis order).

    Attributes:
        kind: "click" or "box".
        coords: ``[3]`` click position, or ``[6]`` box ``(d0min, d1min, d2min, d0max, d1max, d2max)``.
        positive: the click's sign (ignored for boxes).
    """

    kind: str
    coords: Sequence[float | int] | np.ndarray
    positive: bool = True

    def __post_init__(self):
        object.__setattr__(self, "coords", tuple(float(c) for c in np.asarray(self.coords).reshape(-1)))
        object.__setattr__(self, "positive", bool(self.positive))

    def key(self) -> tuple:
        """A hashable identity of the prompt (for caches keyed by prompt sequences)."""
        return (self.kind, tuple(round(float(c), 6) for c in self.coords), bool(self.positive))


@dataclasses.dataclass
class Chain:
    """One object's interaction in one window: device buffers with a leading axis of 1, the latest logits on the host.

    Attributes:
        points: ``[1, K, 3]`` click buffer; labels ``[1, K]`` (ABSENT beyond ``count``).
        box: ``[1, 6]`` the box prompt (meaningful when ``box_present``); box_present ``[1]`` bool.
        low: ``[1, S/4, S/4, S/4, 1]`` latest low-res logits (the next decode's mask prompt).
        count: clicks in the buffer.
        logits: ``[S, S, S]`` float32 full-resolution logits of the latest prediction (None before the first).
    """

    points: jax.Array
    labels: jax.Array
    box: jax.Array
    box_present: jax.Array
    low: jax.Array
    count: int = 0
    logits: np.ndarray | None = None


def _bucket(n: int, max_batch: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


def _write(points, labels, box, box_present, slot, new_point, new_label, write, new_box, set_box):
    k = points.shape[1]
    hit = (jnp.arange(k)[None, :] == slot[:, None]) & write[:, None]
    points = jnp.where(hit[..., None], new_point[:, None, :].astype(points.dtype), points)
    labels = jnp.where(hit, new_label[:, None].astype(labels.dtype), labels)
    box = jnp.where(set_box[:, None], new_box.astype(box.dtype), box)
    return points, labels, box, box_present | set_box


def _decode(decode_fn, box_decode_fn, variables, emb, points, labels, box, box_present, low, logits, active):
    if box_decode_fn is None:
        new_low, full = decode_fn(variables, emb, points, labels, low)
    else:
        new_low, full = box_decode_fn(variables, emb, points, labels, low, box, box_present)
    keep = active.reshape((-1,) + (1,) * (low.ndim - 1))
    low = jnp.where(keep, new_low.astype(low.dtype), low)
    logits = jnp.where(active.reshape((-1, 1, 1, 1)), full[..., 0].astype(jnp.float32), logits)
    return low, logits


def _user_step(decode_fn, box_decode_fn, variables, emb, points, labels, box, box_present, low, logits, slot,
               new_point, new_label, write, new_box, set_box, active):
    points, labels, box, box_present = _write(points, labels, box, box_present, slot, new_point, new_label, write,
                                              new_box, set_box)
    low, logits = _decode(decode_fn, box_decode_fn, variables, emb, points, labels, box, box_present, low, logits,
                          active)
    return points, labels, box, box_present, low, logits


def _simulated_step(decode_fn, box_decode_fn, rule, variables, emb, points, labels, box, box_present, low, logits,
                    gt, keys, slot, active):
    pred = inference.mask_from_logits(logits)
    sample = click_lib.sample_click_ritm if rule == "ritm" else click_lib.sample_click

    def one(key, g, p):
        point, label = sample(key, g[None], p[None])
        return point[0], label[0]

    point, label = jax.vmap(one)(keys, gt, pred)
    no_box = jnp.zeros_like(box)
    points, labels, box, box_present = _write(points, labels, box, box_present, slot, point, label, active, no_box,
                                              jnp.zeros_like(active))
    low, logits = _decode(decode_fn, box_decode_fn, variables, emb, points, labels, box, box_present, low, logits,
                          active)
    return points, labels, box, box_present, low, logits, point, label


@functools.lru_cache(maxsize=8)
def _jitted(decode_fn, box_decode_fn) -> tuple[Callable, dict[str, Callable]]:
    user = jax.jit(functools.partial(_user_step, decode_fn, box_decode_fn))
    simulated = {rule: jax.jit(functools.partial(_simulated_step, decode_fn, box_decode_fn, rule))
                 for rule in ("random", "ritm")}
    return user, simulated


@dataclasses.dataclass(frozen=True)
class Simulation:
    """Outcome of ``ObjectDecoder.simulate`` for one row.

    Attributes:
        masks: click count -> bool ``[S, S, S]`` prediction after that many clicks (the requested counts).
        points: ``[n, 3]`` clicks made (window voxels); labels ``[n]`` (1 positive, 0 negative).
        click_s: wall time of each click step of the row's batch, divided by the rows of the batch.
        encode_s: encoder time of the row's window, divided by the rows sharing it (``simulate_rois``).
    """

    masks: dict[int, np.ndarray]
    points: np.ndarray
    labels: np.ndarray
    click_s: tuple[float, ...]
    encode_s: float = 0.0


class ObjectDecoder:
    """Jitted multi-object decode steps over one model (see the module docstring).

    Args:
        variables: model variables (placed on the default device).
        crop_size, low_res_size: window side ``S`` and low-res side ``S/4``.
        max_prompts: clicks one chain can hold (the click buffer ``K``).
        encode_fn, decode_fn: as ``inference.sam3d_functions`` returns (or a stand-in's).
        box_decode_fn: ``decode(variables, emb, points, labels, low, boxes [b, 6], box_present [b])`` for a model
            with box embeddings, else None (box prompts are then refused).
        max_batch: most rows per decode call.
    """

    def __init__(self, variables: Any, *, crop_size: int, low_res_size: int, max_prompts: int, encode_fn,
                 decode_fn, box_decode_fn: BoxDecodeFn | None = None, max_batch: int = 8):
        if max_prompts < 1 or max_batch < 1:
            raise ValueError(f"max_prompts and max_batch must be >= 1, got {max_prompts}, {max_batch}")
        self.variables = variables
        self.crop_size, self.low_res_size = int(crop_size), int(low_res_size)
        self.max_prompts, self.max_batch = int(max_prompts), int(max_batch)
        self.supports_boxes = box_decode_fn is not None
        self._encode = inference.jitted_encoder(encode_fn, decode_fn)
        self._user, self._simulated = _jitted(decode_fn, box_decode_fn)

    @classmethod
    def from_segmenter(cls, segmenter: inference.Segmenter, box_decode_fn: BoxDecodeFn | None = None,
                       max_batch: int = 8) -> "ObjectDecoder":
        """The multi-object decoder of a Segmenter's model (same variables, compiled encoder shared)."""
        return cls(segmenter.variables, crop_size=segmenter.crop_size, low_res_size=segmenter.low_res_size,
                   max_prompts=segmenter.max_clicks, encode_fn=segmenter.encode_fn, decode_fn=segmenter.decode_fn,
                   box_decode_fn=box_decode_fn, max_batch=max_batch)

    @classmethod
    def from_model(cls, variables: Any, cfg: ModelConfig, max_prompts: int = 16, max_batch: int = 8) -> "ObjectDecoder":
        """For a Sam3D model with ``cfg``; box prompts when the config has box embeddings."""
        encode, decode = inference.sam3d_functions(cfg)
        box = box_decode_function(cfg) if cfg.supports_boxes else None
        return cls(jax.device_put(variables), crop_size=cfg.image_size, low_res_size=cfg.low_res_size,
                   max_prompts=max_prompts, encode_fn=encode, decode_fn=decode, box_decode_fn=box,
                   max_batch=max_batch)

    # --- Encoding and empty chains ---

    def encode(self, roi_image: Float[np.ndarray, "s0 s1 s2"]) -> jax.Array:
        """The embedding ``[1, g, g, g, C]`` of one z-normalised window."""
        s = self.crop_size
        if roi_image.shape != (s, s, s):
            raise ValueError(f"ROI shape {roi_image.shape} differs from the model's crop {(s, s, s)}")
        return self._encode(self.variables, jnp.asarray(roi_image, jnp.float32).reshape(1, s, s, s, 1))

    def empty_chain(self, low: jax.Array | None = None, logits: np.ndarray | None = None) -> Chain:
        """A chain without prompts; ``low`` (and ``logits``) start it from a given mask prompt instead of zeros."""
        g = self.low_res_size
        return Chain(points=jnp.zeros((1, self.max_prompts, 3), jnp.float32),
                     labels=jnp.full((1, self.max_prompts), ABSENT, jnp.int32),
                     box=jnp.zeros((1, 6), jnp.float32), box_present=jnp.zeros((1,), bool),
                     low=jnp.zeros((1, g, g, g, 1), jnp.float32) if low is None else low, logits=logits)

    # --- User prompts ---

    def _check(self, chain: Chain, prompts: Sequence[Prompt]) -> None:
        clicks = sum(p.kind == "click" for p in prompts)
        if chain.count + clicks > self.max_prompts:
            raise ValueError(f"{chain.count + clicks} clicks in one window exceed the click buffer of "
                             f"{self.max_prompts} (raise max_prompts)")
        for p in prompts:
            if p.kind == "box" and not self.supports_boxes:
                raise ValueError("box prompts need a model with box embeddings (num_point_embeddings 4)")
            if p.kind not in ("click", "box") or len(p.coords) != (3 if p.kind == "click" else 6):
                raise ValueError(f"not a prompt: {p}")

    def decode_chains(self, embeddings: Sequence[jax.Array], chains: Sequence[Chain],
                      prompts: Sequence[Sequence[Prompt]]) -> list[Chain]:
        """Advances every chain through its prompts, all rows together; returns the new chains (inputs unchanged).

        Args:
            embeddings: per row, its window's embedding ``[1, g, g, g, C]`` (rows may share one).
            chains: per row, the state to continue (``empty_chain()`` for a new one).
            prompts: per row, the prompts to feed in order (each is one decode).
        """
        if not len(embeddings) == len(chains) == len(prompts):
            raise ValueError("embeddings, chains and prompts must have one entry per row")
        for chain, rows in zip(chains, prompts, strict=True):
            self._check(chain, rows)
        out: list[Chain] = []
        for lo in range(0, len(chains), self.max_batch):
            hi = min(lo + self.max_batch, len(chains))
            out += self._decode_batch(embeddings[lo:hi], chains[lo:hi], prompts[lo:hi])
        return out

    def _stack(self, embeddings, chains, n):
        pad = n - len(chains)
        rows = list(chains) + [chains[0]] * pad
        emb = jnp.concatenate(list(embeddings) + [embeddings[0]] * pad, axis=0)
        s = self.crop_size
        logits = [c.logits if c.logits is not None else np.zeros((s, s, s), np.float32) for c in rows]
        state = [jnp.concatenate([getattr(c, f) for c in rows], axis=0)
                 for f in ("points", "labels", "box", "box_present", "low")]
        return emb, state + [jnp.asarray(np.stack(logits))]

    def _decode_batch(self, embeddings, chains, prompts) -> list[Chain]:
        n = _bucket(len(chains), self.max_batch)
        emb, state = self._stack(embeddings, chains, n)
        counts = np.array([c.count for c in chains] + [0] * (n - len(chains)), np.int32)
        decoded = np.zeros(n, bool)
        for t in range(max((len(p) for p in prompts), default=0)):
            new_point, new_label = np.zeros((n, 3), np.float32), np.full(n, ABSENT, np.int32)
            new_box, write, set_box, active = np.zeros((n, 6), np.float32), np.zeros(n, bool), np.zeros(
                n, bool), np.zeros(n, bool)
            for r, rows in enumerate(prompts):
                if t >= len(rows):
                    continue
                p, active[r] = rows[t], True
                if p.kind == "click":
                    new_point[r], new_label[r], write[r] = p.coords, POSITIVE if p.positive else NEGATIVE, True
                else:
                    new_box[r], set_box[r] = p.coords, True
            state = list(self._user(self.variables, emb, *state, jnp.asarray(counts), jnp.asarray(new_point),
                                    jnp.asarray(new_label), jnp.asarray(write), jnp.asarray(new_box),
                                    jnp.asarray(set_box), jnp.asarray(active)))
            # New arrays, never in-place updates: jnp.asarray may alias host memory that a step still reads.
            counts = counts + write.astype(np.int32)
            decoded = decoded | active
        logits = np.asarray(state[5]) if decoded.any() else None
        out = []
        for r, chain in enumerate(chains):
            if not decoded[r]:
                out.append(chain)
                continue
            fields = [x[r:r + 1] for x in state[:5]]
            out.append(Chain(*fields, count=int(counts[r]), logits=np.array(logits[r])))
        return out

    # --- Simulated users (evaluation) ---

    def simulate(self, embeddings: Sequence[jax.Array], gts: Sequence[Bool[np.ndarray, "s0 s1 s2"]],
                 keys: Sequence[jax.Array], record_at: Sequence[int], rules: Sequence[str],
                 first_clicks: Sequence[np.ndarray | None] | None = None) -> list[Simulation]:
        """Simulated interactions of every row, all rows decoded together at each click.

        Args:
            embeddings: per row, its window's embedding ``[1, ...]``.
            gts: per row, the target inside its window (non-empty).
            keys: per row, the PRNG key of its target; click t uses ``fold_in(key, t)``.
            record_at: click counts whose predictions are kept; the largest is the number of clicks.
            rules: the click rule of each click ("random" or "ritm"), at least max(record_at) long.
            first_clicks: per row, a given positive first click (window voxel) or None to simulate it.

        Returns:
            One ``Simulation`` per row.
        """
        counts = sorted({int(c) for c in record_at})
        if not counts or counts[0] < 1:
            raise ValueError(f"click counts must be positive integers, got {list(record_at)}")
        if counts[-1] > self.max_prompts:
            raise ValueError(f"{counts[-1]} clicks exceed the click buffer of {self.max_prompts}")
        for gt in gts:
            if not np.asarray(gt).any():
                raise ValueError("the ground-truth target is empty inside the ROI: no click can be simulated")
        first_clicks = list(first_clicks) if first_clicks is not None else [None] * len(gts)
        out: list[Simulation] = []
        for lo in range(0, len(gts), self.max_batch):
            hi = min(lo + self.max_batch, len(gts))
            out += self._simulate_batch(embeddings[lo:hi], gts[lo:hi], keys[lo:hi], counts, rules,
                                        first_clicks[lo:hi])
        return out

    def _simulate_batch(self, embeddings, gts, keys, counts, rules, first_clicks) -> list[Simulation]:
        m = len(gts)
        n = _bucket(m, self.max_batch)
        emb, state = self._stack(embeddings, [self.empty_chain()] * m, n)
        gt = jnp.asarray(np.stack([np.asarray(g, bool) for g in gts] + [np.zeros_like(gts[0], bool)] * (n - m)))
        key_rows = list(keys) + [keys[0]] * (n - m)
        active = jnp.asarray(np.arange(n) < m)
        masks: list[dict[int, np.ndarray]] = [{} for _ in range(m)]
        points, labels, times = [], [], []
        for t in range(counts[-1]):
            t0 = time.perf_counter()
            slot = jnp.full((n,), t, jnp.int32)
            given = [c for c in first_clicks if c is not None] if t == 0 else []
            if given and len(given) != m:
                raise ValueError("first_clicks must be given for every row or for none")
            if given:
                pts = np.zeros((n, 3), np.float32)
                pts[:m] = np.asarray(given, np.float32)
                lab = np.full(n, POSITIVE, np.int32)
                zeros = jnp.zeros((n, 6), jnp.float32)
                state = list(self._user(self.variables, emb, *state, slot, jnp.asarray(pts), jnp.asarray(lab),
                                        active, zeros, jnp.zeros((n,), bool), active))
                point, label = pts, lab
            else:
                step_keys = jnp.stack([jax.random.fold_in(k, t) for k in key_rows])
                *state, point, label = self._simulated[rules[t]](self.variables, emb, *state, gt, step_keys, slot,
                                                                 active)
            if t + 1 in counts:
                pred = np.asarray(inference.mask_from_logits(state[5]))
                for r in range(m):
                    masks[r][t + 1] = pred[r]
            else:
                jax.block_until_ready(state[5])
            times.append((time.perf_counter() - t0) / m)
            points.append(np.asarray(point)[:m])
            labels.append(np.asarray(label)[:m])
        pts, labs = np.stack(points, 1), np.stack(labels, 1)
        return [Simulation(masks[r], pts[r], labs[r], tuple(times)) for r in range(m)]

    def warmup(self, batch_sizes: Sequence[int] = (1,), rules: Sequence[str] = ()) -> float:
        """Compiles the encoder and the steps for the given batch sizes (and simulated rules); returns seconds."""
        t0 = time.perf_counter()
        s = self.crop_size
        emb = self.encode(np.zeros((s, s, s), np.float32))
        click = Prompt("click", (s / 2,) * 3, True)
        for b in sorted({_bucket(int(x), self.max_batch) for x in batch_sizes}):
            self.decode_chains([emb] * b, [self.empty_chain()] * b, [[click]] * b)
            gt = np.zeros((s, s, s), bool)
            gt[s // 2, s // 2, s // 2] = True
            for rule in sorted(set(rules)):  # one click each: a one-click buffer suffices
                self.simulate([emb] * b, [gt] * b, [jax.random.key(0)] * b, [1], [rule])
        return time.perf_counter() - t0


def simulate_rois(decoder: ObjectDecoder, rois: Sequence[inference.Roi], keys: Sequence[jax.Array],
                  record_at: Sequence[int], mode: str = "random",
                  first_clicks: Sequence[np.ndarray | None] | None = None) -> list[Simulation]:
    """Simulated interactions on several ROIs of one case: each distinct window is encoded once (ROIs with the same
    crop share the encode), then every target is clicked and decoded together (``ObjectDecoder.simulate``).

    Args:
        decoder: the model.
        rois: one ROI per target, with its ground truth (``roi.gt`` non-empty).
        keys: per target, its PRNG key.
        record_at: click counts to keep.
        mode: evaluation click mode (``inference.click_rule``).
        first_clicks: per target, a given first click (ROI voxel) or None.

    Raises:
        ValueError: an empty target, too many clicks, or an unknown mode.
    """
    n_clicks = max(int(c) for c in record_at)
    rules = [inference.click_rule(mode, t) for t in range(n_clicks)]
    embeddings, encode_s, shared = {}, {}, {}
    for roi in rois:
        key = (roi.crop.start, roi.crop.source_shape)
        shared[key] = shared.get(key, 0) + 1
        if key not in embeddings:
            t0 = time.perf_counter()
            embeddings[key] = jax.block_until_ready(decoder.encode(roi.image))
            encode_s[key] = time.perf_counter() - t0
    windows = [(roi.crop.start, roi.crop.source_shape) for roi in rois]
    sims = decoder.simulate([embeddings[w] for w in windows], [roi.gt for roi in rois], keys, record_at, rules,
                            first_clicks)
    return [dataclasses.replace(sim, encode_s=encode_s[w] / shared[w]) for sim, w in zip(sims, windows, strict=True)]
