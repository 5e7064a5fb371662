"""Reading crop windows out of a prepared store, whatever its kind: the one interface the pipeline uses.

Owns ``open_store`` (which also merges the index of a store prepared in shards), the readers ``NpyStore``
(memory-mapped ``.npy`` files, the single-host default) and ``WindowShardStore`` (per target its crop window at a
fixed offset in a few large shard files; reads ``gs://``), and ``BufferPool`` for the batch buffers. A reader
copies one window of a record's image and label into caller-owned buffers, zero where the window leaves the
volume. numpy + etils (+ TensorStore for object-store shards); must not import jax, flax, grain, nibabel or the
model.

Why these two (numbers in README "Data"): a window is 128^3 of a ~160^3-256^3 volume. Memory-mapped ``.npy``
reads exactly the window's pages from the page cache, fastest on one host, but needs a POSIX file system and
makes one file per volume. On object storage a byte-range request per window row is far too many requests and
a whole-volume record reads 2-8 times the window; the crop is centred on the target's box, a pure function of
the record, so the sharded store keeps exactly that window per target: one byte-range read of ``5 * W^3`` bytes
per sample. ArrayRecord (Grain's ``ArrayRecordDataSource``) holds the same windows but costs 13-27 ms of CPU per
10 MiB record to read here (its chunk decoding), against about 3 ms for a raw copy into the batch buffer.
"""

import collections
import os
import re
import threading
from typing import Any

import numpy as np
from etils import epath
from jaxtyping import Float, UInt8

from sammed3d_jax.data import cache, transforms

# Open memory maps kept per process: enough for a shard's working set, far below the kernel's map limit.
MAX_OPEN_ARRAYS = 256


class _Lease:
    """Owner of one pooled block: arrays made from it keep it alive; when the last one is gone, it goes back."""

    def __init__(self, block: np.ndarray, pool: "BufferPool"):
        self.block, self.pool = block, pool
        self.__array_interface__ = block.__array_interface__

    def __del__(self):
        self.pool.give_back(self.block)


class BufferPool:
    """Reuses batch buffers once nothing references them any more, so a batch costs no fresh page faults.

    ``take`` returns a normal writable ndarray whose ``base`` is a lease on a pooled block. The block returns to
    the pool only when every array or view made from it has been garbage-collected (a consumer that keeps a
    batch, or a device transfer that aliases host memory, keeps its block out of the pool), so reuse can never
    overwrite data someone still holds. Fresh buffers for 10 MiB crops cost about 1.4 ms of kernel page zeroing
    each on this machine; a pooled one costs nothing.
    """

    def __init__(self, max_free: int = 8):
        self._free: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)
        self._max_free = max_free

    def __getstate__(self):
        return {"max_free": self._max_free}

    def __setstate__(self, state):
        self.__init__(state["max_free"])

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        try:
            block = self._free[key].pop()
        except IndexError:
            block = np.empty(shape, dtype)
        return np.asarray(_Lease(block, self))

    def give_back(self, block: np.ndarray) -> None:
        free = self._free[(block.shape, block.dtype.str)]
        if len(free) < self._max_free:
            free.append(block)


def overlap(window: transforms.CropPad) -> tuple[tuple[slice, ...], tuple[slice, ...], bool]:
    """``(source slices, window slices, fully_inside)`` of a crop-or-pad window."""
    src, dst = [], []
    for s, t, n in zip(window.start, window.target_shape, window.source_shape):
        lo, hi = max(s, 0), min(s + t, n)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    inside = all(s >= 0 and s + t <= n for s, t, n in zip(window.start, window.target_shape, window.source_shape))
    return tuple(src), tuple(dst), inside


def copy_window(source: np.ndarray, window: transforms.CropPad, out: np.ndarray) -> None:
    """Copies ``window`` of ``source`` into ``out`` (shape ``window.target_shape``), zero outside the source."""
    src, dst, inside = overlap(window)
    if not inside:
        out[...] = 0
    out[dst] = source[src]


