"""The torch-free .pth reader: fixture checkpoint, tensor geometry and dtypes, placeholders, refusals, bad files."""

import argparse
import collections
import os
import pickle
import shutil
import zipfile

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sammed3d_jax.checkpoint.pth_reader import (CheckpointError, PickledNamespace, TorchDevice, UnsafePickleError,
                                                load_pth, read_state_dict)


@pytest.fixture(scope="module")
def weights(tiny_fixture_dir):
    with np.load(tiny_fixture_dir / "weights.npz") as z:
        return {k: z[k] for k in z.files}


def test_fixture_checkpoint_equals_weights_npz_bit_for_bit(tiny_fixture_dir, weights):
    state = read_state_dict(tiny_fixture_dir / "checkpoint.pth")
    assert list(state) == list(weights)  # same keys, same (state-dict) order
    for k, want in weights.items():
        assert state[k].dtype == np.float32 and state[k].flags.c_contiguous, k
        assert np.array_equal(state[k], want), k


def test_fixture_checkpoint_other_entries_are_plain_data(tiny_fixture_dir):
    ckpt = load_pth(tiny_fixture_dir / "checkpoint.pth")
    assert ckpt["epoch"] == 1
    assert isinstance(ckpt["args"], PickledNamespace) and ckpt["args"].model_type == "vit_b_ori"
    milestones = ckpt["lr_scheduler_state_dict"]["milestones"]
    assert isinstance(milestones, collections.Counter) and sorted(milestones) == [120, 180]
    groups = ckpt["optimizer_state_dict"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([8e-4, 8e-5, 8e-5])
    first_state = next(iter(ckpt["optimizer_state_dict"]["state"].values()))
    assert float(first_state["step"]) == 2.0 and first_state["exp_avg"].dtype == np.float32


def test_strided_offset_shared_and_typed_storages(tmp_path, pth_writer):
    w = pth_writer
    base = np.arange(24, dtype=np.float32)
    bf16 = (np.arange(6, dtype=np.float32) / 4).astype(ml_dtypes.bfloat16)
    storages = {"0": base, "1": bf16, "2": np.array([1, 0, 1], np.bool_), "3": np.arange(5, dtype=np.int64),
                "4": np.arange(4, dtype=np.float16)}
    obj = {
        # transposed 3x4 view starting at element 2 of storage 0; shares storage 0 with "whole"
        "transposed": w.Tensor("0", 2, (4, 3), (1, 4)),
        "whole": w.Tensor("0", 0, (24,), (1,)),
        "bf16": w.Tensor("1", 0, (2, 3), (3, 1)),
        "mask": w.Tensor("2", 0, (3,), (1,)),
        "ints": w.Tensor("3", 1, (2, 2), (2, 1)),
        "half": w.Tensor("4", 0, (2, 2), (2, 1), rebuild="_rebuild_tensor"),
        "scalar": w.Tensor("0", 5, (), ()),
        "empty": w.Tensor("0", 0, (0, 3), (3, 1)),
    }
    path = w.write_pth(tmp_path / "t.pth", obj, storages, prefix="some_other_name")
    got = load_pth(path)
    assert np.array_equal(got["transposed"], base[2:14].reshape(3, 4).T) and got["transposed"].flags.c_contiguous
    assert np.array_equal(got["whole"], base)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and np.array_equal(got["bf16"], bf16.reshape(2, 3))
    assert got["mask"].dtype == np.bool_ and got["mask"].tolist() == [True, False, True]
    assert got["ints"].dtype == np.int64 and got["ints"].tolist() == [[1, 2], [3, 4]]
    assert got["half"].dtype == np.float16 and got["half"].tolist() == [[0, 1], [2, 3]]
    assert got["scalar"].shape == () and got["scalar"] == 5.0
    assert got["empty"].shape == (0, 3)
    got["transposed"][0, 0] = -1  # arrays are private writable copies, not views of the shared storage
    assert got["whole"][2] == 2.0


def test_placeholders_and_data_builtins(tmp_path, pth_writer):
    w = pth_writer
    storages = {}
    ns = argparse.Namespace(lr=1e-3, gpu_ids=[0, 1])
    obj = {
        "model_state_dict": collections.OrderedDict(x=w.tensor_from(np.ones((2, 2), np.float32), storages, "0")),
        "args": ns,
        "device": w.Reduce(w.Global("torch", "device"), ("cuda", 1)),
        "cpu": w.Reduce(w.Global("torch", "device"), ("cpu",)),
        "size": w.Reduce(w.Global("torch", "Size"), ([2, 3],)),
        "counter": collections.Counter({7: 2}),
        "set": {1, 2}, "frozen": frozenset({3}), "cplx": 1 + 2j, "slice": slice(1, 5, 2),
        "np_scalar": np.float64(0.25), "np_int": np.int64(-3), "np_array": np.arange(3.0),
    }
    path = w.write_pth(tmp_path / "t.pth", obj, storages)
    got = load_pth(path)
    assert isinstance(got["args"], PickledNamespace) and got["args"].lr == 1e-3 and got["args"].gpu_ids == [0, 1]
    assert got["device"] == TorchDevice("cuda", 1) and got["cpu"] == TorchDevice("cpu", None)
    assert got["size"] == (2, 3) and got["counter"] == collections.Counter({7: 2})
    assert got["set"] == {1, 2} and got["frozen"] == frozenset({3}) and got["cplx"] == 1 + 2j
    assert got["slice"] == slice(1, 5, 2)
    assert got["np_scalar"] == 0.25 and got["np_scalar"].dtype == np.float64 and got["np_int"] == -3
    assert np.array_equal(got["np_array"], np.arange(3.0))
    assert list(read_state_dict(path)) == ["x"]


@pytest.mark.parametrize("module,name,args", [
    ("os", "system", ("touch {marker}",)),
    ("posix", "system", ("touch {marker}",)),
    ("builtins", "eval", ("open({marker!r}, 'w').close()",)),
    ("builtins", "exec", ("open({marker!r}, 'w').close()",)),
    ("subprocess", "check_call", (["touch", "{marker}"],)),
    ("builtins", "getattr", ("{marker}", "upper")),
    ("torch", "load", ("{marker}",)),
])
def test_malicious_global_is_refused_and_nothing_runs(tmp_path, pth_writer, module, name, args):
    w = pth_writer
    marker = tmp_path / "pwned"
    args = tuple([a.format(marker=str(marker)) for a in x] if isinstance(x, list) else x.format(marker=str(marker))
                 for x in args)
    storages = {}
    # The payload hides after a legitimate tensor, inside the state dict.
    obj = {"model_state_dict": collections.OrderedDict(
        ok=w.tensor_from(np.zeros(2, np.float32), storages, "0"), evil=w.Reduce(w.Global(module, name), args))}
    path = w.write_pth(tmp_path / "evil.pth", obj, storages)
    with pytest.raises(UnsafePickleError) as err:
        read_state_dict(path)
    mapped = {"posix": "os"}.get(module, module)
    assert f"{module}.{name}" in str(err.value) or f"{mapped}.{name}" in str(err.value)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_pickle_cannot_patch_allowed_classes(tmp_path, pth_writer):
    # GLOBAL collections.Counter, then BUILD with slot state on the class itself: would set Counter.__setstate__.
    payload = (b"\x80\x02ccollections\nCounter\nN}X\x0c\x00\x00\x00__setstate__cos\nsystem\ns\x86b.")
    path = pth_writer.write_pth(tmp_path / "patch.pth", None, {}, data_pkl=payload)
    with pytest.raises(UnsafePickleError, match="os.system"):
        load_pth(path)
    payload = b"\x80\x02ccollections\nCounter\nN}X\x01\x00\x00\x00aK\x01s\x86b."
    path = pth_writer.write_pth(tmp_path / "patch2.pth", None, {}, data_pkl=payload)
    with pytest.raises(UnsafePickleError, match="refusing to apply pickled state to a function"):
        load_pth(path)
    assert not hasattr(collections.Counter, "a")


def test_bare_state_dict_and_module_prefix(tmp_path, pth_writer):
    w = pth_writer
    storages = {}
    obj = collections.OrderedDict((f"module.{k}", w.tensor_from(np.full(3, i, np.float32), storages, str(i)))
                                  for i, k in enumerate(["a.weight", "b.bias"]))
    got = read_state_dict(w.write_pth(tmp_path / "bare.pt", obj, storages))
    assert list(got) == ["a.weight", "b.bias"] and got["b.bias"].tolist() == [1, 1, 1]


def test_not_a_state_dict_names_the_entries(tmp_path, pth_writer):
    path = pth_writer.write_pth(tmp_path / "x.pth", {"epoch": 3, "losses": [1.0]}, {})
    with pytest.raises(CheckpointError, match=r"x\.pth.*no 'model_state_dict'.*epoch"):
        read_state_dict(path)


def test_truncated_and_corrupt_files_name_the_file(tmp_path, tiny_fixture_dir):
    data = (tiny_fixture_dir / "checkpoint.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated or corrupt"):
        read_state_dict(truncated)
    # Flip one byte inside a tensor record: the zip CRC check must catch it, naming the record.
    corrupt = tmp_path / "corrupt.pth"
    shutil.copy(tiny_fixture_dir / "checkpoint.pth", corrupt)
    with zipfile.ZipFile(corrupt) as zf:
        info = zf.getinfo("checkpoint/data/1")
    with open(corrupt, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"corrupt\.pth: record checkpoint/data/1 is corrupt"):
        read_state_dict(corrupt)
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint file does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(CheckpointError, match=r"legacy\.pth: legacy"):
        read_state_dict(legacy)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: cannot read"):
        read_state_dict(garbage)


def test_npz_and_safetensors_state_dicts(tmp_path, weights):
    subset = {k: weights[k] for k in list(weights)[:5]}
    np.savez(tmp_path / "w.npz", **subset)
    save_file({f"module.{k}": v for k, v in subset.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(subset), name
        assert all(np.array_equal(got[k], subset[k]) and got[k].dtype == np.float32 for k in subset), name


def test_numpy_object_arrays_cannot_be_reached(tmp_path, pth_writer):
    # A BUILD that sets a float64 dtype's flags to 63 makes numpy treat its bytes as object pointers.
    flip = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"
            b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb.")
    path = pth_writer.write_pth(tmp_path / "flags.pth", None, {}, data_pkl=flip)
    with pytest.raises(UnsafePickleError, match=r"flags\.pth.*changes its flags or makes it an object dtype"):
        load_pth(path)
    # The same BUILD with the dtype's own flags is how numpy pickles a dtype: accepted.
    path = pth_writer.write_pth(tmp_path / "plain.pth", None, {}, data_pkl=flip.replace(b"K?tb", b"K\x00tb"))
    assert load_pth(path) == np.dtype(np.float64)
    # numpy.ndarray is only a marker for _reconstruct; an array state with a list of objects is refused.
    obj_state = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
                 b"(K\x01K\x02\x85cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R\x89]K\x01aK\x02atb.")
    path = pth_writer.write_pth(tmp_path / "objects.pth", None, {}, data_pkl=obj_state)
    with pytest.raises(UnsafePickleError, match="not \\(version, shape, dtype, order, bytes\\)"):
        load_pth(path)
    good = pickle.dumps(np.arange(3.0), protocol=2)
    assert np.array_equal(load_pth(pth_writer.write_pth(tmp_path / "a.pth", None, {}, data_pkl=good)), np.arange(3.0))
