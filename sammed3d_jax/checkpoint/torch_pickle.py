"""The restricted unpickler behind the ``.pth`` reader: allow-listed pure-data globals, bounded allocations.

Unpickling an untrusted pickle can run arbitrary code, so every global a checkpoint's pickle names must be on an
allow-list of pure-data constructors (tensor rebuild functions, storage types, ``OrderedDict``, ``Counter``,
``argparse.Namespace``, ``torch.device``/``Size``/dtypes, numpy scalars, dtypes and arrays, a few data builtins), and
each is replaced by our own numpy implementation. Anything else is refused with an error naming ``module.name``
before it is called.

A pickle of allowed types can still ask for huge allocations from a few bytes (``set(range(10**8))``, a stride-0
tensor of 2**31 elements over one stored value, a ``numpy.ndarray((n,), "O")`` call). So nothing here expands a lazy
iterable (sets, frozensets, counters and dicts are built only from containers the pickle itself spelled out, whose
size is bounded by the pickle's), ``numpy.ndarray`` is a marker for ``_reconstruct`` and cannot be called, object
dtypes are refused however they are reached (including a BUILD that flips a dtype's flags), and every storage read
and array built is charged to a :class:`ReadBudget` proportionate to the file's size, checked BEFORE allocating.

Owns: the allow-list, :class:`ReadBudget`, :func:`unpickle`, the placeholder types and the error types. Must not
import torch, jax, flax or any other sammed3d_jax module.
"""

import _compat_pickle
import collections
import contextvars
import dataclasses
import io
import math
import pickle
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

MAX_DIMS = 32  # numpy allows 64; no checkpoint tensor comes near either


class CheckpointError(ValueError):
    """A checkpoint file could not be read; the message names the file."""


class UnsafePickleError(CheckpointError):
    """The pickle asked for a global that is not on the allow-list; nothing was called."""


class ReadBudget:
    """Bytes one checkpoint may make the reader allocate (records read plus arrays built), charged before allocating.

    Args:
        limit: the most bytes; the reader sets it proportionate to the file's size.
        where: the file, for messages.
    """

    def __init__(self, limit: int, where: str):
        self.limit, self.left, self.where = int(limit), int(limit), where

    def take(self, nbytes: int, what: str) -> None:
        """Charges ``nbytes`` for ``what``.

        Raises:
            CheckpointError: naming the file and ``what`` when the budget would be exceeded.
        """
        nbytes = int(nbytes)
        if nbytes > self.left:
            raise CheckpointError(
                f"{self.where}: {what} needs {nbytes:,} bytes, more than a file of this size can plausibly hold "
                f"(at most {self.limit:,} bytes in all); refusing it as a likely memory bomb")
        self.left -= nbytes


_BUDGET: contextvars.ContextVar[ReadBudget] = contextvars.ContextVar("pth_read_budget")


def _charge(nbytes: int, what: str) -> None:
    _BUDGET.get().take(nbytes, what)


# --- placeholder objects for pickled Python objects we only need as data ----------------------------------------
class _SealedType(type):
    """Metaclass that forbids setting class attributes, so a pickle cannot patch our placeholder classes."""

    def __setattr__(cls, name, value):
        raise pickle.UnpicklingError(f"refusing to set attribute {name!r} on class {cls.__name__}")


class PickledNamespace(metaclass=_SealedType):
    """Stands in for ``argparse.Namespace``: its attributes, nothing else."""

    def __init__(self, **kwargs):
        _set_fields(self, kwargs)

    def __repr__(self):
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"


