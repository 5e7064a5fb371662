"""Reads PyTorch checkpoints (and .npz / .safetensors state dicts) into numpy, without torch and without running code.

A ``torch.save`` file is a zip archive: ``<prefix>/data.pkl`` holds a pickle whose tensors refer, by persistent id,
to raw storages stored as ``<prefix>/data/<key>``. The pickle is read by the restricted unpickler of
``torch_pickle.py`` (an allow-list of pure-data types; anything else is refused before it is called).

Small files must not exhaust memory: what the reader allocates (records inflated, arrays built) is charged to a
budget proportionate to the file's size (``INFLATION`` times it, at least ``MIN_BUDGET``), and every zip record is
checked against its declared size, the archive and the budget BEFORE it is read, so a few-MB record that would
inflate to gigabytes is refused cheaply. The pickle itself is at most ``MAX_PICKLE_BYTES``. Paths go through
``etils.epath``, so ``gs://`` files work.

Owns: ``read_state_dict``, ``load_pth``, ``detect_format``; re-exports the error and placeholder types of
``torch_pickle``. Must not import torch, jax, flax or any sammed3d_jax module other than ``torch_pickle``.
"""

import contextlib
import io
import math
import os
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
from etils import epath

from sammed3d_jax.checkpoint.torch_pickle import (CheckpointError, PickledNamespace, ReadBudget, TorchDevice,
                                                  TorchDtype, UnsafePickleError, unpickle)

__all__ = ["CheckpointError", "UnsafePickleError", "PickledNamespace", "TorchDevice", "TorchDtype", "detect_format",
           "load_pth", "read_state_dict", "INFLATION", "MIN_BUDGET", "MAX_PICKLE_BYTES"]

# What one file may make the reader allocate: INFLATION x its size, at least MIN_BUDGET. A torch checkpoint costs
# about 2x (records read, tensors copied out of them); a compressed .npz of real weights inflates about 1.1x.
INFLATION = 4
MIN_BUDGET = 64 << 20
# A SAM-Med3D trainer checkpoint's pickle is about 100 KB; one opcode byte can make a 64-byte Python object.
MAX_PICKLE_BYTES = 16 << 20
# Pickle header of the legacy (pre-zip, torch < 1.6) format: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, ValueError)


def _path(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path)


@contextlib.contextmanager
def _open_checkpoint(path: epath.Path):
    """The file opened for binary reading, with its size; a missing file is a CheckpointError naming it."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file does not exist" if not path.exists()
                                  else f"{path}: is a folder, not a checkpoint file")
        f = path.open("rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the checkpoint ({e})") from e
    with f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        yield f, size


def _budget(path: epath.Path, size: int) -> ReadBudget:
    return ReadBudget(max(MIN_BUDGET, INFLATION * size), str(path))


def _open_zip(f: IO[bytes], path: epath.Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(f)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: not a readable zip archive ({e}); the file is truncated or corrupt") from e


def _check_record(info: zipfile.ZipInfo, archive_size: int, budget: ReadBudget, path: epath.Path) -> None:
    """Checks a record's declared sizes against the archive and charges its inflated size, before any read."""
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise CheckpointError(f"{path}: record {info.filename} is stored uncompressed but declares "
                              f"{info.file_size:,} bytes in {info.compress_size:,}; the archive is corrupt")
    if info.header_offset + info.compress_size > archive_size:
        raise CheckpointError(f"{path}: record {info.filename} declares {info.compress_size:,} bytes past the end of "
                              f"the {archive_size:,}-byte file; the file is truncated or corrupt")
    budget.take(info.file_size, f"record {info.filename} ({info.file_size:,} bytes inflated from "
                                f"{info.compress_size:,})")


def _read_record(zf: zipfile.ZipFile, name: str, archive_size: int, budget: ReadBudget, path: epath.Path,
                 expected: int | None = None, limit: int | None = None) -> bytes:
    """One record, its sizes checked first: at least ``expected`` bytes, at most ``limit``."""
    try:
        info = zf.getinfo(name)
    except KeyError as e:
        raise CheckpointError(f"{path}: record {name} is missing from the archive") from e
    if expected is not None and info.file_size < expected:
        raise CheckpointError(f"{path}: record {name} holds {info.file_size:,} bytes, expected {expected:,}")
    if limit is not None and info.file_size > limit:
        raise CheckpointError(f"{path}: record {name} declares {info.file_size:,} bytes, more than the "
                              f"{limit:,} such a record may hold; refusing it")
    _check_record(info, archive_size, budget, path)
    try:
        return zf.read(info)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: record {name} is corrupt ({e})") from e


