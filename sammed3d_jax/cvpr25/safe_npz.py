"""Reading and writing challenge ``.npz`` files without ever unpickling arbitrary objects.

The challenge stores its prompts as numpy *object* arrays (``boxes``: a list of dicts, ``clicks``: a list of dicts of
lists, ``clicks_order``: a list of lists), which ``np.load`` can only read with ``allow_pickle=True``: that runs
whatever the pickle names. Here numeric and string members are read with ``allow_pickle=False``; an object member is
unpickled by a pure-Python unpickler whose only globals are numpy's array/scalar/dtype rebuilders (replaced by our own
checked versions), and the result must then be plain data: lists, tuples, dicts with string keys, ints, floats,
bools, None, strings (the dict keys and the ``"fg"``/``"bg"`` tags need them) and numeric numpy values, which become
Python numbers and lists. Anything else (a class, a function, ``os.system``, bytes, sets) is refused with the member
named, before anything from the pickle is called.

Writing goes to a hidden temporary file beside the target, renamed into place when complete, so a killed run never
leaves a truncated case. Paths go through ``etils.epath``.

Owns: ``read_npz``, ``write_npz``, ``object_array``, ``UnsafeNpzError``. Must not import jax, the model or other
sammed3d_jax modules.
"""

import _compat_pickle
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np
from etils import epath

MAX_OBJECT_BYTES = 64 << 20  # prompts are tiny; a larger pickled member is refused before it is unpickled


class NpzError(ValueError):
    """A case file that cannot be read as the challenge's ``.npz``; the message names the file."""


class UnsafeNpzError(NpzError):
    """A pickled member names a global outside the allow-list or holds a non-plain value; nothing was called."""


class _ArrayType:
    """Stands in for ``numpy.ndarray`` as the subtype argument of ``_reconstruct``: never callable."""


_ARRAY_TYPE = _ArrayType()


def _dtype(spec, align=False, copy=True):
    # copy=True: a later BUILD sets the state of this new dtype, never one of numpy's shared singletons.
    return np.dtype(spec, align=bool(align), copy=True)


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar must be a bool, integer or float dtype with raw bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _reconstruct(subtype, shape, typecode):
    if subtype is not _ARRAY_TYPE:
        raise pickle.UnpicklingError("numpy _reconstruct only for numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, (0,), _dtype(typecode))


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell bytes objects (here: the raw data of numpy scalars) as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode only for latin-1 text")
    return text.encode("latin1")


_ALLOWED = {("numpy", "ndarray"): _ARRAY_TYPE, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _codecs_encode}
for _core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_core, "scalar")] = _scalar
    _ALLOWED[(_core, "_reconstruct")] = _reconstruct


class _Unpickler(pickle._Unpickler):
    """Pure-Python unpickler (so that BUILD can be restricted as well) with an allow-list of globals."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self._where = where

    def find_class(self, module, name):
        if self.proto < 3:  # protocol 2 writes Python 2 module names
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in _ALLOWED:
            raise UnsafeNpzError(f"{self._where}: refusing to load global '{module}.{name}': a challenge case may hold "
                                 "only lists, dicts, numbers, strings and None, so nothing from this pickle was run")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")

    def load_build(self):
        # BUILD may only restore numpy arrays and dtypes (their __setstate__), never touch another object.
        state = self.stack.pop()
        inst = self.stack[-1]
        if not (isinstance(inst, (np.ndarray, np.dtype)) and isinstance(state, tuple)):
            raise UnsafeNpzError(f"{self._where}: refusing to apply pickled state to a {type(inst).__name__}")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def plain(value: Any, where: str) -> Any:
    """``value`` as plain Python data (numpy numbers and numeric arrays converted); UnsafeNpzError names ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufU":
            return value.tolist()
        if value.dtype.hasobject:
            return [plain(v, where) for v in value.tolist()] if value.ndim else plain(value.item(), where)
    elif isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    elif isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnsafeNpzError(f"{where}: dict keys must be strings, got {sorted(map(repr, value))[:5]}")
        return {k: plain(v, where) for k, v in value.items()}
    raise UnsafeNpzError(f"{where}: holds a {type(value).__name__}; only lists, dicts, numbers, strings and None "
                         "are allowed")


def _read_member(zf: zipfile.ZipFile, member: str, where: str) -> Any:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise NpzError(f"{where}: unsupported .npy format version {version}")
        if not dtype.hasobject:
            array = np.lib.format.read_array(zf.open(member), allow_pickle=False)
            return array
        info = zf.getinfo(member)
        if info.file_size > MAX_OBJECT_BYTES:
            raise NpzError(f"{where}: pickled member of {info.file_size} bytes exceeds {MAX_OBJECT_BYTES} bytes")
        data = f.read()
    try:
        obj = _Unpickler(data, where).load()
    except NpzError:
        raise
    except Exception as e:  # malformed pickle content of any kind
        raise NpzError(f"{where}: cannot read the pickled member ({type(e).__name__}: {e})") from e
    if not isinstance(obj, np.ndarray):
        raise UnsafeNpzError(f"{where}: the pickled member is a {type(obj).__name__}, not an array")
    return plain(obj, where)


def read_npz(path: str | os.PathLike) -> dict[str, Any]:
    """Reads every member of an ``.npz``: numeric/string arrays as numpy, object arrays as plain Python data.

    Object arrays come back as (nested) lists of their elements (a 0-d object array as its element).

    Raises:
        UnsafeNpzError: a pickled member names a non-allowed global or holds a non-plain value.
        NpzError: the file is missing, not a zip of ``.npy`` members, or a member is corrupt (the message names it).
    """
    p = epath.Path(path)
    if not p.is_file():
        raise NpzError(f"{p}: no such file")
    out = {}
    try:
        with p.open("rb") as fh, zipfile.ZipFile(fh) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    raise NpzError(f"{p}: member {member!r} is not a .npy array; not an .npz file")
                key = member[: -len(".npy")]
                out[key] = _read_member(zf, member, f"{p} ({key})")
    except NpzError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise NpzError(f"{p}: not a readable .npz file ({type(e).__name__}: {e}); truncated or corrupt?") from e
    return out


def object_array(items: list) -> np.ndarray:
    """A 1-D object array holding ``items`` as they are (numpy would turn equal-length lists into a 2-D array)."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez_compressed`` to a temporary file beside ``path``, renamed into place once complete."""
    p = epath.Path(path)
    tmp = p.parent / f".{p.name}.partial"
    try:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)
        tmp.replace(p)
    finally:
        if tmp.exists():
            tmp.unlink()
