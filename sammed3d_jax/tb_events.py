"""A minimal TensorBoard event-file writer for scalars, over ``etils.epath`` (local folders and ``gs://`` alike).

Why our own and not tensorboardX or CLU: scalars are all training logs, and an event file of scalars is a short
format (TFRecord framing with masked CRC-32C, an ``Event`` protobuf with a ``Summary`` of ``simple_value`` s) that
fits in this module; it adds no dependency (tensorboardX pulls protobuf and numpy versions of its own, CLU has had no
release since 2024), and it writes through epath, so the same code writes to a bucket. Object stores cannot
append: :class:`AppendableFile` appends on local file systems and, on a URL, keeps the file's bytes and rewrites
the object at each flush (event files of scalars stay small: ~60 bytes per value).

Resumed runs write a new file that starts with a ``SessionLog.START`` at the resumed step, TensorBoard's signal to
drop the old file's events past it (written by the killed run after its last checkpoint). No jax import.
"""

import os
import socket
import struct
import time
from collections.abc import Mapping

from etils import epath

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def event(step: int, *, wall_time: float | None = None, scalars: Mapping[str, float] | None = None,
          file_version: str | None = None, session_start: bool = False) -> bytes:
    """A serialised ``tensorflow.Event`` (fields: wall_time 1, step 2, file_version 3, summary 5, session_log 6)."""
    msg = _field(1, 1, struct.pack("<d", time.time() if wall_time is None else wall_time))
    msg += _field(2, 0, _varint(int(step)))
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) +
                                            _field(2, 5, struct.pack("<f", float(v))))
                          for tag, v in scalars.items())
        msg += _length_delimited(5, values)
    if session_start:
        msg += _length_delimited(6, _field(1, 0, _varint(1)))  # SessionLog{status: START}
    return msg


class AppendableFile:
    """A file that grows by appends: appended in place locally, rewritten whole on object stores (no append).

    Args:
      path: the file (an ``epath.Path``; a URL such as ``gs://b/f`` is an object).
      existing: keep the file's current content (else it is replaced at the first flush).
    """

    def __init__(self, path: epath.Path, existing: bool = True):
        self.path = path
        self.remote = "://" in os.fspath(path)
        self._pending = bytearray()
        self._content = bytearray(path.read_bytes() if self.remote and existing and path.exists() else b"")
        self._replace = not existing

    def append(self, data: bytes) -> None:
        """Queues bytes; they reach the file at the next :meth:`flush`."""
        self._pending += data

    def flush(self) -> None:
        """Writes the queued bytes (local: append; object store: the whole object again)."""
        if not self._pending and not self._replace:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._content += self._pending
            self.path.write_bytes(bytes(self._content))
        else:
            with self.path.open("wb" if self._replace else "ab") as f:
                f.write(bytes(self._pending))
        self._pending.clear()
        self._replace = False


class EventFileWriter:
    """Scalars into ``<logdir>/events.out.tfevents.<time>.<host>.<pid>`` (one new file per writer).

    Args:
      logdir: the TensorBoard log folder.
      start_step: when > 0 (a resumed run), the file opens with a ``SessionLog.START`` at this step so TensorBoard
        discards the earlier files' events at and after it.
    """

    def __init__(self, logdir: epath.Path, start_step: int = 0):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.file = AppendableFile(epath.Path(logdir) / name, existing=False)
        self.file.append(tfrecord(event(start_step, file_version="brain.Event:2")))
        if start_step > 0:
            self.file.append(tfrecord(event(start_step, session_start=True)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Queues one event holding ``values`` (tag -> number) at ``step``."""
        if values:
            self.file.append(tfrecord(event(step, scalars=values)))

    def flush(self) -> None:
        """Writes what is queued."""
        self.file.flush()
