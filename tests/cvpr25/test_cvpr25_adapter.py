"""The prediction adapter with stand-in models, exact to the voxel: the challenge's (z, y, x) boxes and clicks land
where they should through the axis mapping, LPS/RAS geometry, anisotropic resampling, windows and paste-back; the box
is a 3-D box prompt or a centre click; prompts are replayed in order; classes share encodes and resolve overlaps."""

import numpy as np
import pytest
import standins

from sammed3d_jax.cvpr25.adapter import ChallengePredictor, NoBoxEmbeddingsError, window_starts
from sammed3d_jax.cvpr25.cases import Box, ClassPrompts
from sammed3d_jax.evaluation.objects import Prompt
from sammed3d_jax.model.config import ModelConfig

SHAPE = (20, 40, 36)  # (z, y, x)
ISO = (1.5, 1.5, 1.5)
BOX1 = Box(z_min=4, z_max=12, z_mid=8, z_mid_x_min=5, z_mid_y_min=10, z_mid_x_max=20, z_mid_y_max=18)
BOX2 = Box(z_min=10, z_max=16, z_mid=12, z_mid_x_min=15, z_mid_y_min=15, z_mid_x_max=30, z_mid_y_max=30)


def _image(shape=SHAPE):
    return np.random.default_rng(0).uniform(1.0, 255.0, shape).astype(np.float32)


