"""Off-centre training crops (``target_offset``): the target stays whole inside the crop, the shift is seeded per
element, 0 is today's centred crop bit for bit, and a shifted crop that cannot be normalised falls back."""

import dataclasses

import numpy as np
import pytest
from pipeline_store import ball, make_store, record_json

from sammed3d_jax.data import cache, pipeline, sampler, transforms

CROP = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("prepared"))


def _batches(store, n=4, rows=range(3), **kwargs):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=3, rows=rows, seed=5, **kwargs)
    return [next(it) for _ in range(n)]


def _record(bbox, shape=(80, 70, 60), window_start=()):
    return cache.PreparedRecord(
        id="r", case="c", dataset="d", target="t", modality="MRI", label_value=1, image="i.npy", label="l.npy",
        shape=shape, spacing_mm=(1.0,) * 3, affine=tuple(map(tuple, np.eye(4))), bbox=bbox, foreground_voxels=2000,
        source_volume_mm3=2000.0, source_image="i", source_label="l", window_start=window_start)


def test_offset_range_keeps_the_box_inside_and_draws_cover_it():
    rng = np.random.default_rng(0)
    for _ in range(200):
        first = rng.integers(-5, 60, 3)
        extent = rng.integers(1, 45, 3)  # some axes longer than the crop
        rec = _record(tuple((int(a), int(a + e)) for a, e in zip(first, extent)))
        lo, hi = sampler.offset_range(rec, CROP)
        start = np.array(sampler.crop_window(rec, CROP).start)
        assert np.all(lo <= 0) and np.all(hi >= 0)
        for shift in (lo, hi):  # the extreme shifts: the box touches a crop face, still inside
            s = start + shift
            fits = extent <= CROP
            assert np.all(~fits | ((s <= first) & (first + extent <= s + CROP)))
        np.testing.assert_array_equal(lo[extent > CROP], 0)
        np.testing.assert_array_equal(hi[extent > CROP], 0)
        np.testing.assert_array_equal(hi - lo, np.where(extent <= CROP, CROP - extent, 0))
        for fraction in (0.25, 1.0):
            d = sampler.draw_offset(rng.random(3), lo, hi, fraction)
            assert np.all(d >= np.ceil(fraction * lo)) and np.all(d <= np.floor(fraction * hi))
    # u = 0 and u -> 1 reach both ends of the (full) range.
    lo, hi = np.array([-3, 0, -7]), np.array([4, 0, 1])
    np.testing.assert_array_equal(sampler.draw_offset(np.zeros(3), lo, hi, 1.0), lo)
    np.testing.assert_array_equal(sampler.draw_offset(np.full(3, 1 - 1e-12), lo, hi, 1.0), hi)
    # A window store: the shifted crop also stays inside the stored window.
    rec = _record(((30, 40), (30, 40), (30, 40)), window_start=(17, 19, 17))
    lo, hi = sampler.offset_range(rec, CROP, window_size=40)
    # centred start 19; target: [-11, 11]; stored window [17, 57) x [19, 59) x [17, 57): [-2, 6] x [0, 8] x [-2, 6]
    np.testing.assert_array_equal(lo, [-2, 0, -2])
    np.testing.assert_array_equal(hi, [6, 8, 6])


def test_offset_zero_is_todays_crop_bit_for_bit(store):
    default = _batches(store)
    explicit = _batches(store, target_offset=0.0)
    _, records = cache.read_index(store)
    for a, b in zip(default, explicit):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(a["offset"], 0)
        for image, label, r in zip(a["image"][..., 0], a["label"], a["record"]):  # the centred raw window
            window = sampler.crop_window(records[r], CROP)
            np.testing.assert_array_equal(image, transforms.apply_crop_or_pad(np.load(store / records[r].image), window))
            np.testing.assert_array_equal(label, transforms.apply_crop_or_pad(np.load(store / records[r].label), window))
    fingerprint = pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=3, rows=range(3),
                                               seed=5)[1]
    assert "target_offset" not in fingerprint  # runs without the option keep their stored data positions


def test_offset_crops_hold_the_whole_target_and_are_seeded(store):
    off = _batches(store, n=6, target_offset=1.0)
    centred = _batches(store, n=6)
    _, records = cache.read_index(store)
    moved = 0
    for a, c in zip(off, centred):
        # The record choice and the flips are drawn before the offset: unchanged.
        for k in ("record", "flip", "element", "redraws", "bad_skipped", "ct_clip"):
            np.testing.assert_array_equal(a[k], c[k], err_msg=k)
        for image, label, r, d in zip(a["image"][..., 0], a["label"], a["record"], a["offset"]):
            rec = records[r]
            lo, hi = sampler.offset_range(rec, CROP)
            assert np.all(lo <= d) and np.all(d <= hi)
            window = sampler.crop_window(rec, CROP)
            shifted = dataclasses.replace(window, start=tuple(int(s + x) for s, x in zip(window.start, d)))
            np.testing.assert_array_equal(image, transforms.apply_crop_or_pad(np.load(store / rec.image), shifted))
            np.testing.assert_array_equal(label, transforms.apply_crop_or_pad(np.load(store / rec.label), shifted))
            fits = all(b - f <= CROP for f, b in rec.bbox)
            if fits:
                assert int(label.sum()) == rec.foreground_voxels  # the whole target is in the crop
            moved += bool(np.any(d))
    assert moved >= len(off) * 3 // 2
    # Same crops on a two-process split (each process its rows) and on a restart from batch 3.
    halves = [_batches(store, n=6, rows=rows, target_offset=1.0) for rows in ((0,), (1, 2))]
    for j, a in enumerate(off):
        np.testing.assert_array_equal(np.concatenate([h[j]["image"] for h in halves]), a["image"])
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=3, rows=range(3), seed=5,
                                       target_offset=1.0)
    it.set_state({"next_batch": 3, "fingerprint": it.get_state()["fingerprint"]})
    np.testing.assert_array_equal(next(it)["offset"], off[3]["offset"])
    with pytest.raises(ValueError, match="target_offset"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0,
                                     target_offset=1.5)
    state = it.get_state()
    plain = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=3, rows=range(3), seed=5)
    with pytest.raises(ValueError, match="target_offset"):
        plain.set_state(state)  # a position saved with offsets does not restore into a pipeline without them


