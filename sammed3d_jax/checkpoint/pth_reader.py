"""Reads PyTorch checkpoints (and .npz / .safetensors state dicts) into numpy, without torch and without running code.

A ``torch.save`` file is a zip archive: ``<prefix>/data.pkl`` holds a pickle whose tensors refer, by persistent id,
to raw storages stored as ``<prefix>/data/<key>``. Unpickling an untrusted pickle can run arbitrary code, so this
module uses a restricted unpickler: every global the pickle names must be on an allow-list of pure-data
constructors (tensor rebuild functions, storage types, ``OrderedDict``, ``Counter``, ``argparse.Namespace``,
``torch.device``, numpy scalars/dtypes/arrays and a few data builtins), and each is replaced by our own numpy
implementation. Anything else is refused with an error naming ``module.name`` before it is called.

Owns: ``read_state_dict``, ``load_pth``, ``detect_format`` and the error types. Must not import torch, jax, flax or
any other sammed3d_jax module.
"""

import _compat_pickle
import collections
import dataclasses
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

# Pickle header of the legacy (pre-zip, torch < 1.6) format: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class CheckpointError(ValueError):
    """A checkpoint file could not be read; the message names the file."""


class UnsafePickleError(CheckpointError):
    """The pickle asked for a global that is not on the allow-list; nothing was called."""


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
class _StorageType:
    numpy: Any


@dataclasses.dataclass(frozen=True)
class _TorchClass:
    name: str


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


def _tensor_from_storage(storage, offset, size, stride):
    """Views ``storage`` (1-D numpy) with torch's element offset/size/stride and returns a contiguous copy."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("tensor rebuild got something that is not a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"invalid tensor geometry size={size} stride={stride} offset={offset}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.shape[0]:
            raise pickle.UnpicklingError(
                f"tensor size={size} stride={stride} offset={offset} reads past its storage of {storage.shape[0]}")
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
    if not isinstance(dtype, TorchDtype):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 needs a torch dtype")
    return _tensor_from_storage(storage.view(dtype.numpy), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or not isinstance(new_type, _TorchClass):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with an unexpected function or type")
    return func(*args)


def _torch_device(type_or_spec, index=None):
    if not isinstance(type_or_spec, str):
        raise pickle.UnpicklingError("torch.device expects a string")
    if index is None and ":" in type_or_spec:
        type_or_spec, index = type_or_spec.split(":", 1)
    return TorchDevice(type_or_spec, None if index is None else int(index))


def _torch_size(dims=()):
    return tuple(int(d) for d in dims)


def _numpy_dtype(spec, align=False, copy=True):
    dtype = np.dtype(spec, align=bool(align), copy=True)  # copy=True: a later BUILD must not touch numpy's singletons
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy object dtypes are not allowed")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar must be a non-object dtype with raw bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, typecode):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy _reconstruct only for numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, (0,), _numpy_dtype(typecode))


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode only for latin-1 text")
    return text.encode("latin1")


def _allowed_globals():
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "Counter"): collections.Counter,
        ("argparse", "Namespace"): PickledNamespace,
        ("torch", "device"): _torch_device,
        ("torch", "Size"): _torch_size,
        ("torch", "Tensor"): _TorchClass("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TorchClass("torch.nn.Parameter"),
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
        ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("_codecs", "encode"): _codecs_encode,
    }
    for data_type in (set, frozenset, slice, complex, range):  # builtins that only ever build data
        allowed[("builtins", data_type.__name__)] = data_type
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(core, "scalar")] = _numpy_scalar
        allowed[(core, "_reconstruct")] = _numpy_reconstruct
    for name, dtype in _NUMPY_OF.items():
        for module in ("torch", "torch.cuda"):  # torch.cuda.*Storage: pre-2.0 GPU checkpoints; we load on the host
            allowed[(module, f"{name}Storage")] = _StorageType(np.dtype(dtype))
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = TorchDtype(name, np.dtype(dtype))
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (so BUILD can be restricted too) with an allow-list of globals."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, where: str, read_record, byteorder: str):
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
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            dtype = storage_type.numpy.newbyteorder(">") if self._big_endian else storage_type.numpy
            needed = int(numel) * dtype.itemsize
            if len(raw) < needed:
                raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {needed}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=int(numel))
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
        elif isinstance(inst, (np.ndarray, np.dtype)) and isinstance(state, tuple):
            inst.__setstate__(state)
        else:
            raise UnsafePickleError(f"{self._where}: refusing to apply pickled state to a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


# --- containers ------------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """Returns "pth", "npz" or "safetensors" from the file's content (not its suffix).

    Raises:
        CheckpointError: naming the file if it is missing, empty, truncated or of another kind.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        names = _zip_names(path)
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "pth"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(f"{path}: zip archive holds neither a torch data.pkl nor .npy arrays")
    if head.startswith(_LEGACY_MAGIC):
        raise CheckpointError(f"{path}: legacy (pre-zip, torch<1.6) torch.save format is not supported; re-save it "
                              "with a current torch (torch.save(torch.load(f), f2)) or export it to .safetensors")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path}: not a torch zip checkpoint, .npz or .safetensors file "
                          f"({os.path.getsize(path)} bytes; truncated or corrupt?)")


