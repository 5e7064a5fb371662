"""The prepared store's on-disk format: index, record type, case keys, signatures and atomic writes.

Owns ``FORMAT``, ``PreparedRecord``, ``case_key`` / ``file_signature`` (what resume compares) and the atomic
writers; ``data/prepare.py`` writes a store, ``data/store.py`` reads windows out of it. numpy/json/etils only;
must not import jax, flax, grain, nibabel or the model. Every path goes through ``etils.epath``, so the index
and the window-shard store work on ``gs://``; only the ``.npy`` store needs a local or mounted folder (memory maps).

Two kinds of store share the index ``OUT/prepared.json`` (format, storage, spacing, source, records, skipped):

``storage: "npy"`` (the single-host default)::

    OUT/cases/<key>/image.npy        float32 [h, w, d], RAS+ array order, resampled to the target spacing
    OUT/cases/<key>/label_<v>.npy    uint8 [h, w, d] in {0, 1}, the target "label == v" on the same grid
    OUT/cases/<key>/case.json        per-case completion marker (resume skips a case whose marker matches)
    OUT/failed/<key>.json            per-case failure marker (not retried while the source files are unchanged)

``storage: "windows"`` (for pods: few large files, no shared POSIX file system, ``data/store.py``)::

    OUT/shards/part-<i>-of-<n>.windows   per target its crop window of ``window_size``^3 at offset
                                          ``position * 5 W^3``: image float32 LE then label uint8, C order

A store prepared as ``--num-shards N`` runs first holds ``OUT/parts/part-<i>-of-<n>.json`` (each run's records
and skips); the last run to finish (or the first reader) merges them into ``prepared.json``.

Case keys are ``<dataset>__<case>-<hash>`` where the hash is of the case's dataset-relative identity (the image
path relative to the dataset root), and signatures are size + a hash of the file's first and last 64 KiB; so a
copied or moved dataset, or a moved store, resumes and reads as before.
"""

import dataclasses
import hashlib
import json
import os
import re
import uuid
from typing import Any

import numpy as np
from etils import epath
from jaxtyping import Shaped

FORMAT = "sammed3d_jax.prepared/1"
INDEX_NAME = "prepared.json"
STORAGE_KINDS = ("npy", "windows")
# What a store is made with; a run with other values is refused, and shard parts must agree on them.
SETTING_KEYS = ("storage", "spacing_mm", "min_target_mm3", "window_size")
PathLike = str | os.PathLike
SIGNATURE_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class PreparedRecord:
    """One binary training target in the prepared store.

    Attributes:
        id: unique id, ``<case key>/<label value>``.
        case, dataset, target, modality: from the source manifest record.
        label_value: value of the target in the source label map.
        image, label: files relative to the store (``.npy`` arrays; for window shards both name the shard).
        shape: spatial shape of the prepared volume (RAS+ array order).
        spacing_mm: voxel size per array axis.
        affine: 4x4 voxel -> world (RAS+ mm) matrix of the prepared grid.
        bbox: per axis ``[first, last + 1)`` of the target's voxels on the prepared grid.
        foreground_voxels: target voxels on the prepared grid.
        source_volume_mm3: target volume measured on the source grid (upstream's small-target rule uses it).
        source_image, source_label: the files it was made from (as given when it was prepared).
        position: window shards: the record's index in its shard file (-1 for ``.npy``).
        window_start: window shards: volume index of the stored window's first voxel per axis.
    """

    id: str
    case: str
    dataset: str
    target: str
    modality: str
    label_value: int
    image: str
    label: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    bbox: tuple[tuple[int, int], ...]
    foreground_voxels: int
    source_volume_mm3: float
    source_image: str
    source_label: str
    position: int = -1
    window_start: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PreparedRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {"position", "window_start"}
        missing = names - optional - set(data)
        if missing:
            raise ValueError(f"prepared record {data.get('id', '?')} lacks fields {sorted(missing)}")
        return cls(
            **{
                **{k: data[k] for k in names if k in data},
                "shape": tuple(int(s) for s in data["shape"]),
                "spacing_mm": tuple(float(s) for s in data["spacing_mm"]),
                "affine": tuple(tuple(float(v) for v in row) for row in data["affine"]),
                "bbox": tuple((int(lo), int(hi)) for lo, hi in data["bbox"]),
                "label_value": int(data["label_value"]),
                "foreground_voxels": int(data["foreground_voxels"]),
                "source_volume_mm3": float(data["source_volume_mm3"]),
                "position": int(data.get("position", -1)),
                "window_start": tuple(int(s) for s in data.get("window_start", ())),
            }
        )


