"""Grain training pipeline: shapes, determinism across workers, exact state restore, transforms, redraw, bad records."""

import json

import numpy as np
import pytest
from pipeline_store import ball, make_store, record_json

from sammed3d_jax.data import cache, pipeline, sampler, store as store_lib, transforms

CROP = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("prepared"))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _raw_crop(store, record_index):
    _, records = cache.read_index(store)
    rec = records[record_index]
    window = sampler.crop_window(rec, CROP)
    return (transforms.apply_crop_or_pad(np.load(store / rec.image), window),
            transforms.apply_crop_or_pad(np.load(store / rec.label), window))


def test_raw_batches_shapes_dtypes_and_eligibility(store):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=3, rows=range(3), seed=0)
    batches = _take(it, 6)
    for b in batches:
        assert b["image"].shape == (3, CROP, CROP, CROP, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (3, CROP, CROP, CROP) and b["label"].dtype == np.uint8
        for k in ("record", "redraws", "bad_skipped"):
            assert b[k].shape == (3,) and b[k].dtype == np.int32
        assert b["flip"].shape == (3, 3) and b["flip"].dtype == bool
        assert b["ct_clip"].shape == (3,) and b["ct_clip"].dtype == bool
        assert b["element"].shape == (3,) and b["element"].dtype == np.int64
        assert set(np.unique(b["label"])) <= {0, 1}
        assert np.all(b["label"].reshape(3, -1).sum(1) > transforms.MIN_CROP_FOREGROUND)
        np.testing.assert_array_equal(b["ct_clip"], b["record"] == 5)
        for image, label, rec_index in zip(b["image"][..., 0], b["label"], b["record"]):
            raw_image, raw_label = _raw_crop(store, int(rec_index))  # the raw window: no clip, no flip, no scaling
            np.testing.assert_array_equal(image, raw_image)
            np.testing.assert_array_equal(label, raw_label)
    seen = set(np.concatenate([b["record"] for b in batches]).tolist())
    # the tiny target (filtered), the sparse one (always redrawn) and the constant one (cannot be normalised)
    assert not {2, 4, 6} & seen
    assert sum(int(b["bad_skipped"].sum()) for b in batches) > 0 and sum(int(b["redraws"].sum()) for b in batches) > 0
    with pytest.raises(ValueError, match="none of the 7 prepared train targets"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0,
                                     min_crop_foreground=10**6)
    with pytest.raises(ValueError, match="normalization"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0,
                                     normalization="global")
    # The constant image is usable when nothing normalises it per volume.
    pooled = _take(pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=7, rows=range(7),
                                                 seed=0, normalization="none"), 4)
    assert 6 in np.concatenate([b["record"] for b in pooled])


def test_deterministic_whatever_worker_count_and_seeded(store):
    kwargs = dict(crop_size=CROP, global_batch_size=2, rows=range(2), seed=5)
    serial = _take(pipeline.build_train_iterator(str(store), worker_count=0, **kwargs), 5)
    threaded = _take(pipeline.build_train_iterator(str(store), worker_count=0, read_threads=3, **kwargs), 5)
    workers = pipeline.build_train_iterator(str(store), worker_count=2, **kwargs)
    try:
        parallel = _take(workers, 5)
    finally:
        workers.close()
    _same(serial, threaded)
    _same(serial, parallel)
    other = _take(pipeline.build_train_iterator(str(store), worker_count=0, **{**kwargs, "seed": 6}), 5)
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(serial, other))


def test_state_round_trip_exact_and_worker_count_independent(store):
    kwargs = dict(crop_size=CROP, global_batch_size=2, rows=range(2), seed=1)
    it = pipeline.build_train_iterator(str(store), **kwargs)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 4)
    fresh = pipeline.build_train_iterator(str(store), **kwargs)
    fresh.set_state(state)
    _same(expected, _take(fresh, 4))
    restored_in_workers = pipeline.build_train_iterator(str(store), worker_count=2, **kwargs)
    try:
        restored_in_workers.set_state(state)
        _same(expected, _take(restored_in_workers, 4))
    finally:
        restored_in_workers.close()
    other = pipeline.build_train_iterator(str(store), **{**kwargs, "global_batch_size": 3, "rows": range(3)})
    with pytest.raises(ValueError, match="global_batch_size: saved 2, now 3"):
        other.set_state(state)