class NpyStore:
    """The ``.npy`` store of ``data/cache.py``, memory-mapped (local or mounted file systems only).

    Each volume is mapped once per process and kept open (up to ``MAX_OPEN_ARRAYS``), so a window read is one copy
    from the page cache with no page-table rebuild. Picklable: a worker process opens its own maps.
    """

    kind = "npy"

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], records: list[cache.PreparedRecord]):
        self.root = epath.Path(root)
        self.meta = meta
        self.records = records
        self._maps: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"root": os.fspath(self.root), "meta": self.meta, "records": self.records}

    def __setstate__(self, state):
        self.__init__(state["root"], state["meta"], state["records"])

    def _array(self, record: cache.PreparedRecord, relative: str, dtype) -> np.ndarray:
        with self._lock:
            array = self._maps.get(relative)
            if array is not None:
                self._maps.move_to_end(relative)
                return array
        array = cache.open_array(self.root, relative)
        if array.shape != record.shape or array.dtype != dtype:
            raise ValueError(f"{record.id}: {relative} is {array.dtype}{list(array.shape)}, index says "
                             f"{np.dtype(dtype)}{list(record.shape)}")
        with self._lock:
            self._maps[relative] = array
            while len(self._maps) > MAX_OPEN_ARRAYS:
                self._maps.popitem(last=False)
        return array

    def read_window(self, record: cache.PreparedRecord, window: transforms.CropPad,
                    image_out: Float[np.ndarray, "s0 s1 s2"] | None = None,
                    label_out: UInt8[np.ndarray, "s0 s1 s2"] | None = None) -> None:
        """Copies the window of the record's image and/or label into the given buffers.

        Raises:
            ValueError: unreadable or truncated array, or one whose shape/dtype disagrees with the index.
        """
        if image_out is not None:
            copy_window(self._array(record, record.image, np.float32), window, image_out)
        if label_out is not None:
            copy_window(self._array(record, record.label, np.uint8), window, label_out)


class WindowShardStore:
    """The sharded store: per target its ``window_size``^3 crop window, at a fixed offset in a shard file.

    Record ``k`` of a shard is ``RECORD_BYTES = 5 * W^3`` bytes at offset ``k * RECORD_BYTES``: the image window
    (float32, little-endian) then the label window (uint8), C order, zero where the window leaves the volume.
    Local (or mounted) shards are memory-mapped once per process and copied from with one contiguous copy
    (``os.preadv`` into the same cold batch buffers measured 2-3 times slower here); object-store shards
    (``gs://``, ``s3://``, ...) are read with one TensorStore kvstore byte-range request per record
    (TensorStore comes with orbax-checkpoint; on GCS it takes credentials from the environment like Google's
    client libraries). A crop of size ``S <= W`` with ``W - S`` even is a centred sub-window of the stored one
    (the centre rule is ``floor(centre - S/2)``), so a store prepared with ``--window 160`` also serves 128.
    Picklable: a worker process opens its own files.
    """

    kind = "windows"

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], records: list[cache.PreparedRecord]):
        self.root = epath.Path(root)
        self.meta = meta
        self.records = records
        self.window_size = int(meta["window_size"])
        self.record_bytes = 5 * self.window_size**3
        self._remote = "://" in os.fspath(root)
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"root": os.fspath(self.root), "meta": self.meta, "records": self.records}

    def __setstate__(self, state):
        self.__init__(state["root"], state["meta"], state["records"])

    def check_crop_size(self, crop_size: int) -> None:
        """Raises ValueError unless ``crop_size`` windows are sub-windows of the stored ones."""
        if crop_size > self.window_size or (self.window_size - crop_size) % 2:
            raise ValueError(f"{self.root}: this store holds {self.window_size}^3 windows; it serves crop sizes "
                             f"<= {self.window_size} with an even difference, not {crop_size} (prepare again with "
                             f"--window {crop_size})")

    def _file(self, shard: str):
        with self._lock:
            handle = self._files.get(shard)
            if handle is None:
                if self._remote:
                    import tensorstore as ts  # pylint: disable=import-outside-toplevel

                    url = os.fspath(self.root / "shards") + "/"
                    handle = ts.KvStore.open(url if "://" in url else "file://" + url).result()
                else:
                    path = os.fspath(self.root / shard)
                    handle = np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8)
                self._files[shard] = handle
        return handle

    def _record(self, record: cache.PreparedRecord) -> np.ndarray:
        """The record's bytes: a view of the memory-mapped shard, or one byte-range read from object storage."""
        offset, want = record.position * self.record_bytes, self.record_bytes
        try:
            handle = self._file(record.image)
            if self._remote:
                key = record.image.split("/", 1)[1]
                data = np.frombuffer(handle.read(key, byte_range=slice(offset, offset + want)).result().value, np.uint8)
            else:
                data = handle[offset:offset + want]
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.root / record.image}: cannot read record {record.position} ({err})") from err
        if len(data) != want:
            raise ValueError(f"{self.root / record.image}: record {record.position} is cut short ({len(data)} of "
                             f"{want} bytes); the shard is truncated")
        return data

    def read_window(self, record: cache.PreparedRecord, window: transforms.CropPad,
                    image_out: Float[np.ndarray, "s0 s1 s2"] | None = None,
                    label_out: UInt8[np.ndarray, "s0 s1 s2"] | None = None) -> None:
        """Copies the window of the record's image and/or label into the given buffers (one copy).

        Raises:
            ValueError: a window outside the stored one, or a truncated or unreadable shard (naming it).
        """
        w = self.window_size
        offset = [s - b for s, b in zip(window.start, record.window_start)]
        size = window.target_shape
        if record.position < 0 or len(offset) != 3 or any(o < 0 or o + t > w for o, t in zip(offset, size)):
            raise ValueError(f"{record.id}: window {window.start}+{size} is not inside the stored window "
                             f"{record.window_start}+{w}")
        data = self._record(record)
        sub = tuple(slice(o, o + t) for o, t in zip(offset, size))
        if image_out is not None:
            image_out[...] = data[: 4 * w**3].view("<f4").reshape(w, w, w)[sub]
        if label_out is not None:
            label_out[...] = data[4 * w**3:].reshape(w, w, w)[sub]