def _zip_names(f: IO[bytes], path: epath.Path) -> list[str]:
    with _open_zip(f, path) as zf:
        return zf.namelist()


def detect_format(path: str | os.PathLike) -> str:
    """Returns "pth", "npz" or "safetensors" from the file's content (not its suffix).

    Raises:
        CheckpointError: naming the file if it is missing, empty, truncated or of another kind.
    """
    path = _path(path)
    with _open_checkpoint(path) as (f, size):
        head = f.read(16)
        f.seek(0)
        if head.startswith(b"PK"):
            names = _zip_names(f, path)
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
                          f"({size} bytes; truncated or corrupt?)")


def load_pth(path: str | os.PathLike) -> Any:
    """Loads a ``torch.save`` zip checkpoint as plain Python + numpy objects, executing no code.

    Tensors become contiguous numpy arrays (dtype, shape, strides and offset honoured), ``argparse.Namespace`` a
    :class:`PickledNamespace`, ``torch.device`` a :class:`TorchDevice`.

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list (the message names it).
        CheckpointError: the file is missing, truncated, corrupt, malformed or asks for more memory than its size
            makes plausible (the message names it).
    """
    path = _path(path)
    with _open_checkpoint(path) as (f, size), _open_zip(f, path) as zf:
        budget = _budget(path, size)
        names = zf.namelist()
        # The record folder is named after the file stem at save time, so it is found, not assumed.
        pkls = [n for n in names if n.count("/") <= 1 and (n == "data.pkl" or n.endswith("/data.pkl"))]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl record in the archive, found {pkls or 'none'}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            raw = _read_record(zf, prefix + "byteorder", size, budget, path, limit=16)
            byteorder = raw.decode("ascii", "replace").strip()
        data = _read_record(zf, pkls[0], size, budget, path, limit=MAX_PICKLE_BYTES)
        return unpickle(data, f"{path} ({pkls[0]})",
                        lambda key, nbytes: _read_record(zf, f"{prefix}data/{key}", size, budget, path, nbytes),
                        byteorder, budget)


def _check_npz(zf: zipfile.ZipFile, size: int, budget: ReadBudget, path: epath.Path) -> None:
    """Every member's declared size checked and charged, and its .npy header against it, before numpy reads it."""
    for info in zf.infolist():
        _check_record(info, size, budget, path)
        try:
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in _NPY_HEADER_READERS:
                    raise ValueError(f".npy format version {version} is not supported")
                shape, _, dtype = _NPY_HEADER_READERS[version](member, max_header_size=10_000)
                header = member.tell()
        except _ZIP_ERRORS as e:
            raise CheckpointError(f"{path}: member {info.filename} is not a readable .npy array ({e})") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or header + nbytes > info.file_size:
            what = "an object array" if dtype.hasobject else (
                f"shape {shape} {dtype} ({nbytes:,} bytes) in a {info.file_size:,}-byte member")
            raise CheckpointError(f"{path}: member {info.filename} declares {what}; refusing it")


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
    with _open_checkpoint(path) as (f, size):
        with _open_zip(f, path) as zf:
            _check_npz(zf, size, _budget(path, size), path)
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as z:
                return {k: np.ascontiguousarray(z[k]) for k in z.files}
        except _ZIP_ERRORS as e:
            raise CheckpointError(f"{path}: cannot read .npz ({e})") from e


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    try:
        if "://" in os.fspath(path):
            return load(path.read_bytes())
        return load_file(os.fspath(path))  # memory-mapped: the header's offsets are checked against the file
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read .safetensors ({type(e).__name__}: {e})") from e


def _select_state_dict(obj, path):
    """The model weights: ``obj["model_state_dict"]`` (trainer checkpoints) or ``obj`` itself (bare state dict)."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
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
    path = _path(path)
    fmt = detect_format(path)
    if fmt == "pth":
        state = dict(_select_state_dict(load_pth(path), path))
    elif fmt == "npz":
        state = _read_npz(path)
    else:
        state = _read_safetensors(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
