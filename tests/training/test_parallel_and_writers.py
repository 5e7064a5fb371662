"""Mesh specs (ICI and DCN), sharding rules, per-process rows, launch checks and the metric/event writers (no model
involved)."""

import json
import struct
import warnings

import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import PartitionSpec as P

from sammed3d_jax import cluster, parallel, tb_events, writers


def test_mesh_specs():
    assert parallel.make_mesh().shape == {"data": 8}
    assert dict(parallel.make_mesh((("data", -1), ("model", 2))).shape) == {"data": 4, "model": 2}
    assert parallel.make_mesh((("data", 2),)).size == 2  # An explicit smaller mesh uses the first devices.
    for bad, match in (((("data", 16),), "needs 16"), ((("data", -1), ("x", -1)), "at most one -1"),
                       ((("data", 3), ("x", -1)), "does not divide"), ((("a", 1), ("a", 2)), "distinct")):
        with pytest.raises(ValueError, match=match):
            parallel.make_mesh(bad)
    # One process = one granule: a DCN axis of 1 granule and the per-granule spec give the plain mesh.
    hybrid = parallel.make_mesh((("data", -1), ("fsdp", 2)), dcn_spec=(("data", -1),), granule="process")
    assert dict(hybrid.shape) == {"data": 4, "fsdp": 2}
    assert parallel.granules(jax.devices(), "auto") == ("process_index", 1)
    for dcn, match in (((("data", 2),), "needs 2 granules"), ((("model", 1),), "does not have")):
        with pytest.raises(ValueError, match=match):
            parallel.make_mesh((("data", -1),), dcn_spec=dcn)
    with pytest.raises(ValueError, match="dcn_granule"):
        parallel.make_mesh((("data", -1),), dcn_spec=(("data", 1),), granule="rack")


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


def test_rows_and_host_batch_and_replicated_keys():
    mesh = parallel.make_mesh()
    assert parallel.process_rows(mesh, 16) == list(range(16))  # One process feeds every row.
    batch = parallel.shard_host_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data",)) and batch["x"].shape == (8, 2)
    key = parallel.put_replicated(jax.random.key(3), mesh)
    assert key.sharding.is_fully_replicated


def _slurm(**extra):
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-4]", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    return env | extra


