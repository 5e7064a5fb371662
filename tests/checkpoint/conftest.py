"""Builds torch.save-style zip checkpoints by hand (no torch): a pickler that writes torch globals as plain GLOBAL
opcodes and tensors as persistent storages, and a zip writer with the record layout torch uses."""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest


class Global:
    """Pickles as ``GLOBAL module name`` without importing ``module`` (torch is not installed)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists the function be callable
        raise AssertionError("never called")


class Tensor:
    """A tensor to write: ``storage`` key, element offset, size and stride into a 1-D numpy storage."""

    def __init__(self, storage_key, offset, size, stride, rebuild="_rebuild_tensor_v2"):
        self.storage_key, self.offset, self.size, self.stride, self.rebuild = storage_key, offset, size, stride, rebuild


class Reduce:
    """Pickles as ``func(*args)`` with ``func`` a :class:`Global` (used for planted payloads and placeholders)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state


_STORAGE_NAME = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                 np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
                 np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


class _TorchPickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, storages):
        super().__init__(file, protocol=2)
        self._storages = storages

    def _save_global_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = _save_global_marker

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            array = self._storages[obj.key]
            return ("storage", Global("torch", _STORAGE_NAME[array.dtype]), obj.key, "cpu", array.size)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            args = (_StorageRef(obj.storage_key), obj.offset, tuple(obj.size), tuple(obj.stride))
            if obj.rebuild != "_rebuild_tensor":  # the v2 form adds requires_grad and backward hooks
                args += (False, collections.OrderedDict())
            return (Global("torch._utils", obj.rebuild), args)
        if isinstance(obj, Reduce):
            return (obj.func, tuple(obj.args), obj.state)
        return NotImplemented


class _StorageRef:
    def __init__(self, key):
        self.key = key


def tensor_from(array, storages, key):
    """Registers ``array`` (any layout) as storage ``key`` and returns a contiguous :class:`Tensor` for it."""
    array = np.ascontiguousarray(array)
    storages[key] = array.reshape(-1)
    strides = tuple(s // array.itemsize for s in array.strides)
    return Tensor(key, 0, array.shape, strides)


def write_pth(path, obj, storages, prefix="archive", data_pkl=None):
    """Writes ``obj`` (with :class:`Tensor` leaves backed by ``storages``) as a torch zip archive at ``path``."""
    if data_pkl is None:
        import io
        buf = io.BytesIO()
        _TorchPickler(buf, storages).dump(obj)
        data_pkl = buf.getvalue()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, array in storages.items():
            zf.writestr(f"{prefix}/data/{key}", array.tobytes())
        zf.writestr(f"{prefix}/version", "3\n")
    return path


@pytest.fixture
def pth_writer():
    """The builder helpers, as one namespace, for tests in this folder."""
    return collections.namedtuple("PthWriter", "Global Tensor Reduce tensor_from write_pth")(
        Global, Tensor, Reduce, tensor_from, write_pth)