@dataclasses.dataclass(frozen=True)
class TorchDevice:
    """Stands in for ``torch.device`` (the checkpoint's tensors always load on the host)."""

    type: str
    index: int | None = None


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    """Stands in for a ``torch.<dtype>`` object; ``numpy`` is the matching numpy dtype."""

    name: str
    numpy: Any


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stands in for a ``torch.<Type>Storage`` class; ``numpy`` is its element dtype."""

    numpy: Any


@dataclasses.dataclass(frozen=True)
class _Marker:
    """A class the pickle may name (as an argument to an allowed function) but never call."""

    name: str


_NDARRAY = _Marker("numpy.ndarray")


def _set_fields(obj, fields):
    if not isinstance(fields, dict) or not all(isinstance(k, str) and not k.startswith("__") for k in fields):
        raise pickle.UnpicklingError("pickled object state must be a dict of plain attribute names")
    obj.__dict__.update(fields)


# --- safe replacements for the allowed globals --------------------------------------------------------------------
_NUMPY_OF = {
    "Float": np.float32, "Double": np.float64, "Half": np.float16, "BFloat16": ml_dtypes.bfloat16,
    "Long": np.int64, "Int": np.int32, "Short": np.int16, "Char": np.int8, "Byte": np.uint8, "Bool": np.bool_,
    "ComplexFloat": np.complex64, "ComplexDouble": np.complex128,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}
# Containers a pickle spells out element by element: their size is bounded by the pickle's. A range, a generator or
# any other lazy iterable is refused where a container is expanded.
_MATERIALISED = (list, tuple, set, frozenset, dict, str, bytes)


def _bounded(factory: Callable, name: str) -> Callable:
    def build(iterable=(), /):
        if not isinstance(iterable, _MATERIALISED):
            raise UnsafePickleError(f"refusing to build a {name} from a {type(iterable).__name__} (only from "
                                    "containers stored in the pickle, never from lazy ranges or iterators)")
        return factory(iterable)

    return build


def _dims(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or len(values) > MAX_DIMS:
        raise pickle.UnpicklingError(f"{what} must be a list or tuple of at most {MAX_DIMS} integers")
    return tuple(int(v) for v in values)


def _tensor_from_storage(storage, offset, size, stride):
    """Views ``storage`` (1-D numpy) with torch's element offset/size/stride and returns a contiguous copy."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("tensor rebuild got something that is not a storage")
    size, stride, offset = _dims(size, "tensor size"), _dims(stride, "tensor stride"), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"invalid tensor geometry size={size} stride={stride} offset={offset}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.shape[0]:
            raise pickle.UnpicklingError(
                f"tensor size={size} stride={stride} offset={offset} reads past its storage of {storage.shape[0]}")
    # A view may repeat its storage's elements (stride 0): the copy, not the storage, is what costs memory.
    _charge(math.prod(size) * storage.dtype.itemsize, f"a tensor of shape {size}")
    base = storage[offset:] if offset < storage.shape[0] else storage[:0]
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(s * item for s in stride), writeable=False)
    out = np.array(view, copy=True, order="C")
    # Storages of big-endian archives are read with their byte order; hand out native arrays.
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))