def case_key(dataset: str, case: str, identity: str) -> str:
    """Folder name of a case: readable ``<dataset>__<case>`` plus a short hash of ``identity`` (unique).

    ``identity`` is the case's dataset-relative identity (its image path relative to the dataset root), never an
    absolute path, so the key survives copying or moving the dataset.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}__{case}").strip("._") or "case"
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    return f"{readable[:80]}-{digest}"


def file_signature(path: PathLike) -> list | None:
    """``[size, sha1 of the first and last 64 KiB]`` of a file (None if it does not exist): what resume compares.

    Content, not modification time, so a copied dataset still matches; a gzip file's last bytes hold the CRC-32 of
    all its data, so any change to a ``.nii.gz`` changes the signature.
    """
    path = epath.Path(path)
    try:
        size = path.stat().length
        with path.open("rb") as f:
            head = f.read(SIGNATURE_BYTES)
            if size > 2 * SIGNATURE_BYTES:
                f.seek(size - SIGNATURE_BYTES)
            tail = f.read()
    except (OSError, FileNotFoundError):
        return None
    return [int(size), hashlib.sha1(head + b"|" + tail).hexdigest()]


def atomic_write(path: PathLike, write) -> None:
    """Writes through ``write(binary_file)`` to a temporary name next to ``path``, then renames it into place.

    A reader (or a resumed run) never sees a half-written file; on error the temporary file is removed.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def save_array(path: PathLike, array: Shaped[np.ndarray, "..."]) -> None:
    """Writes ``array`` as ``.npy`` atomically (temporary file + rename)."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_json(path: PathLike, obj: Any) -> None:
    """Writes JSON atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path: PathLike) -> Any:
    """Reads a JSON file; a missing or malformed file raises ValueError naming it."""
    path = epath.Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path}: file not found") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err


def parse_index(meta: Any, path: PathLike) -> tuple[dict[str, Any], list[PreparedRecord]]:
    """Checks a loaded index and splits it into ``(meta without records, records)``."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: not a {FORMAT} index (format {found!r})")
    meta = dict(meta)
    meta.setdefault("storage", "npy")
    if meta["storage"] not in STORAGE_KINDS:
        raise ValueError(f"{path}: unknown storage {meta['storage']!r} (this code reads {STORAGE_KINDS})")
    try:
        records = [PreparedRecord.from_json(r) for r in meta.pop("records")]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed record ({err})") from err
    return meta, records


def read_index(prepared_dir: PathLike) -> tuple[dict[str, Any], list[PreparedRecord]]:
    """Reads ``prepared.json``.

    Returns:
        ``(meta, records)``: meta holds everything but the records (format, storage, spacing_mm, source, ...).

    Raises:
        ValueError: missing index (run ``python -m sammed3d_jax.data.prepare`` first), other format, bad record.
    """
    path = epath.Path(prepared_dir) / INDEX_NAME
    if not path.exists():
        raise ValueError(f"{path}: no prepared index; run `python -m sammed3d_jax.data.prepare SRC {prepared_dir}`")
    return parse_index(read_json(path), path)


def local_path(path: PathLike) -> str:
    """``path`` as a local file name, or ValueError for an object-store URL (memory maps need a file system)."""
    text = os.fspath(path)
    if "://" in text:
        raise ValueError(f"{text}: the .npy store is memory-mapped and needs a local or mounted folder; prepare "
                         "with --store windows to read from object storage")
    return text


def open_array(prepared_dir: PathLike, relative: str) -> Shaped[np.ndarray, "..."]:
    """Memory-maps one stored ``.npy`` array read-only (truncated files raise ValueError naming the file)."""
    path = os.path.join(local_path(prepared_dir), relative)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: unreadable prepared array ({type(err).__name__}: {err})") from err
