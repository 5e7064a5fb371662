"""The prepared-volume store that ``data/prepare.py`` writes and ``data/pipeline.py`` reads.

Owns the on-disk format (``FORMAT``), the record type ``PreparedRecord`` and atomic writes. numpy/json only;
must not import jax, flax, grain, nibabel or the model.

Layout of a prepared folder::

    OUT/prepared.json                index: format, spacing, source, records (one per binary target), skipped
    OUT/cases/<key>/image.npy        float32 [h, w, d], RAS+ array order, resampled to the target spacing
    OUT/cases/<key>/label_<v>.npy    uint8 [h, w, d] in {0, 1}, the target "label == v" on the same grid
    OUT/cases/<key>/case.json        per-case completion marker (written last; resume skips a case that has one
                                     whose source signature and settings match)
    OUT/failed/<key>.json            per-case failure marker (reason + source signature); not retried while the
                                     source files are unchanged

Each image is stored once, however many targets it has. ``.npy`` files are opened with ``np.load(mmap_mode="r")``,
so a crop reads only the pages it touches and worker processes share the page cache.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tempfile
from typing import Any

import numpy as np
from jaxtyping import Shaped

FORMAT = "sammed3d_jax.prepared/1"
INDEX_NAME = "prepared.json"
PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class PreparedRecord:
    """One binary training target in the prepared store.

    Attributes:
        id: unique id, ``<case key>/<label value>``.
        case, dataset, target, modality: from the source manifest record.
        label_value: value of the target in the source label map.
        image, label: paths of the ``.npy`` files relative to the prepared folder.
        shape: spatial shape of both arrays (RAS+ array order).
        spacing_mm: voxel size per array axis.
        affine: 4x4 voxel -> world (RAS+ mm) matrix of the prepared grid.
        bbox: per axis ``[first, last + 1)`` of the target's voxels on the prepared grid.
        foreground_voxels: target voxels on the prepared grid.
        source_volume_mm3: target volume measured on the source grid (upstream's small-target rule uses it).
        source_image, source_label: the files it was made from.
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PreparedRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"prepared record {data.get('id', '?')} lacks fields {sorted(missing)}")
        return cls(
            **{
                **{k: data[k] for k in names},
                "shape": tuple(int(s) for s in data["shape"]),
                "spacing_mm": tuple(float(s) for s in data["spacing_mm"]),
                "affine": tuple(tuple(float(v) for v in row) for row in data["affine"]),
                "bbox": tuple((int(lo), int(hi)) for lo, hi in data["bbox"]),
                "label_value": int(data["label_value"]),
                "foreground_voxels": int(data["foreground_voxels"]),
                "source_volume_mm3": float(data["source_volume_mm3"]),
            }
        )


def case_key(dataset: str, case: str, image_path: PathLike) -> str:
    """Folder name of a case: readable ``<dataset>__<case>`` plus a short hash of the image path (unique)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}__{case}").strip("._") or "case"
    digest = hashlib.sha1(os.path.abspath(os.fspath(image_path)).encode()).hexdigest()[:8]
    return f"{readable[:80]}-{digest}"


def file_signature(path: PathLike) -> list[int] | None:
    """``[size, mtime_ns]`` of a file (None if it does not exist): what resume compares to detect changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _atomic_write(path: pathlib.Path, write) -> None:
    # Write next to the destination and rename: a reader (or a resumed run) never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_array(path: PathLike, array: Shaped[np.ndarray, "..."]) -> None:
    """Writes ``array`` as ``.npy`` atomically (temporary file + rename)."""
    _atomic_write(pathlib.Path(path), lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_json(path: PathLike, obj: Any) -> None:
    """Writes JSON atomically."""
    _atomic_write(pathlib.Path(path), lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path: PathLike) -> Any:
    """Reads a JSON file; a missing or malformed file raises ValueError naming it."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path}: file not found") from err
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err


def read_index(prepared_dir: PathLike) -> tuple[dict[str, Any], list[PreparedRecord]]:
    """Reads ``prepared.json``.

    Returns:
        ``(meta, records)``: meta holds everything but the records (format, spacing_mm, source, skipped, ...).

    Raises:
        ValueError: missing index (run ``python -m sammed3d_jax.data.prepare`` first), other format, bad record.
    """
    path = pathlib.Path(prepared_dir) / INDEX_NAME
    if not path.exists():
        raise ValueError(f"{path}: no prepared index; run `python -m sammed3d_jax.data.prepare SRC {prepared_dir}`")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} index (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    records = [PreparedRecord.from_json(r) for r in meta.pop("records")]
    return meta, records


def open_array(prepared_dir: PathLike, relative: str) -> Shaped[np.ndarray, "..."]:
    """Memory-maps one stored ``.npy`` array read-only (truncated files raise ValueError naming the file)."""
    path = os.path.join(os.fspath(prepared_dir), relative)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: unreadable prepared array ({type(err).__name__}: {err})") from err