def _rebuild_tensor(storage, storage_offset, size, stride, *_requires_grad_hooks_metadata):
    # Serves _rebuild_tensor and _rebuild_tensor_v2 (which adds requires_grad, backward_hooks, metadata).
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    # v3 pairs an untyped (byte) storage with an explicit dtype.
    if not isinstance(dtype, TorchDtype) or not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 needs a storage and a torch dtype")
    return _tensor_from_storage(storage.view(dtype.numpy), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or not isinstance(new_type, _Marker) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with an unexpected function or type")
    return func(*args)


def _torch_device(type_or_spec, index=None):
    if not isinstance(type_or_spec, str):
        raise pickle.UnpicklingError("torch.device expects a string")
    if index is None and ":" in type_or_spec:
        type_or_spec, index = type_or_spec.split(":", 1)
    return TorchDevice(type_or_spec, None if index is None else int(index))


def _torch_size(dims=()):
    return _dims(dims, "torch.Size")


def _safe_dtype(dtype: np.dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("refusing a numpy object dtype (or something that is not a dtype)")
    return dtype


def _numpy_dtype(spec, align=False, copy=True):
    # copy=True: a later BUILD must not touch numpy's singletons.
    return _safe_dtype(np.dtype(spec, align=bool(align), copy=True))


def _numpy_scalar(dtype, data=None):
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar must be a non-object dtype with raw bytes")
    return np.frombuffer(data, dtype=_safe_dtype(dtype), count=1)[0]


def _numpy_reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("numpy _reconstruct only for numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, (0,), _numpy_dtype(typecode))


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode only for latin-1 text")
    return text.encode("latin1")


def _allowed_globals():
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _bounded(collections.OrderedDict, "OrderedDict"),
        ("collections", "Counter"): _bounded(collections.Counter, "Counter"),
        ("builtins", "set"): _bounded(set, "set"),
        ("builtins", "frozenset"): _bounded(frozenset, "frozenset"),
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "range"): range,  # a lazy range is plain data; nothing here expands one
        ("argparse", "Namespace"): PickledNamespace,
        ("torch", "device"): _torch_device,
        ("torch", "Size"): _torch_size,
        ("torch", "Tensor"): _Marker("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "UntypedStorage"): StorageType(np.dtype(np.uint8)),
        ("torch.storage", "UntypedStorage"): StorageType(np.dtype(np.uint8)),
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy", "ndarray"): _NDARRAY,
        ("_codecs", "encode"): _codecs_encode,
    }
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(core, "scalar")] = _numpy_scalar
        allowed[(core, "_reconstruct")] = _numpy_reconstruct
    for name, dtype in _NUMPY_OF.items():
        for module in ("torch", "torch.cuda"):  # torch.cuda.*Storage: pre-2.0 GPU checkpoints; we load on the host
            allowed[(module, f"{name}Storage")] = StorageType(np.dtype(dtype))
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = TorchDtype(name, np.dtype(dtype))
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


def _build_array(inst: np.ndarray, state) -> None:
    # numpy's ndarray state: (version, shape, dtype, is_fortran, raw bytes); a list of objects is never accepted.
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
        raise UnsafePickleError("refusing numpy array state that is not (version, shape, dtype, order, bytes)")
    _safe_dtype(state[2])
    _dims(state[1], "numpy array shape")
    inst.__setstate__(state)


def _build_dtype(inst: np.dtype, state) -> None:
    flags = inst.flags
    if not isinstance(state, tuple):
        raise UnsafePickleError("refusing numpy dtype state that is not a tuple")
    inst.__setstate__(state)
    if inst.hasobject or inst.flags != flags:  # the flags decide whether numpy treats the bytes as pointers
        raise UnsafePickleError("refusing numpy dtype state that changes its flags or makes it an object dtype")


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (so BUILD can be restricted too) with an allow-list of globals."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, where: str, read_record: Callable[[str, int], bytes], byteorder: str):
        super().__init__(io.BytesIO(data))
        self._where, self._read_record, self._storages = where, read_record, {}
        self._big_endian = byteorder == "big"

    def find_class(self, module, name):
        # Protocol-2 pickles use Python 2 names (__builtin__.set); map them as the stdlib unpickler would.
        if self.proto < 3:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._where}: refusing to load global '{module}.{name}': it is not on the checkpoint allow-list "
                "of pure-data types, so nothing from this pickle was executed")
        return ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            dtype = storage_type.numpy.newbyteorder(">") if self._big_endian else storage_type.numpy
            numel = int(numel)
            if numel < 0:
                raise pickle.UnpicklingError(f"storage {key} has a negative size {numel}")
            raw = self._read_record(key, numel * dtype.itemsize)  # checked against the budget before reading
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
        storage = self._storages[key]
        if storage.dtype.newbyteorder("=") != storage_type.numpy:  # one storage shared under two dtypes
            storage = storage.view(np.uint8).view(storage_type.numpy.newbyteorder(storage.dtype.byteorder))
        return storage

    def load_build(self):
        # BUILD may only set plain instance attributes of our namespace placeholder and of dicts (torch state dicts
        # carry a `_metadata` attribute) or restore numpy arrays/dtypes: never touch classes or other objects (that
        # is how a pickle could patch behaviour).
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (PickledNamespace, collections.OrderedDict, collections.Counter)):
            _set_fields(inst, state)
        elif isinstance(inst, np.ndarray):
            _build_array(inst, state)
        elif isinstance(inst, np.dtype):
            _build_dtype(inst, state)
        else:
            raise UnsafePickleError(f"{self._where}: refusing to apply pickled state to a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


def unpickle(data: bytes, where: str, read_record: Callable[[str, int], bytes], byteorder: str,
             budget: ReadBudget) -> Any:
    """Unpickles a torch ``data.pkl`` with the allow-list, charging arrays to ``budget``.

    Args:
        data: the pickle.
        where: the file and record, for messages.
        read_record: ``(storage key, expected bytes) -> bytes``; must check the size before reading.
        byteorder: "little" or "big" (the archive's ``byteorder`` record).
        budget: what the arrays built may cost.

    Raises:
        UnsafePickleError: a global outside the allow-list or a refused construct (nothing was executed).
        CheckpointError: the budget is exceeded, or any other malformed content (naming ``where``).
    """
    token = _BUDGET.set(budget)
    try:
        return _RestrictedUnpickler(data, where, read_record, byteorder).load()
    except UnsafePickleError as e:
        text = str(e)
        raise UnsafePickleError(text if text.startswith(where) else f"{where}: {text}") from None
    except CheckpointError:
        raise
    except Exception as e:  # malformed pickle content of any kind
        raise CheckpointError(f"{where}: cannot unpickle: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)