def test_grain_orbax_checkpoint_handler_round_trip(store, tmp_path):
    """The training loop saves the iterator with Grain's own Orbax handler: it must treat ours as a DatasetIterator."""
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    kwargs = dict(crop_size=CROP, global_batch_size=2, rows=range(2), seed=8)
    it = pipeline.build_train_iterator(str(store), **kwargs)
    _take(it, 2)
    CheckpointHandler().save(epath.Path(tmp_path), item=it)
    expected = _take(it, 2)
    restored = CheckpointHandler().restore(epath.Path(tmp_path), item=pipeline.build_train_iterator(str(store), **kwargs))
    assert restored.get_state()["next_batch"] == 2
    _same(expected, _take(restored, 2))


def test_flips_are_drawn_per_axis_and_only_on_flip_axes(store):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=4, rows=range(4), seed=4)
    flips = np.concatenate([b["flip"] for b in _take(it, 6)])
    assert len({tuple(f) for f in flips.tolist()}) >= 4
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=4, rows=range(4), seed=4,
                                       flip_axes=(1,))
    flips = np.concatenate([b["flip"] for b in _take(it, 6)])
    assert not flips[:, [0, 2]].any() and 0 < flips[:, 1].sum() < len(flips)


def test_redraw_rule_is_deterministic_and_counted(store):
    _, records = cache.read_index(store)
    opened = store_lib.open_store(store)
    crop = sampler.CropSampler(store=opened, records=(records[4], records[0]), record_ids=(4, 0), crop_size=CROP)
    out_a = crop.random_map(0, np.random.default_rng(9))
    out_b = crop.random_map(0, np.random.default_rng(9))
    assert out_a["redraws"] >= 1 and out_a["record"] == 0 and out_a["bad_skipped"] == 0
    for k in out_a:
        np.testing.assert_array_equal(out_a[k], out_b[k])
    assert crop.status(0) == sampler.SMALL and crop.status(1) == sampler.OK
    flat = sampler.CropSampler(store=opened, records=(records[6],), record_ids=(6,), crop_size=CROP)
    assert flat.status(0) == sampler.BAD
    with pytest.raises(RuntimeError, match="no usable sample after 100 draws"):
        flat.random_map(0, np.random.default_rng(0))
    assert sampler.CropSampler(store=opened, records=(records[6],), record_ids=(6,), crop_size=CROP,
                               normalization="batch_pooled").status(0) == sampler.OK


def test_bad_record_skipped_and_counted_or_raises(tmp_path):
    broken = make_store(tmp_path / "broken")
    path = broken / "cases" / "b" / "image.npy"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    nan = broken / "cases" / "ct" / "image.npy"
    image = np.load(nan)
    image[18, 18, 18] = np.nan
    cache.save_array(nan, image)
    it = pipeline.build_train_iterator(str(broken), crop_size=CROP, global_batch_size=4, rows=range(4), seed=0,
                                       normalization="none")
    batches = _take(it, 4)
    assert sum(int(b["bad_skipped"].sum()) for b in batches) > 0
    assert not np.isin([3, 5], np.concatenate([b["record"] for b in batches])).any()
    strict = pipeline.build_train_iterator(str(broken), crop_size=CROP, global_batch_size=4, rows=range(4), seed=0,
                                           on_bad_record="raise")
    with pytest.raises(RuntimeError, match="bad prepared record (b|ct|flat)/1"):
        _take(strict, 4)


def _split(batch_size, processes):
    return [range(p * batch_size // processes, (p + 1) * batch_size // processes) for p in range(processes)]


def _concat(per_process):
    """Per-process lists of batches -> the global batches (rows concatenated in process order)."""
    return [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]} for batches in zip(*per_process)]


def test_global_batch_is_the_same_for_any_process_split(store):
    kwargs = dict(crop_size=CROP, global_batch_size=4, seed=7)
    whole = _take(pipeline.build_train_iterator(str(store), rows=range(4), **kwargs), 4)
    for b in whole:
        assert b["element"].dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([b["element"] for b in whole]), np.arange(16))
    for processes in (2, 4):
        per_process = [_take(pipeline.build_train_iterator(str(store), rows=rows, **kwargs), 4)
                       for rows in _split(4, processes)]
        _same(whole, _concat(per_process))
    # Interleaved rows are rows too: process 0 feeds global rows 0 and 2.
    odd = _take(pipeline.build_train_iterator(str(store), rows=[0, 2], **kwargs), 4)
    _same([{k: v[[0, 2]] for k, v in b.items()} for b in whole], odd)
    with pytest.raises(ValueError, match="rows"):
        pipeline.build_train_iterator(str(store), rows=[2, 1], **kwargs)
    with pytest.raises(ValueError, match="rows"):
        pipeline.build_train_iterator(str(store), rows=[4], **kwargs)


