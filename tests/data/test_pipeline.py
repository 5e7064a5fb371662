"""Grain training pipeline: shapes, determinism across workers, exact state restore, transforms, redraw, bad records."""

import itertools
import json
import pathlib

import numpy as np
import pytest

from sammed3d_jax.data import cache, pipeline, transforms

CROP = 32


def _record(store, key, value, image, label, modality="MRI"):
    case_dir = store / "cases" / key
    image_rel, label_rel = f"cases/{key}/image.npy", f"cases/{key}/label_{value}.npy"
    if not (store / image_rel).exists():
        cache.save_array(store / image_rel, image.astype(np.float32))
    binary = (label == value).astype(np.uint8)
    cache.save_array(store / label_rel, binary)
    idx = np.argwhere(binary)
    assert case_dir.exists()
    return cache.PreparedRecord(
        id=f"{key}/{value}", case=key, dataset="test", target=f"t{value}", modality=modality, label_value=value,
        image=image_rel, label=label_rel, shape=tuple(binary.shape), spacing_mm=(1.5, 1.5, 1.5),
        affine=tuple(map(tuple, np.diag([1.5, 1.5, 1.5, 1.0]))),
        bbox=tuple((int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0))),
        foreground_voxels=int(binary.sum()), source_volume_mm3=float(binary.sum() * 1.5**3),
        source_image=f"/src/{key}.nii.gz", source_label=f"/src/{key}_label.nii.gz",
    ).to_json()


def _ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.sum((grid - np.asarray(centre)) ** 2, axis=-1) <= radius**2


def make_store(root: pathlib.Path) -> pathlib.Path:
    """Four usable targets (one padded, one CT), one sparse target whose centred crop is empty, one tiny target."""
    rng = np.random.default_rng(0)
    records = []
    shape = (40, 36, 30)
    label = np.zeros(shape, np.uint8)
    label[_ball(shape, (14, 14, 12), 8)] = 1
    label[_ball(shape, (28, 24, 18), 7)] = 2
    label[_ball(shape, (33, 8, 5), 2)] = 3  # tiny: 33 voxels
    image = rng.uniform(0.0, 100.0, shape) * (rng.random(shape) > 0.2) + 50.0 * label
    records += [_record(root, "a", v, image, label) for v in (1, 2, 3)]

    shape = (24, 20, 28)  # smaller than the crop: padding path
    label = _ball(shape, (12, 10, 14), 8).astype(np.uint8)
    records.append(_record(root, "b", 1, rng.uniform(1.0, 10.0, shape), label))

    shape = (70, 70, 70)  # two far-apart blobs: > 1000 voxels, but the crop centred on their box holds none
    label = (_ball(shape, (7, 7, 7), 6.5) | _ball(shape, (62, 62, 62), 6.5)).astype(np.uint8)
    records.append(_record(root, "sparse", 1, rng.uniform(1.0, 10.0, shape), label))

    shape = (36, 36, 36)
    label = _ball(shape, (18, 18, 18), 9).astype(np.uint8)
    records.append(_record(root, "ct", 1, rng.uniform(-3000.0, 3000.0, shape), label, modality="CT"))
    cache.write_json(root / cache.INDEX_NAME, {"format": cache.FORMAT, "spacing_mm": [1.5] * 3, "records": records,
                                                "skipped": []})
    return root


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


def _raw_crop(store, record_index, clip=False):
    _, records = cache.read_index(store)
    rec = records[record_index]
    window = pipeline.crop_window(rec, CROP)
    image = transforms.apply_crop_or_pad(np.load(store / rec.image), window)
    label = transforms.apply_crop_or_pad(np.load(store / rec.label), window)
    return (transforms.clip_intensity(image) if clip else image), label


def test_shapes_dtypes_and_eligibility(store):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=3, rows=range(3), seed=0)
    batches = _take(it, 4)
    for b in batches:
        assert b["image"].shape == (3, CROP, CROP, CROP, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (3, CROP, CROP, CROP) and b["label"].dtype == np.uint8
        for k in ("record", "redraws", "bad_skipped"):
            assert b[k].shape == (3,) and b[k].dtype == np.int32
        assert set(np.unique(b["label"])) <= {0, 1}
        assert np.all(b["label"].reshape(3, -1).sum(1) > transforms.MIN_CROP_FOREGROUND)
    seen = set(np.concatenate([b["record"] for b in batches]).tolist())
    assert 2 not in seen and 4 not in seen  # the tiny target (filtered) and the sparse one (always redrawn)
    with pytest.raises(ValueError, match="none of the 6 prepared train targets"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0, min_crop_foreground=10**6)
    with pytest.raises(ValueError, match="normalization"):
        pipeline.build_train_dataset(str(store), crop_size=CROP, global_batch_size=1, rows=range(1), seed=0, normalization="global")


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


def test_per_volume_normalisation_matches_manual_stats(store):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=4, rows=range(4), seed=2, flip_axes=())
    for b in _take(it, 2):
        for image, rec_index in zip(b["image"][..., 0], b["record"]):
            raw, _ = _raw_crop(store, int(rec_index), clip=int(rec_index) == 5)
            values = raw[raw > 0].astype(np.float64)
            expected = (raw - values.mean()) / values.std(ddof=1)
            np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)
            assert abs(image[raw > 0].mean()) < 1e-4 and abs(image[raw > 0].std(ddof=1) - 1) < 1e-4