def test_an_unusable_shifted_crop_falls_back_to_the_centred_one(tmp_path):
    shape = (64, 64, 64)
    label = ball(shape, (32, 32, 32), 7).astype(np.uint8)
    image = np.full(shape, 5.0)
    rec = cache.PreparedRecord.from_json(record_json(tmp_path, "c", 1, image, label))
    start = sampler.crop_window(rec, CROP).start
    image[start[0], start[1], start[2]] = 9.0  # the one voxel that makes the centred crop normalisable
    cache.save_array(tmp_path / rec.image, image.astype(np.float32))
    cache.write_json(tmp_path / cache.INDEX_NAME, {"format": cache.FORMAT, "spacing_mm": [1.5] * 3,
                                                   "records": [rec.to_json()], "skipped": []})
    from sammed3d_jax.data import store as store_lib

    reader = sampler.WindowReader(store=store_lib.open_store(tmp_path), records=(rec,), crop_size=CROP)
    batch = {"slot": np.array([0, 0]), "offset": np.array([[2, 0, 0], [-2, 0, 0]], np.int32),
             "ct_clip": np.array([False, False])}
    out = reader.map(batch)
    # Shifted up, the special voxel leaves the crop: constant image, so the centred crop is read instead.
    np.testing.assert_array_equal(out["offset"], [[0, 0, 0], [-2, 0, 0]])
    assert out["image"][0, 0, 0, 0, 0] == 9.0 and out["image"][1, 2, 0, 0, 0] == 9.0


def test_offset_prob_shifts_that_share_of_crops_and_keeps_their_shifts(store):
    every = _batches(store, n=8, target_offset=1.0)
    for a, b in zip(every, _batches(store, n=8, target_offset=1.0, target_offset_prob=1.0)):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["offset"], b["offset"])  # 1 draws nothing more: the same crops
    half = _batches(store, n=8, target_offset=1.0, target_offset_prob=0.5)
    none = _batches(store, n=8, target_offset=1.0, target_offset_prob=0.0)
    kept = centred = 0
    for a, h, z in zip(every, half, none):
        np.testing.assert_array_equal(z["offset"], 0)
        np.testing.assert_array_equal(h["record"], a["record"])
        for d_all, d_half in zip(a["offset"], h["offset"]):
            if np.any(d_half):
                np.testing.assert_array_equal(d_half, d_all)  # a shifted crop is the one drawn at prob 1
                kept += 1
            elif np.any(d_all):
                centred += 1
    assert kept >= 4 and centred >= 4, (kept, centred)  # 24 crops at p = 0.5 (seeded: fixed counts)
    fingerprint = pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=3, rows=range(3), seed=5,
                                               target_offset=1.0, target_offset_prob=0.5)[1]
    assert fingerprint["target_offset_prob"] == 0.5
    with pytest.raises(ValueError, match="target_offset_prob"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0,
                                     target_offset=1.0, target_offset_prob=1.5)


def test_target_voxel_mode_centres_each_shifted_crop_on_a_target_voxel(store):
    label = np.zeros((CROP,) * 3, np.uint8)
    label[3, 4, 5] = label[20, 9, 30] = 1
    np.testing.assert_array_equal(sampler.target_voxels(label, CROP), [[3 - 16, 4 - 16, 5 - 16], [4, 9 - 16, 14]])
    np.testing.assert_array_equal(sampler.clamp_offset(np.array([-13, -12, 14]), np.array([-4, -20, 0]),
                                                       np.array([6, 2, 9]), 0.5), [-2, -10, 4])
    off = _batches(store, n=6, target_offset=1.0, offset_mode="target_voxel")
    _, records = cache.read_index(store)
    moved = 0
    for a in off:
        for label, r, d in zip(a["label"], a["record"], a["offset"]):
            rec = records[r]
            lo, hi = sampler.offset_range(rec, CROP)
            assert np.all(lo <= d) and np.all(d <= hi)  # the target's box stays inside
            centred = transforms.apply_crop_or_pad(np.load(store / rec.label), sampler.crop_window(rec, CROP))
            shifts = sampler.target_voxels(centred, CROP)
            clamped = [sampler.clamp_offset(s, lo, hi, 1.0) for s in shifts]
            assert any(np.array_equal(d, c) for c in clamped), (d, rec.id)  # centred on a target voxel, clamped
            moved += bool(np.any(d))
    assert moved >= 9
    fingerprint = pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=3, rows=range(3), seed=5,
                                               target_offset=1.0, offset_mode="target_voxel")[1]
    assert fingerprint["offset_mode"] == "target_voxel"
    with pytest.raises(ValueError, match="offset_mode"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0,
                                     target_offset=1.0, offset_mode="gaussian")
