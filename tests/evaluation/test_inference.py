"""Inference chain: exact geometry round trip with stand-in models, click protocol wiring, the ABSENT click buffer
against exact-length decoding with the tiny model, one compilation for every click, bad-input messages, and the
integer-typed image cast of torchio's Resample."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_standins import S, ball_segmenter, bright_image, box, geometry, threshold_segmenter

from sammed3d_jax.data import transforms
from sammed3d_jax.evaluation import inference, objects
from sammed3d_jax.model.sam import Sam3D, upsample_logits
from sammed3d_jax.shapes import ABSENT


def _simulate(segmenter, roi, key, counts, mode="random", first_click=None):
    decoder = objects.ObjectDecoder.from_segmenter(segmenter)
    return objects.simulate_rois(decoder, [roi], [key], counts, mode, [first_click])[0]


def _run_chain(segmenter, image, label, geom, spacing=(1.5, 1.5, 1.5)):
    case = inference.resample_case(image, geom, label, spacing)
    target = case.label > 0
    roi = inference.crop_roi(case, inference.target_crop(target, S), target, name="case")
    sim = _simulate(segmenter, roi, jax.random.key(0), (1, 2))
    return roi, sim, inference.paste_back(sim.masks[2], roi.geom, geom)


@pytest.mark.parametrize("kind", ["ras", "lps", "permuted", "oblique"])
def test_geometry_chain_is_exact_at_the_model_spacing(kind):
    # At 1.5 mm resampling is the identity, so RAS reorientation, crop, "perfect" prediction and paste-back must
    # give back the label voxel for voxel, whatever the orientation (a flipped or shifted axis would not).
    shape = (40, 36, 30)
    label = box(shape, (5, 20, 3), (19, 29, 25)) & ~box(shape, (5, 20, 3), (8, 23, 6))  # asymmetric: flips show
    geom = geometry(shape, kind=kind)
    roi, sim, pasted = _run_chain(threshold_segmenter(), bright_image(label), label.astype(np.uint8), geom)
    assert roi.image.shape == (S, S, S) and roi.geom.orientation == ("R", "A", "S")
    np.testing.assert_array_equal(sim.masks[1], roi.gt)
    assert pasted.shape == shape and pasted.dtype == bool
    np.testing.assert_array_equal(pasted, label)


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_geometry_chain_aligned_with_anisotropic_label(kind):
    # 1.2 x 1.1 x 2.8 mm grid: resampling to 1.5 mm loses detail, but pasting the ROI's ground truth back must equal
    # the plain nearest round trip (resample, resample back: no RAS, no crop) and must not shift the target.
    shape = (60, 64, 24)
    geom = geometry(shape, spacing=(1.2, 1.1, 2.8), kind=kind)
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3]
    centre = geom.affine[:3, :3] @ (np.array(shape) / 2 - 3) + geom.affine[:3, 3]
    label = (np.sum(((world - centre) / [18.0, 14.0, 10.0]) ** 2, axis=1) <= 1).reshape(shape)
    case = inference.resample_case(bright_image(label), geom, label.astype(np.uint8))
    target = case.label > 0
    roi = inference.crop_roi(case, inference.target_crop(target, S), target)
    assert roi.gt.sum() == target.sum()  # the whole target is inside the crop
    pasted = inference.paste_back(roi.gt, roi.geom, geom)
    resampled, grid = transforms.resample_to_spacing(label.astype(np.uint8), geom, (1.5, 1.5, 1.5), order=0)
    np.testing.assert_array_equal(pasted, transforms.resample_to_geometry(resampled, grid, geom, order=0) > 0)
    assert 2 * (pasted & label).sum() / (pasted.sum() + label.sum()) > 0.95
    centroid = [geom.affine[:3, :3] @ np.argwhere(m).mean(0) for m in (pasted, label)]
    assert np.linalg.norm(centroid[0] - centroid[1]) < 0.5  # mm; one voxel off along any axis would be >= 1.1


def test_simulated_clicks_come_from_the_error_of_the_previous_prediction():
    gt = np.zeros((S, S, S), bool)
    gt[4:20, 6:26, 8:14] = True
    roi = inference.Roi(np.zeros((S, S, S), np.float32), gt, inference.window_at((S, S, S), (0, 0, 0), S),
                        geometry((S, S, S)))
    counts = tuple(range(1, 7))
    for mode in ("random", "ritm_random"):
        sim = _simulate(ball_segmenter(), roi, jax.random.key(3), counts, mode)
        assert sim.points.shape == (6, 3) and len(sim.click_s) == 6 and sorted(sim.masks) == list(counts)
        previous = np.zeros_like(gt)
        for t, (p, label) in enumerate(zip(sim.points.astype(int), sim.labels, strict=True)):
            error = gt ^ previous
            assert error[tuple(p)], f"{mode}: click {t + 1} at {p} outside the error region"
            assert label == int(gt[tuple(p)])
            previous = sim.masks[t + 1]
        again = _simulate(ball_segmenter(), roi, jax.random.key(3), counts, mode)
        np.testing.assert_array_equal(again.points, sim.points)  # seeded: same clicks for the same key


def test_given_first_click_is_used_as_click_one():
    gt = box((S, S, S), (10, 10, 10), (20, 20, 20))
    roi = inference.Roi(np.zeros((S, S, S), np.float32), gt, inference.window_at((S, S, S), (0, 0, 0), S),
                        geometry((S, S, S)))
    sim = _simulate(ball_segmenter(), roi, jax.random.key(0), (1, 2), first_click=np.array([16.0, 15, 14]))
    np.testing.assert_array_equal(sim.points[0], [16, 15, 14])
    assert sim.labels[0] == 1
    # warmup compiles everything a run needs, also for a one-click buffer (click_counts=(1,)): the run after it
    # compiles nothing more, so the reported click times hold no compilation.
    one = objects.ObjectDecoder.from_segmenter(ball_segmenter(max_clicks=1))
    one.warmup((1,), ("random", "ritm"))
    compiled = [f._cache_size() for f in (one._encode, one._user, *one._simulated.values())]
    for mode in ("random", "ritm"):
        run = objects.simulate_rois(one, [roi], [jax.random.key(1)], (1,), mode)[0]
        assert run.labels.tolist() == [1] and run.masks[1][tuple(run.points[0].astype(int))]
    assert [f._cache_size() for f in (one._encode, one._user, *one._simulated.values())] == compiled


def test_click_buffer_equals_decoding_with_exactly_the_present_clicks(tiny):
    cfg, variables = tiny
    s = cfg.image_size
    seg = inference.Segmenter.from_model(variables, cfg, max_clicks=6)
    roi = np.random.default_rng(0).normal(size=(s, s, s)).astype(np.float32)
    clicks = [((3, 4, 5), True), ((20, 9, 30), False), ((16, 16, 16), True), ((0, 31, 7), False)]
    model = Sam3D(cfg)
    decode = jax.jit(lambda v, e, p, l, m: model.apply(v, e, p, l, m, multimask_output=False, method=Sam3D.decode))
    inter = seg.start(roi)
    compiled_before = seg._click._cache_size()  # The jitted click is shared per config: other tests may have run it.
    for t, (point, positive) in enumerate(clicks, 1):
        previous = inter.low_logits
        inter = seg.click(inter, point, positive)
        assert inter.n_clicks == t and (np.asarray(inter.labels[0, t:]) == ABSENT).all()
        if t in (1, 3):  # each length compiles the reference once; two lengths keep the test fast
            points = jnp.asarray([[p for p, _ in clicks[:t]]], jnp.float32)
            labels = jnp.asarray([[int(q) for _, q in clicks[:t]]], jnp.int32)
            low, _ = decode(variables, inter.embedding, points, labels, previous)
            np.testing.assert_allclose(np.asarray(inter.low_logits), np.asarray(low), atol=1e-5)
            full = upsample_logits(low, s)[..., 0]
            np.testing.assert_allclose(np.asarray(inter.logits), np.asarray(full), atol=1e-5)
    assert not np.array_equal(np.asarray(inter.low_logits), np.zeros_like(inter.low_logits))
    assert seg._click._cache_size() - compiled_before <= 1  # one compilation (at most) served every click count


def test_simulated_interaction_replays_through_the_user_click_path(tiny):
    cfg, variables = tiny
    s = cfg.image_size
    seg = inference.Segmenter.from_model(variables, cfg, max_clicks=6)
    gt = box((s, s, s), (8, 10, 6), (20, 26, 18))
    rng = np.random.default_rng(1)
    roi = inference.Roi(rng.normal(size=(s, s, s)).astype(np.float32) + 2 * gt, gt,
                        inference.window_at((s, s, s), (0, 0, 0), s), geometry((s, s, s)))
    sim = _simulate(seg, roi, jax.random.key(7), (1, 2, 3, 4))
    assert sim.labels[0] == 1 and gt[tuple(sim.points[0].astype(int))]
    inter = seg.start(roi.image)
    for t, (p, label) in enumerate(zip(sim.points, sim.labels, strict=True), 1):
        inter = seg.click(inter, p, bool(label))
        np.testing.assert_array_equal(inter.mask(), sim.masks[t])
    decoder = objects.ObjectDecoder.from_segmenter(seg)
    assert decoder._simulated["random"]._cache_size() == 1


def test_bad_inputs_have_clear_messages():
    seg = ball_segmenter(max_clicks=2)
    inter = seg.start(np.zeros((S, S, S), np.float32))
    with pytest.raises(ValueError, match=r"outside the 32\^3 ROI"):
        seg.click(inter, (40, 1, 1), True)
    with pytest.raises(ValueError, match="differs from the model's crop"):
        seg.start(np.zeros((S, S, 8), np.float32))
    inter = seg.click(seg.click(inter, (1, 1, 1), True), (2, 2, 2), True)
    with pytest.raises(ValueError, match="click buffer full"):
        seg.click(inter, (3, 3, 3), True)
    empty = inference.Roi(np.zeros((S, S, S), np.float32), np.zeros((S, S, S), bool),
                          inference.window_at((S, S, S), (0, 0, 0), S), geometry((S, S, S)))
    with pytest.raises(ValueError, match="ground-truth target is empty"):
        _simulate(seg, empty, jax.random.key(0), (1,))
    with pytest.raises(ValueError, match="click mode"):
        inference.click_rule("bogus", 0)
    case = inference.resample_case(np.zeros((40, 40, 40), np.float32), geometry((40, 40, 40)))
    with pytest.raises(ValueError, match="no voxel > 0.*scan.nii.gz"):
        inference.crop_roi(case, inference.window_at(case.geom.shape, (0, 0, 0), S), name="scan.nii.gz")
    assert dataclasses.is_dataclass(case)


def test_integer_images_are_resampled_as_torchio_hands_them_back():
    # 1 mm -> 1.5 mm along axis 0 (4 voxels -> 2): torchio's grid keeps the centre, so the samples fall at source
    # indices 0.75 and 2.25 and each value is v[i0] + frac * (v[i1] - v[i0]) in double precision, then truncated
    # toward zero (neither rounded nor floored) in the image's own type, as ITK casts back to int16.
    geom = geometry((4, 1, 1), spacing=(1.0, 1.5, 1.5), kind="ras")
    image = np.array([10, 11, -7, -8], np.int16).reshape(4, 1, 1)
    out, grid = inference.resample_image(image, geom, (1.5, 1.5, 1.5))
    assert grid.shape == (2, 1, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out.ravel(), [10.0, -7.0])  # 10.75 -> 10 (round: 11), -7.25 -> -7 (floor: -8)
    floats, _ = inference.resample_image(image.astype(np.float32), geom, (1.5, 1.5, 1.5))
    np.testing.assert_allclose(floats.ravel(), [10.75, -7.25])  # float images are not cast
    # Just below and just above an integer, of either sign (frac 0.75 at the first sample).
    for (a, b), expected in [((0, 1), 0), ((2, 1), 1), ((0, -1), 0), ((-2, -1), -1), ((-4, -4), -4)]:
        pair, _ = inference.resample_image(np.array([a, b, 0, 0], np.int16).reshape(4, 1, 1), geom)
        assert pair.ravel()[0] == expected, (a, b, pair.ravel())
    u8, _ = inference.resample_image(np.array([255, 0, 0, 0], np.uint8).reshape(4, 1, 1), geom)
    assert u8.ravel()[0] == 63  # 255 - 0.75 * 255 = 63.75
    # A whole case: an int16 image goes through the cast, its float32 copy does not.
    shape = (12, 10, 8)
    ct = np.random.default_rng(0).integers(-1000, 1000, shape).astype(np.int16)
    g = geometry(shape, spacing=(0.8, 1.1, 2.3), kind="lps")
    cast = inference.resample_case(ct, g).image
    plain = inference.resample_case(ct.astype(np.float32), g).image
    np.testing.assert_array_equal(cast, np.trunc(inference.resample_case(ct.astype(np.float64), g).image))
    assert np.abs(cast - plain).max() < 1.0 and not np.array_equal(cast, plain)
