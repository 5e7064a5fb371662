"""The computation behind ``Session.compute``: each object's windows, their growth, and batched decodes.

Every object being computed gets a breadth-first walk over windows (``_Search``): the first windows come from the
extent of its positive prompts (``evaluation/windows.py``), and each window that runs may queue neighbours where its
mask reaches an open face. The walks advance level by level, all objects together: the windows of one level are
encoded (once each, through the session's cache) and every (object, window) chain is decoded in one batched call
(``ObjectDecoder.decode_chains``), continuing from the longest cached prefix of its prompt sequence. Processing the
level's results in queue order gives exactly the windows a one-at-a-time walk would run.

Imports the session's helpers, windows and objects; never the training code or configs.
"""

import collections
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy import special

from sammed3d_jax.data import transforms
from sammed3d_jax.evaluation import inference
from sammed3d_jax.evaluation import windows as win
from sammed3d_jax.evaluation.objects import Chain, Prompt


def _empty_result(session, notes: tuple[str, ...]):
    from sammed3d_jax.session import ObjectInfo, _Result

    return _Result((slice(0, 0),) * 3, np.zeros((0, 0, 0), np.float32), ObjectInfo(notes=notes))


def _box_slices(mask: np.ndarray) -> tuple[slice, ...] | None:
    fg = np.argwhere(mask)
    if not len(fg):
        return None
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(fg.min(0), fg.max(0), strict=True))


@dataclasses.dataclass
class _Search:
    """One object's walk over windows (see the module docstring)."""

    oid: int
    name: str
    actions: list  # the prompts after the object's latest mask, in order
    mask: Any  # that mask action, or None
    starts: list
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    queued: set = dataclasses.field(default_factory=set)
    ran: list = dataclasses.field(default_factory=list)
    probs: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    recentred: int = 0

    def __post_init__(self):
        for start in self.starts:
            self.push(start, None)

    def push(self, start, seed, first: bool = False) -> None:
        (self.queue.appendleft if first else self.queue.append)((start, seed))
        self.queued.add(start)

    def clicks(self) -> np.ndarray:
        pts = [a.coords for a in self.actions if a.kind == "point"]
        return np.asarray(pts, np.float64).reshape(-1, 3)

    def prompts(self, session, start, seed) -> tuple[list[Prompt], list[tuple], bool]:
        """The window's prompts in order (seed first), their cache keys, and whether one names the target."""
        size = session.decoder.crop_size
        origin = np.asarray(start, np.float64)
        prompts, keys, named = [], [], False
        if seed is not None:
            prompts.append(Prompt("click", tuple(float(v) for v in seed - origin), True))
            keys.append(("seed", tuple(float(v) for v in seed)))
            named = True
        for a in self.actions:
            if a.kind == "point":
                if not win.inside(a.coords[None], start, size)[0]:
                    continue
                p = Prompt("click", tuple(float(v) for v in a.coords - origin), a.positive)
                named |= a.positive
            else:
                p = session.box_prompt_for(a.coords, start)
                if p is None:
                    continue
                named = True
            prompts.append(p)
            keys.append((a.id,))
        return prompts, keys, named

    def start_chain(self, session, start) -> tuple[Chain, Any, bool]:
        """The chain a window starts from (zeros, or the object's mask there), its cache key, whether it is empty."""
        if self.mask is None:
            return session.decoder.empty_chain(), None, True
        dec = session.decoder
        s, g = dec.crop_size, dec.low_res_size
        crop = inference.window_at(session.case.geom.shape, start, s)
        local = transforms.apply_crop_or_pad(self.mask.mask, crop).astype(bool)
        f = s // g
        frac = local.reshape(g, f, g, f, g, f).mean(axis=(1, 3, 5))
        eps = float(special.expit(-_logit()))
        low = special.logit(np.clip(frac, eps, 1.0 - eps))
        logits = np.where(local, _logit(), -_logit()).astype(np.float32)
        chain = dec.empty_chain(jnp.asarray(low, jnp.float32).reshape(1, g, g, g, 1), logits)
        return chain, ("mask", self.mask.id), not local.any()

    def after(self, session, start, seed, prob) -> None:
        """Handles a window's result: recentring, keeping, growth."""
        shape = session.case.geom.shape
        if prob is None:
            self.queued.discard(start)  # a later grown window may reach it with a propagated click
            return
        local = inference.mask_from_probabilities(prob)
        if not self.ran and len(self.starts) == 1 and self.recentred < session.recentre:
            # Upstream crops are centred on the target (in training too), and such models segment best with the
            # target in the middle of the window; clicks need not be there.
            new = win.recentred(start, local, self.clicks(), session.edge_margin)
            if new is not None:
                self.recentred += 1
                self.push(new, None, first=True)
                return
        self.ran.append(start)
        self.probs.append((start, prob))
        if session.grow:
            valid = win.in_volume(start, local.shape[0], shape)
            clipped = np.zeros_like(local)
            clipped[valid] = local[valid]
            for new, deepest in win.grown(start, clipped, shape, session.edge_margin):
                if new not in self.queued and deepest is not None:
                    self.push(new, deepest)

    def result(self, session):
        from sammed3d_jax.session import ObjectInfo, _Result

        if not self.probs:
            reasons = "; ".join(self.notes) or "no window held a positive prompt"
            return _empty_result(session, tuple(self.notes) + (
                f"{self.name}: no window around the prompts could be segmented: {reasons}",))
        shape, size = session.case.geom.shape, session.decoder.crop_size
        lo = np.min([[max(s, 0) for s in start] for start, _ in self.probs], axis=0)
        hi = np.max([[min(s + size, n) for s, n in zip(start, shape, strict=True)] for start, _ in self.probs],
                    axis=0)
        prob_sum = np.zeros(tuple(hi - lo), np.float32)
        weight = np.zeros_like(prob_sum)
        for start, prob in self.probs:
            src, dst = inference.window_at(shape, start, size).overlap()
            part = tuple(slice(a.start - int(o), a.stop - int(o)) for a, o in zip(src, lo, strict=True))
            prob_sum[part] += prob[dst]
            weight[part] += 1.0
        prob = np.where(weight > 0, prob_sum / np.maximum(weight, 1.0), 0.0).astype(np.float32)
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        info = ObjectInfo(tuple(tuple(int(v) for v in s) for s in self.ran), not self.queue, self.recentred,
                          tuple(self.notes))
        return _Result(region, prob, info)