PART_PATTERN = re.compile(r"part-(\d{5})-of-(\d{5})\.json")


def merge_parts(root: str | os.PathLike) -> dict[str, Any]:
    """Merges ``parts/part-<i>-of-<n>.json`` (written by ``prepare --num-shards n``) into ``prepared.json``.

    Returns:
        The merged index.

    Raises:
        ValueError: no parts, parts of different shard counts or settings, or missing parts (named).
    """
    root = epath.Path(root)
    folder = root / "parts"
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    found = {}
    for name in names:
        match = PART_PATTERN.fullmatch(name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = name
    if not found:
        raise ValueError(f"{root / cache.INDEX_NAME}: no prepared index and no shard parts; run "
                         f"`python -m sammed3d_jax.data.prepare SRC {root}`")
    counts = {n for _, n in found}
    if len(counts) != 1:
        raise ValueError(f"{folder}: parts of different --num-shards runs: {sorted(counts)}")
    (n,) = counts
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise ValueError(f"{root}: the store was prepared in {n} shards and shard(s) {missing} have not finished "
                         f"(run `prepare ... --num-shards {n} --shard-index i` for each)")
    parts = [cache.read_json(folder / found[(i, n)]) for i in range(n)]
    settings = [{k: p[k] for k in ("format",) + cache.SETTING_KEYS if k in p} for p in parts]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError(f"{folder}: the shard parts were prepared with different settings")
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["id"])
    skipped = sorted({json_key(s): s for p in parts for s in p["skipped"]}.values(), key=json_key)
    notes = sorted({json_key(s): s for p in parts for s in p.get("notes", [])}.values(), key=json_key)
    index = {**settings[0], "source": parts[0].get("source"), "summary": _merged_summary(parts, records, skipped, notes),
             "records": records, "skipped": skipped, "notes": notes}
    cache.write_json(root / cache.INDEX_NAME, index)
    return index


def json_key(obj: Any) -> str:
    import json  # pylint: disable=import-outside-toplevel

    return json.dumps(obj, sort_keys=True)


def _merged_summary(parts, records, skipped, notes) -> dict[str, Any]:
    reasons = collections.Counter(s["kind"] for s in skipped)
    return {"cases": sum(p["summary"]["cases"] for p in parts),
            "failed_cases": sum(p["summary"]["failed_cases"] for p in parts),
            "records": len(records), "skipped": len(skipped), "skip_reasons": dict(sorted(reasons.items())),
            "notes": len(notes)}


def open_store(root: str | os.PathLike):
    """Opens a prepared store of either kind (read from the index; a sharded one's parts are merged first).

    Raises:
        ValueError: no index (and no complete set of parts), or an index of an unknown format (naming the folder).
    """
    path = epath.Path(root) / cache.INDEX_NAME
    if path.exists():
        meta, records = cache.read_index(root)
    else:
        meta, records = cache.parse_index(merge_parts(root), path)
    if meta["storage"] == "windows":
        return WindowShardStore(root, meta, records)
    return NpyStore(root, meta, records)
