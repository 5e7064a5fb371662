"""Device-side finishing: the raw host batches, finished by ``augment.finish_batch``, are the host pipeline's samples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_reference import host_batches
from pipeline_store import make_store

from sammed3d_jax.data import augment, pipeline

CROP = 32


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("prepared"))


@functools.lru_cache(maxsize=None)
def _finish(normalization):
    return jax.jit(functools.partial(augment.finish_batch, normalization=normalization))


def _device(batch):
    keys = ("image", "label", "flip", "ct_clip")
    return {k: jnp.asarray(batch[k]) for k in keys}


@pytest.mark.parametrize("normalization,ct_clip,seed", [("per_volume", "modality", 0), ("batch_pooled", "modality", 1),
                                                        ("none", "always", 2), ("per_volume", "never", 3)])
def test_finished_raw_batches_equal_the_host_pipeline(store, normalization, ct_clip, seed):
    kwargs = dict(crop_size=CROP, global_batch_size=5, seed=seed, normalization=normalization, ct_clip=ct_clip)
    reference = host_batches(str(store), **kwargs)
    raw = pipeline.build_train_iterator(str(store), rows=range(5), **kwargs)
    worst = 0.0
    for j in range(6):
        expected, got = reference[j], next(raw)
        for k in ("record", "redraws", "bad_skipped"):
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
        done = jax.device_get(_finish(normalization)(_device(got)))
        assert not done["degenerate"].any()
        np.testing.assert_array_equal(done["label"], expected["label"])
        assert done["image"].dtype == np.float32 and done["label"].dtype == np.uint8
        # float32 round-off: the host took float64 statistics, the device two-pass float32 sums.
        np.testing.assert_allclose(done["image"], expected["image"], rtol=2e-6, atol=2e-6)
        worst = max(worst, float(np.abs(done["image"] - expected["image"]).max()))
    print(f"max abs difference {normalization}: {worst:.3g}")
    assert worst < 2e-6


def test_flip_and_clip_are_per_row():
    rng = np.random.default_rng(0)
    image = rng.uniform(-3000, 3000, (4, 6, 5, 4, 1)).astype(np.float32)
    label = (rng.random((4, 6, 5, 4)) < 0.5).astype(np.uint8)
    flip = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]], bool)
    clip = np.array([True, False, True, False])
    out = jax.device_get(_finish("none")({"image": image, "label": label, "flip": flip, "ct_clip": clip}))
    for i in range(4):
        axes = tuple(np.flatnonzero(flip[i]))
        x = np.clip(image[i], -1000, 1000) if clip[i] else image[i]
        np.testing.assert_array_equal(out["image"][i], np.flip(x, axes))
        np.testing.assert_array_equal(out["label"][i], np.flip(label[i], axes))
    assert not out["degenerate"].any()


def test_degenerate_rows_are_zeroed_and_flagged_never_nan():
    rng = np.random.default_rng(1)
    image = rng.uniform(1, 10, (4, 8, 8, 8, 1)).astype(np.float32)
    image[1] = 5.0  # zero spread
    image[2] = 0.0  # nothing > 0 (an all-padding row)
    image[3, 0, 0, 0, 0] = np.nan  # a non-finite voxel
    batch = {"image": image, "label": np.zeros((4, 8, 8, 8), np.uint8), "flip": np.zeros((4, 3), bool),
             "ct_clip": np.zeros(4, bool)}
    out = jax.device_get(_finish("per_volume")(batch))
    np.testing.assert_array_equal(out["degenerate"], [False, True, True, True])
    assert np.isfinite(out["image"]).all() and not out["image"][1:].any()
    x = image[0].astype(np.float64)
    np.testing.assert_allclose(out["image"][0], (x - x.mean()) / x.std(ddof=1), rtol=1e-5, atol=1e-5)
    pooled = jax.device_get(_finish("batch_pooled")({**batch, "image": image[:3]} | {
        k: v[:3] for k, v in batch.items() if k != "image"}))
    values = image[:3][image[:3] > 0].astype(np.float64)  # zero rows and padding never count
    np.testing.assert_allclose(pooled["image"], (image[:3] - values.mean()) / values.std(ddof=1), rtol=1e-5,
                               atol=1e-5)
    assert not pooled["degenerate"].any()
    flat = jax.device_get(_finish("batch_pooled")({**batch, "image": np.full_like(image, 3.0)}))
    assert flat["degenerate"].all() and not flat["image"].any()
    with pytest.raises(ValueError, match="normalization"):
        augment.finish_batch(batch, normalization="global")


def test_pooled_statistics_span_the_global_sharded_batch():
    """Inside jit over a batch sharded across devices, pooled statistics are the global batch's, not per shard."""
    devices = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(2)
    image = (rng.uniform(1, 10, (4, 6, 6, 6, 1)) * np.arange(1, 5)[:, None, None, None, None]).astype(np.float32)
    batch = {"image": image, "label": np.zeros((4, 6, 6, 6), np.uint8), "flip": np.zeros((4, 3), bool),
             "ct_clip": np.zeros(4, bool)}
    sharded = jax.device_put(batch, sharding)
    out = jax.device_get(_finish("batch_pooled")(sharded))
    x = image.astype(np.float64)
    np.testing.assert_allclose(out["image"], (x - x.mean()) / x.std(ddof=1), rtol=1e-5, atol=1e-5)