def test_batch_pooled_and_none_normalisation_and_ct_clip(store):
    pooled = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=4, rows=range(4), seed=3, flip_axes=(),
                                           normalization="batch_pooled")
    raw = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=4, rows=range(4), seed=3, flip_axes=(),
                                        normalization="none")
    for p, r in zip(_take(pooled, 2), _take(raw, 2)):
        np.testing.assert_array_equal(p["record"], r["record"])
        crops = np.stack([_raw_crop(store, int(i), clip=int(i) == 5)[0] for i in r["record"]])
        np.testing.assert_array_equal(r["image"][..., 0], crops)
        values = crops[crops > 0].astype(np.float64)
        np.testing.assert_allclose(p["image"][..., 0], (crops - values.mean()) / values.std(ddof=1), rtol=1e-5, atol=1e-5)
        ct = r["image"][r["record"] == 5]
        assert ct.size == 0 or (ct.min() >= -1000 and ct.max() <= 1000)
    never = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=6, rows=range(6), seed=3, flip_axes=(),
                                          normalization="none", ct_clip="never")
    ct = np.concatenate([b["image"][b["record"] == 5] for b in _take(never, 3)])
    assert ct.size and (ct.min() < -1000 or ct.max() > 1000)


def test_flips_hit_image_and_label_together(store):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=4, rows=range(4), seed=4, normalization="none")
    used = []
    for b in _take(it, 3):
        for image, label, rec_index in zip(b["image"][..., 0], b["label"], b["record"]):
            raw_image, raw_label = _raw_crop(store, int(rec_index), clip=int(rec_index) == 5)
            matches = [axes for n in range(4) for axes in itertools.combinations(range(3), n)
                       if np.array_equal(np.flip(raw_image, axes), image)]
            assert len(matches) == 1
            np.testing.assert_array_equal(np.flip(raw_label, matches[0]), label)
            used.append(matches[0])
    assert len(set(used)) >= 3 and any(len(axes) > 0 for axes in used)


def test_redraw_rule_is_deterministic_and_counted(store):
    it = pipeline.build_train_iterator(str(store), crop_size=CROP, global_batch_size=5, rows=range(5), seed=0)
    batches = _take(it, 6)
    redraws = np.concatenate([b["redraws"] for b in batches])
    assert redraws.sum() > 0  # the sparse record (1 in 5 draws) was drawn and replaced
    assert not np.isin(4, np.concatenate([b["record"] for b in batches]))
    sampler_kwargs = dict(prepared_dir=str(store), crop_size=CROP)
    _, records = cache.read_index(store)
    sampler = pipeline.CropSampler(records=(records[4], records[0]), record_ids=(4, 0), **sampler_kwargs)
    out_a = sampler.random_map(0, np.random.default_rng(9))
    out_b = sampler.random_map(0, np.random.default_rng(9))
    assert out_a["redraws"] >= 1 and out_a["record"] == 0
    np.testing.assert_array_equal(out_a["image"], out_b["image"])


def test_bad_record_skipped_and_counted_or_raises(store, tmp_path):
    broken = tmp_path / "broken"
    make_store(broken)
    path = broken / "cases" / "b" / "image.npy"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    it = pipeline.build_train_iterator(str(broken), crop_size=CROP, global_batch_size=4, rows=range(4), seed=0)
    batches = _take(it, 4)
    assert sum(int(b["bad_skipped"].sum()) for b in batches) > 0
    assert not np.isin(3, np.concatenate([b["record"] for b in batches]))
    strict = pipeline.build_train_iterator(str(broken), crop_size=CROP, global_batch_size=4, rows=range(4), seed=0, on_bad_record="raise")
    with pytest.raises(RuntimeError, match="b/1"):
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
    label = _ball(shape, (12, 12, 12), 6).astype(np.uint8) + _ball(shape, (4, 4, 4), 2).astype(np.uint8) * 2
    for c in range(12):
        image = rng.uniform(1.0, 10.0, shape)
        records += [_record(store, f"case{c}", v, image, label) for v in (1, 2)]
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
        assert pipeline.crop_window(rec, size) == transforms.crop_or_pad_box(mask, (size,) * 3)