def _logit() -> float:
    from sammed3d_jax.session import MASK_PROMPT_LOGIT

    return MASK_PROMPT_LOGIT


def _plan(session, oid, obj):
    """A ``_Search`` for the object, or its result right away (empty, or a mask without later prompts)."""
    from sammed3d_jax.session import ObjectInfo, _Result

    last_mask = max((i for i, a in enumerate(obj.actions) if a.kind == "mask"), default=-1)
    mask = obj.actions[last_mask] if last_mask >= 0 else None
    actions = obj.actions[last_mask + 1:]
    if mask is not None and not actions:
        region = _box_slices(mask.mask) or (slice(0, 0),) * 3
        return _Result(region, mask.mask[region].astype(np.float32), ObjectInfo())
    extent = [a.coords[None] for a in actions if a.kind == "point" and a.positive]
    boxes = [a.coords for a in actions if a.kind == "box"]
    if boxes:
        extent.append(boxes[-1].reshape(2, 3))
    if mask is not None and mask.mask.any():
        box = _box_slices(mask.mask)
        extent.append(np.array([[b.start for b in box], [b.stop - 1 for b in box]], np.float64))
    if not extent:
        why = "no prompt" if not obj.actions else "no positive prompt (negative clicks alone name no target)"
        return _empty_result(session, (f"{obj.name}: {why}",))
    lo, hi = win.voxel_extent(np.concatenate(extent))
    size = session.decoder.crop_size
    place = win.grid_starts if session.windows == "grid" else win.window_starts
    return _Search(oid, obj.name, actions, mask, place(lo, hi, size, session.max_windows))


def _run(session, tasks) -> list[np.ndarray | None]:
    """Probabilities ``[S, S, S]`` of each (search, start, seed) task, or None when the window did not run."""
    out: list[Chain | None] = [None] * len(tasks)
    rows = []
    for i, (search, start, seed) in enumerate(tasks):
        prompts, keys, named = search.prompts(session, start, seed)
        chain, start_key, empty_start = search.start_chain(session, start)
        if not named and empty_start:
            continue
        emb = session.embedding(start)
        if isinstance(emb, str):
            search.notes.append(emb)
            continue
        cache_key = (start, start_key)
        n, cached = session.cached_chain(cache_key, keys)
        if cached is not None:
            chain = cached
        if n == len(prompts):
            out[i] = chain
        else:
            rows.append((i, emb, chain, prompts[n:], cache_key, keys))
    decoded = session.decoder.decode_chains([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    for (i, _, _, _, cache_key, keys), chain in zip(rows, decoded, strict=True):
        session.store_chain(cache_key, keys, chain)
        out[i] = chain
    return [None if c is None or c.logits is None else special.expit(c.logits).astype(np.float32) for c in out]


def compute_objects(session, objects: dict) -> dict:
    """Results of the given objects (``{id: _Object}``), computed together."""
    results, searches = {}, []
    for oid, obj in objects.items():
        plan = _plan(session, oid, obj)
        if isinstance(plan, _Search):
            searches.append(plan)
        else:
            results[oid] = plan
    while True:
        tasks = []
        for search in searches:
            budget = session.max_windows - len(search.ran)
            take = 0
            while search.queue and take < budget:
                start, seed = search.queue.popleft()
                tasks.append((search, start, seed))
                take += 1
        if not tasks:
            break
        for (search, start, seed), prob in zip(tasks, _run(session, tasks), strict=True):
            search.after(session, start, seed, prob)
    for search in searches:
        results[search.oid] = search.result(session)
    return results