def test_launch_checks_refuse_idle_gpus_and_wrong_device_counts():
    opts = cluster.DistributedOptions()
    # sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8: JAX's SLURM detection gives each task one GPU.
    env = _slurm(SLURM_GPUS_ON_NODE="8", SLURM_TASKS_PER_NODE="1(x4)")
    with pytest.raises(ValueError, match=r"8 GPUs but runs 1 task.*7 GPUs would sit idle.*--ntasks-per-node=8"):
        cluster.check_devices(opts, local_devices=1, global_devices=4, processes=4, per_process=[1] * 4, env=env)
    # One task per GPU, or one task per node that sees all 8: accepted.
    ok = _slurm(SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8")
    cluster.check_devices(opts, local_devices=1, global_devices=32, processes=32, per_process=[1] * 32, env=ok)
    cluster.check_devices(opts, local_devices=8, global_devices=32, processes=4, per_process=[8] * 4, env=env)
    assert cluster._slurm_tasks_on_node(_slurm(SLURM_TASKS_PER_NODE="8(x3),4", SLURM_NODEID="3")) == 4
    with pytest.raises(ValueError, match="expect_devices=256"):
        cluster.check_devices(cluster.DistributedOptions(expect_devices=256), local_devices=4, global_devices=128,
                              processes=32, per_process=[4] * 32, env={})
    with pytest.raises(ValueError, match="different numbers of devices"):
        cluster.check_devices(opts, local_devices=2, global_devices=3, processes=2, per_process=[2, 1], env={})
    cluster.check_launch(opts)  # This test process: one process, 8 devices, no launcher.


def test_distributed_options_and_single_process_start():
    assert cluster.initialize(cluster.DistributedOptions(mode="off")) == "single process"
    assert cluster.initialize(cluster.DistributedOptions(), env={}) == "single process"
    with pytest.raises(ValueError, match="process count and index"):
        cluster.initialize(cluster.DistributedOptions(), env={"JAX_COORDINATOR_ADDRESS": "localhost:1"})
    for bad, match in ((dict(mode="maybe"), "mode must be"), (dict(local_device_ids="0;1"), "local_device_ids"),
                       (dict(num_processes=-2), "num_processes")):
        with pytest.raises(ValueError, match=match):
            cluster.DistributedOptions(**bad)
    with pytest.raises(ValueError, match="unknown config.distributed keys"):
        cluster.DistributedOptions.from_mapping({"mode": "auto", "coordinater_address": "x"})
    assert cluster._local_device_ids("all", {"SLURM_GPUS_ON_NODE": "4"}) == [0, 1, 2, 3]
    assert cluster._local_device_ids("0,2", {}) == [0, 2]


def test_metric_writer(tmp_path):
    lines = []
    w = writers.MetricWriter(tmp_path, echo=lines.append, tensorboard=True)
    w.write_scalars(10, {"loss": np.float32(0.5), "dice": np.array([0.1, np.nan]), "bad": float("inf")})
    w.write_scalars(20, {"loss": 0.25})
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 10, "loss": 0.5, "dice": [pytest.approx(0.1), None], "bad": None}
    assert w.read()[1]["loss"] == 0.25 and lines[0].startswith("[step 10] loss=0.5")
    w.truncate(10)  # A resumed run drops what the killed run wrote after its checkpoint.
    assert [r["step"] for r in w.read()] == [10]
    silent = writers.MetricWriter(tmp_path / "other", is_primary=False)
    silent.write_scalars(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        writers.read_metrics(tmp_path / "bad.jsonl")
    # The TensorBoard file: TFRecord framing with valid CRCs, the scalars of each step (NaN/inf left out).
    (events,) = (tmp_path / "tensorboard").iterdir()
    parsed = _read_events(events.read_bytes())
    assert parsed[0][0] == 0 and parsed[1] == (10, {"loss": 0.5, "dice/0": pytest.approx(0.1)})
    assert parsed[2] == (20, {"loss": 0.25})


def test_crc32c_and_resumed_event_file(tmp_path):
    assert tb_events.crc32c(b"123456789") == 0xE3069283  # The standard CRC-32C check value.
    w = tb_events.EventFileWriter(epath.Path(tmp_path), start_step=40)
    w.scalars(41, {"loss": 1.0})
    w.flush()
    data = next(tmp_path.iterdir()).read_bytes()
    assert b"brain.Event:2" in data and _read_events(data)[-1] == (41, {"loss": 1.0})
    assert b"\x32\x02\x08\x01" in data  # SessionLog{status: START}: TensorBoard drops older events from step 40.


def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        yield number, value


def _read_events(data):
    """An independent reader: checks every record's CRCs and returns (step, {tag: value}) per event."""
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        crc = tb_events.crc32c(data[i:i + 8])
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
        payload = data[i + 12:i + 12 + n]
        crc = tb_events.crc32c(payload)
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & \
            0xFFFFFFFF
        i += 16 + n
        step, scalars = 0, {}
        for number, value in _fields(payload):
            if number == 2:
                step = value
            elif number == 5:
                for _, v in _fields(value):
                    tag = dict(_fields(v))
                    scalars[tag[1].decode()] = struct.unpack("<f", tag[2])[0]
        out.append((step, scalars))
    return out


def test_plot_colour_comes_from_the_style_unless_a_colour_is_given(tmp_path, monkeypatch):
    import matplotlib.axes

    colours, plot = [], matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        lines = plot(self, *args, **kwargs)
        colours.append(lines[0].get_color())
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    series = [writers.Series("overall", [1, 2], [1.0, 2.0], style="k--o"),
              writers.Series("_case", [1, 2], [2.0, 3.0], color="C3")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a colour keyword overrides the style's colour
        writers.plot_panels([writers.Panel("t", series)], tmp_path / "p.png")
    assert colours == ["k", "C3"]