def _region(box: Box, shape=SHAPE):
    (z0, y0, x0), (z1, y1, x1) = box.lo_hi()
    m = np.zeros(shape, bool)
    m[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = True
    return m


def _margin(box: Box, shape=SHAPE):
    """The box stand-in's logit at every voxel (``standins.box_logits`` on the case's own iso grid)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    lo, hi = np.asarray(box.lo_hi()[0]) - 0.5, np.asarray(box.lo_hi()[1]) + 0.5
    return 0.25 + np.min(np.minimum(grid - lo, hi - grid), axis=-1)


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_box_prompts_land_on_their_boxes_and_overlaps_go_to_the_stronger_class(orientation):
    pred = standins.predictor(box=True, orientation=orientation)
    assert pred.box_prompt == "box"
    segs, report = pred.predict_with_report(_image(), ISO, [ClassPrompts(BOX1), ClassPrompts(BOX2)])
    assert segs.dtype == np.uint8 and segs.shape == SHAPE
    m1, m2 = _margin(BOX1), _margin(BOX2)
    expected = np.where((m1 > 0) & (m1 >= m2), 1, np.where(m2 > 0, 2, 0))  # ties keep the earlier class
    assert np.array_equal(segs, expected)
    assert (segs == 2).any() and (_region(BOX1) & _region(BOX2) & (segs == 1)).any()  # the overlap is split
    assert report.encodes == 2 and [len(w) for w in report.windows] == [1, 1] and report.notes == []


@pytest.mark.parametrize("stored, order", [((1.5, 1.5, 3.0), "xyz"), ((3.0, 1.5, 1.5), "zyx")])
def test_anisotropic_spacing_in_either_stored_order(stored, order):
    # z voxels of 3 mm are resampled to twice as many 1.5 mm voxels and pasted back: the box is still exact.
    pred = standins.predictor(box=True, spacing_order=order)
    segs = pred.predict_case(_image(), stored, [ClassPrompts(BOX1)])
    assert np.array_equal(segs, _region(BOX1).astype(np.uint8))


def test_two_embedding_models_get_a_click_at_the_box_centre():
    pred = standins.predictor(box=False)
    assert pred.box_prompt == "centre click"
    segs = pred.predict_case(_image(), ISO, [ClassPrompts(BOX1)])
    (z0, y0, x0), (z1, y1, x1) = BOX1.lo_hi()
    centre = ((z0 + z1) / 2, (y0 + y1) / 2, (x0 + x1) / 2)
    assert np.array_equal(segs, standins.ball_mask(SHAPE, centre).astype(np.uint8))
    assert ChallengePredictor(standins.segmenter(), None, box_mode="click").box_prompt == "centre click"
    assert standins.predictor(box=True, box_mode="click").box_prompt == "centre click"


def test_clicks_without_box_and_a_class_with_only_negative_clicks():
    fg, bg = (10, 20, 18), (10, 20, 21)
    prompts = [ClassPrompts(None, ((fg, True), (bg, False))), ClassPrompts(None, ((bg, False),))]
    segs, report = standins.predictor(box=False).predict_with_report(_image(), ISO, prompts)
    expected = standins.ball_mask(SHAPE, fg) & ~standins.ball_mask(SHAPE, bg, radius=2.0)
    assert np.array_equal(segs, expected.astype(np.uint8))
    assert report.notes == ["class 2: no box and no positive click, left empty"] and report.windows[1] == []


def test_clicks_are_replayed_in_the_order_given():
    a, b = (8, 12, 10), (12, 25, 22)
    pred = standins.predictor(box=False, rule="last")
    ab = pred.predict_case(_image(), ISO, [ClassPrompts(None, ((a, True), (b, True)))])
    ba = pred.predict_case(_image(), ISO, [ClassPrompts(None, ((b, True), (a, True)))])
    assert np.array_equal(ab, standins.ball_mask(SHAPE, b).astype(np.uint8))
    assert np.array_equal(ba, standins.ball_mask(SHAPE, a).astype(np.uint8))
    after_box = pred.predict_case(_image(), ISO, [ClassPrompts(BOX2, ((a, True),))])  # centre click, then a
    assert np.array_equal(after_box, standins.ball_mask(SHAPE, a).astype(np.uint8))


def test_box_plus_clicks_with_box_embeddings():
    pos, neg = (14, 23, 26), (8, 14, 12)  # a positive click outside the box, a negative one inside
    segs = standins.predictor(box=True).predict_case(_image(), ISO, [ClassPrompts(BOX1, ((pos, True),
                                                                                         (neg, False)))])
    expected = ((_margin(BOX1) > 0) | standins.ball_mask(SHAPE, pos)) & ~standins.ball_mask(SHAPE, neg, radius=2.0)
    assert np.array_equal(segs, expected.astype(np.uint8))


def test_a_box_wider_than_the_window_is_tiled():
    wide = Box(z_min=6, z_max=10, z_mid=8, z_mid_x_min=1, z_mid_y_min=12, z_mid_x_max=34, z_mid_y_max=16)
    segs, report = standins.predictor(box=True).predict_with_report(_image(), ISO, [ClassPrompts(wide)])
    assert len(report.windows[0]) == 2 and report.encodes == 2
    assert np.array_equal(segs, _region(wide).astype(np.uint8))


def test_classes_with_the_same_window_share_one_encode():
    _, report = standins.predictor(box=True).predict_with_report(_image(), ISO, [ClassPrompts(BOX1)] * 3)
    assert report.encodes == 1 and len(set(map(tuple, report.windows))) == 1


def test_window_over_empty_background_is_noted_and_left_empty():
    segs, report = standins.predictor(box=True).predict_with_report(np.zeros(SHAPE, np.float32), ISO,
                                                                    [ClassPrompts(BOX1)])
    assert not segs.any() and "no voxel" in report.notes[0] and report.notes[1].startswith("class 1: no window")


def test_box_mode_box_needs_box_embeddings():
    with pytest.raises(NoBoxEmbeddingsError, match="this checkpoint has no box embeddings"):
        ChallengePredictor(standins.segmenter(), None, box_mode="box")
    assert not ModelConfig.variant("tiny").supports_boxes
    with pytest.raises(ValueError, match="box mode must be one of"):
        ChallengePredictor(standins.segmenter(), None, box_mode="boxes")


def test_click_buffer_limit_names_the_class():
    clicks = tuple(((10, 20, 18 + (i % 3)), True) for i in range(9))
    with pytest.raises(ValueError, match="class 1: 9 prompts exceed the click buffer of 8"):
        standins.predictor(box=False).predict_case(_image(), ISO, [ClassPrompts(None, clicks)])


def test_window_starts():
    assert window_starts((10, 10, 10), (20, 20, 20), 32, 27) == [(-1, -1, -1)]
    tiles = window_starts((0, 0, 0), (80, 10, 10), 32, 27)  # 80 voxels: 4 windows 16 apart cover 0..80
    assert [t[0] for t in tiles] == [0, 16, 32, 48] and {t[1:] for t in tiles} == {(-11, -11)}
    few = window_starts((0, 0, 0), (80, 80, 80), 32, 27)  # 4^3 > 27: the fewest covering windows, 3 per axis
    assert len(few) == 27 and sorted({t[0] for t in few}) == [0, 24, 48]


@pytest.mark.slow
def test_box_prompt_through_a_box_capable_model():
    import jax
    import jax.numpy as jnp

    from sammed3d_jax.model import init_variables
    from sammed3d_jax.model.sam import Sam3D, upsample_logits

    cfg = ModelConfig.variant("tiny").replace(num_point_embeddings=4)
    variables = init_variables(cfg, jax.random.key(0))
    pred = ChallengePredictor.from_model(variables, cfg)
    assert cfg.supports_boxes and pred.box_prompt == "box"
    roi = np.random.default_rng(2).normal(size=(32, 32, 32)).astype(np.float32)
    box6 = np.array([3.0, 5.0, 7.0, 20.0, 22.0, 24.0])
    emb = pred.decoder.encode(roi)
    (chain,) = pred.decoder.decode_chains([emb], [pred.decoder.empty_chain()], [[Prompt("box", tuple(box6))]])
    got = chain.logits
    model = Sam3D(cfg)
    low, _ = model.apply(variables, emb, None, None, jnp.zeros((1, 16, 16, 16, 1)),
                         boxes=jnp.asarray(box6[None], jnp.float32), method=Sam3D.decode)  # upstream's box-only call
    np.testing.assert_allclose(got, np.asarray(upsample_logits(low, 32))[0, ..., 0], atol=1e-5)
    segs = pred.predict_case(_image(), ISO, [ClassPrompts(BOX1, (((8, 14, 12), True),))])
    assert segs.shape == SHAPE and segs.dtype == np.uint8