def _zip_names(path):
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable zip archive ({e}); the file is truncated or corrupt") from e


def load_pth(path: str | os.PathLike) -> Any:
    """Loads a ``torch.save`` zip checkpoint as plain Python + numpy objects, executing no code.

    Tensors become contiguous numpy arrays (dtype, shape, strides and offset honoured), ``argparse.Namespace`` a
    :class:`PickledNamespace`, ``torch.device`` a :class:`TorchDevice`.

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list (the message names it).
        CheckpointError: the file is missing, truncated, corrupt or malformed (the message names it).
    """
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such checkpoint file") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable zip archive ({e}); the file is truncated or corrupt") from e
    with zf:
        # The record folder is named after the file stem at save time, so it is found, not assumed.
        pkls = [n for n in zf.namelist() if n.count("/") <= 1 and (n == "data.pkl" or n.endswith("/data.pkl"))]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl record in the archive, found {pkls or 'none'}")
        prefix = pkls[0][: -len("data.pkl")]

        def read(name):
            try:
                return zf.read(prefix + name)
            except KeyError as e:
                raise CheckpointError(f"{path}: record {prefix + name} is missing from the archive") from e
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise CheckpointError(f"{path}: record {prefix + name} is corrupt ({e})") from e

        byteorder = read("byteorder").decode().strip() if prefix + "byteorder" in zf.namelist() else "little"
        unpickler = _RestrictedUnpickler(read("data.pkl"), f"{path} ({prefix}data.pkl)", lambda k: read(f"data/{k}"),
                                         byteorder)
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle content of any kind
            raise CheckpointError(f"{path}: cannot unpickle {prefix}data.pkl: {type(e).__name__}: {e}") from e
    return obj


def _select_state_dict(obj, path):
    """The model weights: ``obj["model_state_dict"]`` (trainer checkpoints) or ``obj`` itself (bare state dict)."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict and has no 'model_state_dict' entry; non-tensor entries: "
                              f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a model state dict from a ``.pth``/``.pt`` zip checkpoint, an ``.npz`` or a ``.safetensors`` file.

    Trainer checkpoints contribute only their ``model_state_dict``; a bare state dict is taken as is. A
    ``module.`` prefix on every key (DataParallel) is removed. Names and layouts stay upstream's (PyTorch).

    Args:
        path: the checkpoint file; its kind is detected from the content.

    Returns:
        Upstream key -> contiguous numpy array, in the file's order.

    Raises:
        CheckpointError: naming the file, if it cannot be read or holds no state dict (``UnsafePickleError`` for a
            pickle that names a global outside the allow-list).
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "pth":
        state = dict(_select_state_dict(load_pth(path), path))
    elif fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: np.ascontiguousarray(z[k]) for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: cannot read .npz ({e})") from e
    else:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot read .safetensors ({type(e).__name__}: {e})") from e
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