def test_state_saved_with_one_split_restores_with_another(store):
    kwargs = dict(crop_size=CROP, global_batch_size=4, seed=3)
    uninterrupted = _take(pipeline.build_train_iterator(str(store), rows=range(4), **kwargs), 5)
    two = [pipeline.build_train_iterator(str(store), rows=rows, **kwargs) for rows in _split(4, 2)]
    for it in two:
        _take(it, 2)
    states = [json.loads(json.dumps(it.get_state())) for it in two]
    assert states[0] == states[1] == {"next_batch": 2, "fingerprint": states[0]["fingerprint"]}
    fingerprint = states[0]["fingerprint"]
    assert not {"rows", "shard_index", "shard_count", "process_count", "worker_count"} & set(fingerprint)
    assert fingerprint["global_batch_size"] == 4 and fingerprint["seed"] == 3
    for processes in (1, 4):
        resumed = []
        for rows in _split(4, processes):
            it = pipeline.build_train_iterator(str(store), rows=rows, **kwargs)
            it.set_state(states[0])
            resumed.append(_take(it, 3))
        _same(uninterrupted[2:], _concat(resumed))


def test_holdout_split_is_by_case_and_disjoint_from_training(tmp_path):
    store = tmp_path / "many"
    store.mkdir()
    rng = np.random.default_rng(1)
    records = []
    shape = (24, 24, 24)
    label = ball(shape, (12, 12, 12), 6).astype(np.uint8) + ball(shape, (4, 4, 4), 2).astype(np.uint8) * 2
    for c in range(12):
        image = rng.uniform(1.0, 10.0, shape)
        records += [record_json(store, f"case{c}", v, image, label) for v in (1, 2)]
    cache.write_json(store / cache.INDEX_NAME, {"format": cache.FORMAT, "records": records, "skipped": []})
    _, recs = cache.read_index(store)
    kwargs = dict(crop_size=16, global_batch_size=4, seed=0, min_crop_foreground=10)
    train = pipeline.build_train_iterator(str(store), rows=range(4), holdout_fraction=0.3, **kwargs)
    train_cases = {recs[i].case for b in _take(train, 12) for i in b["record"]}
    held = pipeline.holdout_batches(str(store), rows=range(4), holdout_fraction=0.3, global_batch_size=4,
                                    crop_size=16, min_crop_foreground=10)
    held_ids = [int(i) for b in held for i, v in zip(b["record"], b["valid"]) if v]
    held_cases = {recs[i].case for i in held_ids}
    expected = {r.case for r in recs if pipeline.case_fraction(r) < 0.3}
    assert held_cases == expected and 0 < len(expected) < 12 and not held_cases & train_cases
    # Every eligible holdout target exactly once (the tiny value-2 targets have <= 10 voxels in no record here).
    assert sorted(held_ids) == [i for i, r in enumerate(recs) if r.case in expected and r.foreground_voxels > 10]
    assert all(b["element"].dtype == np.int64 and b["valid"].dtype == bool for b in held)
    stream = pipeline.build_train_iterator(str(store), rows=range(4), holdout_fraction=0.3, subset="holdout",
                                           **kwargs)
    assert {recs[i].case for b in _take(stream, 4) for i in b["record"]} <= expected
    # Deterministic and split over processes like training; moving the store does not change the split.
    again = pipeline.holdout_batches(str(store), rows=range(2, 4), holdout_fraction=0.3, global_batch_size=4,
                                     crop_size=16, min_crop_foreground=10, max_batches=1)
    _same([{k: v[2:] for k, v in held[0].items()}], again)
    moved = tmp_path / "moved"
    store.rename(moved)
    _same(held, pipeline.holdout_batches(str(moved), rows=range(4), holdout_fraction=0.3, global_batch_size=4,
                                         crop_size=16, min_crop_foreground=10))


@pytest.mark.parametrize("seed", range(6))
def test_crop_window_equals_crop_or_pad_box(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(10, 60, size=3))
    mask = np.zeros(shape, np.uint8)
    lo = [int(rng.integers(0, s)) for s in shape]
    hi = [int(rng.integers(l, s)) + 1 for l, s in zip(lo, shape)]
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random((hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])) < 0.7
    idx = np.argwhere(mask)
    if not len(idx):
        mask[lo[0], lo[1], lo[2]] = 1
        idx = np.argwhere(mask)
    rec = cache.PreparedRecord(id="x/1", case="x", dataset="d", target="t", modality="MRI", label_value=1, image="",
                               label="", shape=shape, spacing_mm=(1.0,) * 3, affine=tuple(map(tuple, np.eye(4))),
                               bbox=tuple((int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0))),
                               foreground_voxels=int(mask.sum()), source_volume_mm3=0.0, source_image="", source_label="")
    for size in (16, 17, 32):
        assert sampler.crop_window(rec, size) == transforms.crop_or_pad_box(mask, (size,) * 3)
