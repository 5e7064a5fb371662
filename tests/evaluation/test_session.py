"""The session API with stand-in models whose answers are known: voxel and world prompts, several objects and their
label map, undo and reset, boxes (prompt or centre click), initial masks, what is encoded and decoded (caches),
shared windows, and the messages for bad requests."""

import numpy as np
import pytest
from eval_standins import S, ball_segmenter, box, box_decoder, echo_decoder, geometry

from sammed3d_jax.evaluation.objects import ObjectDecoder
from sammed3d_jax.session import Session

SHAPE = (40, 36, 30)


def _ball(centre, radius=4.0, shape=SHAPE):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) < radius


def _session(decoder=None, **kwargs):
    decoder = decoder or ObjectDecoder.from_segmenter(ball_segmenter())
    image = np.random.default_rng(0).uniform(1.0, 2.0, SHAPE).astype(np.float32)
    return Session(decoder, **kwargs).open(image, geometry(SHAPE, kind="lps").affine)


class _Counting:
    """Wraps a decoder's decode_chains and encode to count what they were asked to do."""

    def __init__(self, decoder):
        self.decoder, self.prompts, self.encodes = decoder, 0, 0
        original_decode, original_encode = decoder.decode_chains, decoder.encode

        def decode(embeddings, chains, prompts):
            self.prompts += sum(len(p) for p in prompts)
            return original_decode(embeddings, chains, prompts)

        def encode(roi):
            self.encodes += 1
            return original_encode(roi)

        decoder.decode_chains, decoder.encode = decode, encode


def test_voxel_and_world_points_several_objects_and_the_label_map():
    s = _session()
    geom = s.geometry
    a, b = s.add_object(), s.add_object("second")
    s.add_point(a, (10, 12, 8))
    world = geom.affine @ np.array([14.0, 12.0, 8.0, 1.0])
    s.add_point(b, world[:3], world=True)
    np.testing.assert_array_equal(s.mask(a), _ball((10, 12, 8)))  # 1.5 mm LPS: the model grid is a flip away
    np.testing.assert_array_equal(s.mask(b), _ball((14, 12, 8)))
    labels = s.label_map()
    assert labels.dtype == np.uint8 and labels.shape == SHAPE
    # Overlap: equidistant voxels (x = 12) tie and go to the lower id; the rest to the nearer click.
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    da, db = (np.linalg.norm(grid - c, axis=-1) for c in ((10, 12, 8), (14, 12, 8)))
    expected = np.where((da < 4) & (da <= db), a, np.where(db < 4, b, 0))
    np.testing.assert_array_equal(labels, expected)
    assert s.info(a).windows and s.info(a).complete and s.objects == [a, b]


def test_undo_reset_and_the_caches():
    decoder = ObjectDecoder.from_segmenter(ball_segmenter())
    count = _Counting(decoder)
    s = _session(decoder)
    obj = s.add_object()
    s.add_point(obj, (10, 12, 8))
    first = s.mask(obj)
    assert count.prompts == 1 and count.encodes == 1
    s.add_point(obj, (12, 12, 8), positive=False)  # inside the same window: one more decode, no encode
    second = s.mask(obj)
    assert count.prompts == 2 and count.encodes == 1
    np.testing.assert_array_equal(second, _ball((10, 12, 8)) & ~_ball((12, 12, 8), radius=2.001))  # dist <= 2
    assert s.undo(obj) == "point"
    np.testing.assert_array_equal(s.mask(obj), first)
    assert count.prompts == 2 and count.encodes == 1  # undo decodes nothing
    s.reset(obj)
    assert not s.mask(obj).any() and "no prompt" in s.info(obj).notes[0]
    with pytest.raises(ValueError, match="has nothing to undo"):
        s.undo(obj)
    s.add_point(obj, (10, 12, 8), positive=False)
    assert not s.mask(obj).any() and "negative clicks alone" in s.info(obj).notes[0]
    s.remove_object(obj)
    with pytest.raises(ValueError, match="no object 1 in this session"):
        s.mask(obj)


def test_boxes_are_box_prompts_or_centre_clicks():
    lo, hi = (8, 10, 6), (16, 20, 12)
    region = box(SHAPE, lo, np.add(hi, 1))
    with_box = _session(box_decoder())
    obj = with_box.add_object()
    with_box.add_box(obj, lo, hi)
    assert with_box.box_prompt == "box"
    np.testing.assert_array_equal(with_box.mask(obj), region)
    with_box.add_point(obj, (25, 25, 20))  # outside the box: the window covers both, the ball joins the box
    np.testing.assert_array_equal(with_box.mask(obj), region | _ball((25, 25, 20)))
    clicks = _session()  # no box embeddings: a positive click at the box centre
    obj = clicks.add_object()
    clicks.add_box(obj, lo, hi)
    assert clicks.box_prompt == "centre click"
    np.testing.assert_array_equal(clicks.mask(obj), _ball(np.add(lo, hi) / 2))
    with pytest.raises(ValueError, match="no box embeddings"):
        Session(ObjectDecoder.from_segmenter(ball_segmenter()), box_mode="box")
    with pytest.raises(ValueError, match="first corner .* must be the lower one"):
        clicks.add_box(obj, hi, lo)


def test_initial_mask_is_the_prediction_and_the_next_prompt_starts_from_it():
    s = _session(echo_decoder())
    obj = s.add_object()
    given = box(SHAPE, (8, 8, 8), (16, 16, 16))
    s.set_mask(obj, given)
    np.testing.assert_array_equal(s.mask(obj), given)
    assert s.info(obj).windows == ()  # nothing to decode yet
    s.add_point(obj, (30, 30, 24))
    # The echo stand-in returns its mask prompt: the given mask (4-voxel cells, here aligned) plus the new ball.
    np.testing.assert_array_equal(s.mask(obj), given | _ball((30, 30, 24)))
    assert s.undo(obj) == "point" and s.undo(obj) == "mask" and not s.mask(obj).any()
    with pytest.raises(ValueError, match="shape"):
        s.set_mask(obj, np.zeros((4, 4, 4), bool))


def test_grid_windows_let_nearby_objects_share_one_encode():
    for windows, encodes in (("centred", 2), ("grid", 1)):
        decoder = ObjectDecoder.from_segmenter(ball_segmenter())
        count = _Counting(decoder)
        s = _session(decoder, windows=windows, grow=False)
        a, b = s.add_object(), s.add_object()
        s.add_point(a, (15, 14, 12))
        s.add_point(b, (17, 13, 13))  # centred windows differ by a few voxels; on the lattice they coincide
        s.compute()
        assert count.encodes == encodes == s.encodes, windows
        np.testing.assert_array_equal(s.mask(a), _ball((15, 14, 12)))
        np.testing.assert_array_equal(s.mask(b), _ball((17, 13, 13)))


def test_bad_requests_are_named():
    s = Session(ObjectDecoder.from_segmenter(ball_segmenter()))
    with pytest.raises(ValueError, match="no image is open"):
        s.add_object()
    with pytest.raises(ValueError, match="needs its affine"):
        s.open(np.ones(SHAPE, np.float32))
    s = _session()
    obj = s.add_object("liver")
    with pytest.raises(ValueError, match=r"liver: point 1 \(voxel \[40.0, 0.0, 0.0\]\) lies outside the volume"):
        s.add_point(obj, (40, 0, 0))
    with pytest.raises(ValueError, match="windows must be one of"):
        Session(ObjectDecoder.from_segmenter(ball_segmenter()), windows="tiles")
    assert S == 32
