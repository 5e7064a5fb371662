"""Several objects per encode: batched chains equal one-object decodes with the tiny model (rows of different
lengths, shared and separate embeddings, padding), simulated users per row equal one-row runs, one compilation per
batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_standins import S, ball_segmenter, box, geometry

from sammed3d_jax.evaluation import inference
from sammed3d_jax.evaluation.objects import ObjectDecoder, Prompt
from sammed3d_jax.model.sam import Sam3D, upsample_logits


def _reference(cfg, variables, emb, clicks):
    """Upstream's chain for one object: decode after each click with every click so far, previous logits fed back."""
    model = Sam3D(cfg)
    decode = jax.jit(lambda v, e, p, l, m: model.apply(v, e, p, l, m, multimask_output=False, method=Sam3D.decode))
    low = jnp.zeros((1,) + (cfg.low_res_size,) * 3 + (1,))
    for t in range(1, len(clicks) + 1):
        points = jnp.asarray([[c for c, _ in clicks[:t]]], jnp.float32)
        labels = jnp.asarray([[int(p) for _, p in clicks[:t]]], jnp.int32)
        low, _ = decode(variables, emb, points, labels, low)
    return np.asarray(upsample_logits(low, cfg.image_size))[0, ..., 0]


def test_batched_chains_equal_one_object_decodes(tiny):
    cfg, variables = tiny
    s = cfg.image_size
    dec = ObjectDecoder.from_model(variables, cfg, max_prompts=4, max_batch=4)
    compiled_before = dec._user._cache_size()  # The jitted steps are shared per config: other tests may have run them.
    rng = np.random.default_rng(1)
    embs = [dec.encode(rng.normal(size=(s, s, s)).astype(np.float32)) for _ in range(2)]
    clicks = [[((3, 4, 5), True), ((20, 9, 30), False)], [((16, 16, 16), True)],
              [((1, 30, 7), True), ((28, 2, 20), False)]]
    rows_emb = [embs[0], embs[0], embs[1]]  # two objects share a window, one has its own
    prompts = [[Prompt("click", c, p) for c, p in row] for row in clicks]
    chains = dec.decode_chains(rows_emb, [dec.empty_chain()] * 3, prompts)  # 3 rows padded to 4
    for chain, emb, row in zip(chains, rows_emb, clicks, strict=True):
        assert chain.count == len(row)
        np.testing.assert_allclose(chain.logits, _reference(cfg, variables, emb, row), atol=1e-5)
    # Continuing a chain with one more click equals the whole sequence at once; other rows are untouched.
    more = dec.decode_chains([embs[0], embs[1]], [chains[1], chains[2]], [[Prompt("click", (5, 5, 5), False)], []])
    assert more[0].count == 2
    np.testing.assert_allclose(more[0].logits, _reference(cfg, variables, embs[0], clicks[1] + [((5, 5, 5), False)]),
                               atol=1e-5)
    assert more[1] is chains[2]
    # One compiled program per padded batch size (4 served both calls: 3 rows and 2 rows).
    assert dec._user._cache_size() - compiled_before <= 2  # at most sizes 4 and 2 (3 rows padded to 4)
    dec.decode_chains([embs[0]], [chains[2]], [[Prompt("click", (1, 1, 1))] * 2])  # 2 + 2 clicks: the buffer's 4
    with pytest.raises(ValueError, match="5 clicks in one window exceed the click buffer of 4"):
        dec.decode_chains([embs[0]], [chains[2]], [[Prompt("click", (1, 1, 1))] * 3])
    with pytest.raises(ValueError, match="box prompts need a model with box embeddings"):
        dec.decode_chains([embs[0]], [dec.empty_chain()], [[Prompt("box", (1, 1, 1, 5, 5, 5))]])


def test_more_rows_than_a_batch_are_split(tiny):
    cfg, variables = tiny
    s = cfg.image_size
    dec = ObjectDecoder.from_model(variables, cfg, max_prompts=2, max_batch=2)
    emb = dec.encode(np.random.default_rng(2).normal(size=(s, s, s)).astype(np.float32))
    rows = [[Prompt("click", (4.0 * k, 8, 8), True)] for k in range(4)]
    chains = dec.decode_chains([emb] * 4, [dec.empty_chain()] * 4, rows)  # two calls of two rows
    for k, chain in enumerate(chains):
        np.testing.assert_allclose(chain.logits, _reference(cfg, variables, emb, [((4.0 * k, 8, 8), True)]),
                                   atol=1e-5)


def test_simulated_rows_equal_one_row_runs():
    # Per-row keys: a row's clicks do not depend on the other rows of its batch.
    dec = ObjectDecoder.from_segmenter(ball_segmenter(max_clicks=5))
    emb = dec.encode(np.zeros((S, S, S), np.float32))
    gts = [box((S, S, S), (4, 6, 8), (20, 26, 14)), box((S, S, S), (10, 10, 10), (13, 13, 13)),
           box((S, S, S), (0, 0, 0), (32, 8, 8))]
    keys = [jax.random.key(k) for k in (5, 6, 7)]
    rules = ["ritm", "ritm", "random", "random", "random"]
    counts = (1, 2, 3, 4, 5)
    together = dec.simulate([emb] * 3, gts, keys, counts, rules)
    for k in range(3):
        alone = dec.simulate([emb], [gts[k]], [keys[k]], counts, rules)[0]
        np.testing.assert_array_equal(together[k].points, alone.points)
        previous = np.zeros((S, S, S), bool)
        for t, (p, label) in enumerate(zip(together[k].points.astype(int), together[k].labels, strict=True)):
            np.testing.assert_array_equal(together[k].masks[t + 1], alone.masks[t + 1])
            assert (gts[k] ^ previous)[tuple(p)] and label == int(gts[k][tuple(p)])  # drawn from the last error
            previous = together[k].masks[t + 1]
    with pytest.raises(ValueError, match="exceed the click buffer"):
        dec.simulate([emb], [gts[0]], [keys[0]], (6,), ["random"] * 6)


def test_rois_sharing_a_window_share_one_encode():
    seg = ball_segmenter(max_clicks=2)
    dec = ObjectDecoder.from_segmenter(seg)
    calls = []
    original = dec.encode
    dec.encode = lambda roi: calls.append(1) or original(roi)
    gt = box((S, S, S), (10, 10, 10), (20, 20, 20))
    window = inference.window_at((S, S, S), (0, 0, 0), S)
    other = inference.window_at((S, S, S), (1, 0, 0), S)
    image = np.ones((S, S, S), np.float32)
    g = geometry((S, S, S))
    rois = [inference.Roi(image, gt, window, g), inference.Roi(image, gt, window, g), inference.Roi(image, gt, other, g)]
    from sammed3d_jax.evaluation.objects import simulate_rois

    sims = simulate_rois(dec, rois, [jax.random.key(k) for k in range(3)], (1, 2))
    assert len(calls) == 2 and len(sims) == 3 and all(sim.encode_s >= 0 for sim in sims)
    assert sims[0].encode_s == sims[1].encode_s  # the shared encode's time is split between its two targets
