"""Mesh specs, sharding rules and the metric writer (no model involved)."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sammed3d_jax import parallel, writers


def test_mesh_specs():
    assert parallel.make_mesh().shape == {"data": 8}
    assert dict(parallel.make_mesh((("data", -1), ("model", 2))).shape) == {"data": 4, "model": 2}
    assert parallel.make_mesh((("data", 2),)).size == 2  # An explicit smaller mesh uses the first devices.
    for bad, match in (((("data", 16),), "needs 16"), ((("data", -1), ("x", -1)), "at most one -1"),
                       ((("data", 3), ("x", -1)), "does not divide"), ((("a", 1), ("a", 2)), "distinct")):
        with pytest.raises(ValueError, match=match):
            parallel.make_mesh(bad)


def test_sharding_rules():
    mesh = parallel.make_mesh()
    tree = {"image_encoder": {"w": np.zeros((16, 24)), "odd": np.zeros((3, 5)), "s": np.zeros(())},
            "mask_decoder": {"w": np.zeros((8, 64))}}
    rules = (("^mask_decoder/", "replicate"), (".*", "fsdp"))
    specs = jax.tree.map(lambda s: s.spec, parallel.infer_sharding(tree, rules, mesh))
    # FSDP shards the largest dimension the 8 devices divide; leaves without one stay replicated.
    assert specs == {"image_encoder": {"w": P(None, "data"), "odd": P(), "s": P()}, "mask_decoder": {"w": P()}}
    with pytest.raises(ValueError, match="no sharding rule matches 'mask_decoder/w'"):
        parallel.infer_sharding(tree, (("^image_encoder/", "replicate"),), mesh)
    with pytest.raises(ValueError, match="not one of"):
        parallel.infer_sharding(tree, ((".*", "shard"),), mesh)
    with pytest.raises(ValueError, match="global batch size 6"):
        parallel.check_batch_divisible(6, mesh)


def test_host_batch_and_replicated_keys():
    mesh = parallel.make_mesh()
    batch = parallel.shard_host_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data",)) and len(batch["x"].addressable_shards) == 8
    key = parallel.put_replicated(jax.random.key(3), mesh)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
    with pytest.raises(ValueError, match="distributed mode"):
        parallel.maybe_initialize_distributed("maybe")
    assert parallel.maybe_initialize_distributed("off") is False


def test_metric_writer(tmp_path):
    lines = []
    w = writers.MetricWriter(tmp_path, echo=lines.append)
    w.write_scalars(1, {"loss": np.float32(2.5), "dice_per_click": np.array([0.5, np.nan]), "lr": 1e-3})
    w.write_scalars(2, {"loss": float("inf"), "lr": 5e-4})
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 1, "loss": 2.5, "dice_per_click": [0.5, None], "lr": 1e-3}
    assert records[1]["loss"] is None and "loss=2.5" in lines[0]
    w.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    silent = writers.MetricWriter(tmp_path / "other", is_primary=False)
    silent.write_scalars(1, {"loss": 1.0})
    silent.plot(tmp_path / "other" / "c.png")
    assert not (tmp_path / "other").exists()
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        writers.read_metrics(tmp_path / "bad.jsonl")
