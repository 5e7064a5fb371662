"""One case of ``data/prepare.py``: validate, resample, reorient, cut targets, write (run in a worker process).

Owns ``Job`` (one image and its targets), ``run_case`` (the work, returning the case's records and skips as
JSON) and the two payload forms: ``.npy`` files plus a ``case.json`` marker, or window-shard records (each
target's crop window, image then label bytes) handed back to the parent, which owns the shard file. Must not
import jax, flax, grain or the model.
"""

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from sammed3d_jax.data import cache, check, manifest, nifti, transforms


@dataclasses.dataclass(frozen=True)
class Job:
    """One image and every target on it.

    Attributes:
        key: the case key (``cache.case_key`` of the dataset-relative identity).
        image: the image file.
        records: its targets (manifest records sharing the image).
        signature: ``{"image": sig, "labels": {file: sig}}`` of the source files (``cache.file_signature``).
    """

    key: str
    image: str
    records: tuple[manifest.Record, ...]
    signature: dict[str, Any]


def skip_entry(record: manifest.Record, reason: str, kind: str | None = None) -> dict[str, Any]:
    """A skipped target: ``reason`` in full (file names included), ``kind`` the short class the summary counts."""
    return {"case": record.case, "dataset": record.dataset, "target": record.target,
            "label_value": record.label_value, "image": record.image, "label": record.label, "reason": reason,
            "kind": kind or reason}


class CaseProblem(ValueError):
    """Validation problems that rule the whole case out (``kind``: the first one's short class)."""

    def __init__(self, problems: Sequence[check.Problem]):
        super().__init__("; ".join(f"{p.file}: {p.problem}" for p in problems))
        self.kind = problems[0].problem.split(" (")[0]


def _validate(job: Job) -> None:
    fatal = [p for p in check.validate_records(job.records) if not p.problem.startswith("empty target")]
    if fatal:
        raise CaseProblem(fatal)


def _image(job: Job, spacing: tuple[float, ...]):
    """The case's image on the target grid in RAS+ order, plus the source geometry and the resampled one."""
    image, geom = nifti.read_image(job.image)
    image, new_geom = transforms.resample_to_spacing(image, geom, spacing, order=1)
    image, ras_geom = nifti.reorient_to_ras(image, new_geom)
    return image.astype(np.float32, copy=False), geom, new_geom, ras_geom


def _targets(job: Job, settings: dict[str, Any], geom, new_geom):
    """Yields ``(record, binary uint8 array or None, source mm^3, skip entry or None)`` for every target."""
    spacing, voxel_mm3 = tuple(settings["spacing_mm"]), float(np.prod(geom.spacing_mm))
    by_label = collections.defaultdict(list)
    for record in job.records:
        by_label[record.label].append(record)
    for label_path, records in by_label.items():
        source_label, _ = nifti.read_label(label_path)
        # Nearest resampling commutes with "== value", so the label map is resampled once for all its values;
        # on the image's grid (validation guaranteed the two grids agree).
        label, _ = transforms.resample_to_spacing(source_label, geom, spacing, order=0)
        label, _ = nifti.reorient_to_ras(label, new_geom)
        for record in records:
            source_mm3 = float(np.count_nonzero(source_label == record.label_value)) * voxel_mm3
            if source_mm3 == 0:
                yield record, None, 0.0, skip_entry(record, "empty target (no voxel with this label value)")
            elif source_mm3 < settings["min_target_mm3"]:
                yield record, None, source_mm3, skip_entry(
                    record, f"target of {source_mm3:.3g} mm^3 < min_target_mm3 = {settings['min_target_mm3']:g} mm^3",
                    "target below min_target_mm3")
            else:
                binary = (label == record.label_value).astype(np.uint8)
                if not binary.any():
                    yield record, None, source_mm3, skip_entry(
                        record, "target vanishes when resampled to the target spacing")
                else:
                    yield record, binary, source_mm3, None


def _bbox(binary: np.ndarray) -> tuple[tuple[int, int], ...]:
    hits = [np.flatnonzero(binary.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return tuple((int(h[0]), int(h[-1]) + 1) for h in hits)


def window_payload(image: np.ndarray, binary: np.ndarray, window: transforms.CropPad) -> bytes:
    """A window-shard record: the window of the image (float32, little-endian) then of the label (uint8)."""
    image_part = transforms.apply_crop_or_pad(image, window).astype("<f4", copy=False)
    return image_part.tobytes() + transforms.apply_crop_or_pad(binary, window).tobytes()


def run_case(job: Job, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Prepares one case; never raises for a problem of the case itself (it becomes a failed result).

    Args:
        job: the case.
        out: the store folder.
        settings: ``spacing_mm``, ``min_target_mm3``, ``storage`` and, for window shards, ``window_size``.

    Returns:
        ``{"key", "status": "ok"|"failed", "signature", "settings", "records": [record JSON], "skipped": [...]}``;
        Window-shard results also carry ``"payloads"`` (one ``bytes`` per record, same order). ``.npy`` results
        are also written as ``cases/<key>/case.json`` (or ``failed/<key>.json``), which resume reads.
    """
    out = epath.Path(out)
    npy = settings["storage"] == "npy"
    try:
        _validate(job)
        image, geom, new_geom, ras_geom = _image(job, tuple(settings["spacing_mm"]))
        image_rel = f"cases/{job.key}/image.npy"
        if npy:
            cache.save_array(out / image_rel, image)
        prepared, skipped, payloads = [], [], []
        for record, binary, source_mm3, skip in _targets(job, settings, geom, new_geom):
            if skip is not None:
                skipped.append(skip)
                continue
            bbox = _bbox(binary)
            fields = dict(id=f"{job.key}/{record.label_value}", case=record.case, dataset=record.dataset,
                          target=record.target, modality=record.modality, label_value=record.label_value,
                          shape=ras_geom.shape, spacing_mm=tuple(ras_geom.spacing_mm),
                          affine=tuple(map(tuple, ras_geom.affine.tolist())), bbox=bbox,
                          foreground_voxels=int(np.count_nonzero(binary)), source_volume_mm3=source_mm3,
                          source_image=record.image, source_label=record.label)
            if npy:
                label_rel = f"cases/{job.key}/label_{record.label_value}.npy"
                cache.save_array(out / label_rel, binary)
                prepared.append(cache.PreparedRecord(image=image_rel, label=label_rel, **fields).to_json())
            else:
                window = transforms.box_crop_window(bbox, ras_geom.shape, settings["window_size"])
                payloads.append(window_payload(image, binary, window))
                prepared.append(cache.PreparedRecord(image="", label="", window_start=window.start,
                                                     **fields).to_json())
        result = {"key": job.key, "status": "ok", "signature": job.signature, "settings": settings,
                  "records": prepared, "skipped": skipped}
        if npy:
            cache.write_json(out / "cases" / job.key / "case.json", result)
            marker = out / "failed" / f"{job.key}.json"
            if marker.exists():
                marker.unlink()
        return {**result, "payloads": payloads} if not npy else result
    except (ValueError, OSError, MemoryError, EOFError) as err:
        if isinstance(err, CaseProblem):
            kind = err.kind
        elif isinstance(err, nifti.DataFileError):
            kind = err.problem.split(" (")[0]
        else:
            kind = f"error while preparing ({type(err).__name__})"
        result = {"key": job.key, "status": "failed", "signature": job.signature, "settings": settings,
                  "records": [], "skipped": [skip_entry(r, str(err), kind) for r in job.records]}
        if npy:
            cache.write_json(out / "failed" / f"{job.key}.json", result)
        return result
