"""Checkpoint checksums: a checkpoint whose array bytes were flipped in place (same size, still finite) is detected on
restore and skipped for the newest intact one; the checksum is the same for any sharding of the same values."""

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sammed3d_jax.checkpoint import checksum, orbax_io


def _state(offset=0.0):
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(64, 1024)).astype(np.float32) + offset),
            "b": jnp.asarray(rng.normal(size=(4096,)).astype(np.float32) + offset),
            "h": jnp.asarray(rng.normal(size=(8, 16)).astype(ml_dtypes.bfloat16)),
            "step": jnp.int32(7), "flag": jnp.asarray([True, False])}


def test_checksum_is_sharding_independent_and_sees_every_bit():
    x = np.random.default_rng(1).normal(size=(16, 24)).astype(np.float32)
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    one = checksum.tree_checksums({"x": jnp.asarray(x)})
    for spec in (P("a", "b"), P("b", None), P(None, ("a", "b"))):
        assert checksum.tree_checksums({"x": jax.device_put(x, NamedSharding(mesh, spec))}) == one
    y = np.random.default_rng(2).normal(size=(4, 8, 8)).astype(ml_dtypes.bfloat16)  # Offsets on every axis.
    three = checksum.tree_checksums([y])
    for spec in (P("a", None, "b"), P(None, "b", "a"), P("b", "a", None)):
        assert checksum.tree_checksums([jax.device_put(y, NamedSharding(mesh, spec))]) == three
    bits = x.view(np.uint32)
    for flat, bit in [(0, 0), (17, 31), (383, 22)]:  # Any single flipped bit changes the sums.
        flipped = bits.copy().reshape(-1)
        flipped[flat] ^= np.uint32(1 << bit)
        assert checksum.tree_checksums({"x": jnp.asarray(flipped.view(np.float32).reshape(x.shape))}) != one
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # The same values in other places.
    assert checksum.tree_checksums({"x": jnp.asarray(swapped)}) != one
    assert checksum.tree_checksums({"x": x}) == one  # A host array of the same values: the same checksum.
    # The sums are the formula's, on a hand case: bits b = [[1, 2, 3], [4, 5, 6]] at positions 0..5.
    small = np.arange(1, 7, dtype=np.uint32).reshape(2, 3)
    assert checksum.tree_checksums({"u": small}) == [[21, sum(int(b) * (2 * i + 1) for i, b in
                                                              enumerate(small.reshape(-1)))]]
    assert checksum.tree_checksums({"e": np.zeros((0, 3)), "s": np.float32(1.0)}) == [
        [0, 0], [0x3F800000, 0x3F800000]]


def _flip_middle_of_largest_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    big.write_bytes(bytes(data))  # Same size: nothing but the values can tell.


def test_bytes_flipped_in_place_are_detected_and_skipped(tmp_path, caplog):
    manager = orbax_io.make_manager(tmp_path, save_every=1, keep=5, async_save=False)
    good = _state()
    orbax_io.save(manager, 1, good, {"next_batch": 1})
    orbax_io.save(manager, 2, jax.tree.map(lambda x: x + 1 if x.dtype != jnp.bool_ else x, good), {"next_batch": 2})
    manager.wait_until_finished()
    manager.close()
    _flip_middle_of_largest_file(tmp_path / "checkpoints" / "2")

    manager = orbax_io.make_manager(tmp_path, save_every=1, keep=5, async_save=False)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), good)
    with pytest.raises(orbax_io.DamagedCheckpoint, match=r"1 of 5 arrays differ .*\['w'\]"):
        orbax_io.restore(manager, target, 2)
    finite = lambda s: all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(s) if x.dtype != jnp.bool_)
    # Without the checksum this state would pass: the flipped floats are finite.
    with caplog.at_level(logging.WARNING):
        step, state, position = orbax_io.restore_intact(manager, target, finite)
    assert step == 1 and position == {"next_batch": 1}  # The checksums are not part of the data position.
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(good)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "step 2: damaged (1 of 5 arrays differ" in caplog.text and "resuming from step 1" in caplog.text
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir() and manager.all_steps() == [1]
    manager.close()
