"""Dataset discovery and the manifest: which (image, label, target) pairs a dataset holds.

Owns: ``Record`` (one binary target of one case), ``discover(root)`` for the two layouts users have, and the
manifest JSON file (``write_manifest`` / ``read_manifest``). Layouts:

- upstream SAM-Med3D: ``<root>/<target>/<dataset>/labelsTr/<case>.nii.gz`` with binary labels (value 1) and
  the image at the same file name under ``imagesTr`` (upstream replaces "labels" by "images"; we do it in the
  directory name only, so a root path containing "labels" stays intact). The modality is the dataset folder's
  prefix (``ct_WORD`` -> ``ct``). ``root`` may also be one ``<dataset>`` folder (target = its parent's name).
- nnU-Net (v1/v2) / Medical Segmentation Decathlon: ``dataset.json``, ``labelsTr/<case>.nii.gz`` and
  ``imagesTr/<case>_0000.nii.gz`` (or raw MSD's ``imagesTr/<case>.nii.gz``). Every non-zero label value
  present in a case's label map becomes its own binary target named from ``dataset.json["labels"]``
  (v1 ``{"1": "liver"}`` or v2 ``{"liver": 1}``); the modality is channel 0 of ``"channel_names"`` (v2) or
  ``"modality"`` (v1), lower-cased. ``root`` may also be a folder of such datasets (e.g. ``nnUNet_raw``).

Problems found while discovering (unreadable label, image without label, value missing from dataset.json)
are returned by ``discover_with_problems`` for ``data/check.py``; ``discover`` warns about them (or raises with
``strict=True``) and leaves unreadable cases out.

Must not import: jax, flax, model/, training/.
"""

import concurrent.futures
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from sammed3d_jax.data import paths
from sammed3d_jax.data.nifti import DataFileError, read_label

PathLike = str | os.PathLike
MANIFEST_FORMAT = "sammed3d_jax.manifest"
MANIFEST_VERSION = 1
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True)
class Record:
    """One binary segmentation target: voxels of ``label`` equal to ``label_value``, on ``image``.

    Attributes:
        case: case identifier (file name without ending and channel suffix).
        image: path of the intensity volume (absolute once discovered or read).
        label: path of the label map.
        label_value: voxel value of the target in the label map (1 for upstream's binary labels).
        target: target name (upstream class folder, or the dataset.json label name).
        dataset: dataset folder name.
        modality: lower-case modality, e.g. "ct", "mr", "mri" ("unknown" when not stated).
    """

    case: str
    image: str
    label: str
    label_value: int
    target: str
    dataset: str
    modality: str


def _strip_ending(name: str) -> str | None:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _nifti_files(folder: epath.Path) -> list[epath.Path]:
    # Hidden files are skipped: MSD archives ship macOS "._<case>.nii.gz" resource forks next to the data.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _strip_ending(p.name))


def detect_layout(root: PathLike, split: str = "Tr") -> str:
    """Names the layout of ``root``: "nnunet", "nnunet_collection", "upstream" or "upstream_dataset".

    Raises:
        ValueError: ``root`` is not a folder or matches neither layout (the message names the folder).
    """
    root = epath.Path(root)
    if not root.exists():
        raise ValueError(f"{root}: does not exist")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (give a dataset folder or a manifest .json)")
    if (root / "dataset.json").is_file():
        return "nnunet"
    children = sorted(p for p in root.iterdir() if p.is_dir())
    if any((c / "dataset.json").is_file() for c in children):
        return "nnunet_collection"
    if (root / f"labels{split}").is_dir():
        return "upstream_dataset"
    if any((d / f"labels{split}").is_dir() for c in children for d in c.iterdir() if d.is_dir()):
        return "upstream"
    raise ValueError(
        f"{root}: no dataset found. Expected an nnU-Net/MSD dataset (dataset.json, imagesTr/, labelsTr/), a folder "
        f"of such datasets, or the upstream layout <root>/<target>/<dataset>/labels{split}/<case>.nii.gz"
    )


def _upstream_dataset(folder: epath.Path, target: str, split: str) -> list[Record]:
    prefix = folder.name.split("_", 1)[0].lower() if "_" in folder.name else "unknown"
    records = []
    for label in _nifti_files(folder / f"labels{split}"):
        image = folder / f"images{split}" / label.name
        case = _strip_ending(label.name)
        records.append(Record(case, str(image), str(label), 1, target, folder.name, prefix))
    return records


def _label_names(meta: dict, path: epath.Path) -> tuple[dict[int, str], set[int]]:
    """dataset.json "labels" -> ({value: name} without background, {ignored values})."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: 'labels' must be a non-empty mapping")
    names, ignored = {}, set()
    if all(isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(v, str) for k, v in labels.items()):
        pairs = [(int(k), v) for k, v in labels.items()]  # nnU-Net v1 / MSD: {"0": "background", "1": "liver"}
    elif all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in labels.values()):
        # nnU-Net v2: {"background": 0, "liver": 1}; region entries ([1, 2, 3]) name a value only when single.
        single = {k: v for k, v in labels.items() if not isinstance(v, list) or len(v) == 1}
        pairs = [(v if isinstance(v, int) else v[0], k) for k, v in single.items()]
    else:
        raise ValueError(f"{path}: 'labels' is neither {{value: name}} (nnU-Net v1) nor {{name: value}} (v2)")
    for value, name in pairs:
        if name == "ignore":
            ignored.add(value)  # nnU-Net v2's "ignore" label marks unannotated voxels, not a target
        elif value != 0:
            names[value] = name
    return names, ignored


def _modality(meta: dict) -> str:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    name = channels.get("0") if isinstance(channels, dict) else None
    return str(name).strip().lower() if name else "unknown"


def _label_values(path: str) -> tuple[str, list[int] | str]:
    try:
        label, _ = read_label(path)
    except DataFileError as err:
        return path, err.problem
    # bincount is several times faster than np.unique for the small non-negative values labels use.
    if label.size and label.min() >= 0 and label.max() < 65536:
        return path, np.flatnonzero(np.bincount(label.ravel())).tolist()
    return path, np.unique(label).tolist()


def _nnunet_dataset(folder, split, scan_labels, workers, problems, keep=None):
    meta_path = folder / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: cannot read dataset.json ({err})") from err
    names, ignored = _label_names(meta, meta_path)
    modality = _modality(meta)
    labels_dir, images_dir = folder / f"labels{split}", folder / f"images{split}"
    if not labels_dir.is_dir():
        raise ValueError(f"{folder}: nnU-Net dataset without a labels{split}/ folder")
    label_files = _nifti_files(labels_dir)
    cases = {_strip_ending(p.name): p for p in label_files}
    image_files = _nifti_files(images_dir) if images_dir.is_dir() else []
    for image in image_files:
        stem = _strip_ending(image.name)
        base = stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem
        if base not in cases:
            problems.append((str(image), f"image without a label (no labels{split}/{base}.nii.gz)"))
    pairs = []
    for case, label in cases.items():
        ending = label.name[len(case) :]
        image = images_dir / f"{case}_0000{ending}"
        if not image.exists() and (images_dir / label.name).exists():
            image = images_dir / label.name  # raw MSD: one (possibly 4-D) file per case, no channel suffix
        pairs.append((case, str(image), str(label)))
    if keep is not None:  # before the label scan: a shard of a big dataset reads only its own label maps
        pairs = [p for p in pairs if keep(folder.name, p[0], p[1])]
    if scan_labels:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            values = dict(pool.map(_label_values, [label for _, _, label in pairs]))
    else:
        values = {label: sorted(names) for _, _, label in pairs}
    records = []
    for case, image, label in pairs:
        found = values[label]
        if isinstance(found, str):
            problems.append((label, found))
            continue
        if scan_labels and not [v for v in found if v != 0 and v not in ignored]:
            problems.append((label, f"empty label map: no target voxel (values present: {found})"))
            continue
        for value in found:
            if value == 0 or value in ignored:
                continue
            if value not in names:
                problems.append((label, f"label value {value} is not declared in {meta_path.name}"))
            name = names.get(value, f"label_{value}")
            records.append(Record(case, image, label, int(value), name, folder.name, modality))
    return records


def discover_with_problems(
    root: PathLike, *, split: str = "Tr", scan_labels: bool = True, workers: int | None = None,
    keep: Callable[[str, str, str], bool] | None = None,
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Like ``discover``, also returning the (file, problem) pairs found on the way instead of warning.

    ``keep(dataset, case, image_path)``, if given, selects cases before any label map is read.
    """
    root = epath.Path(paths.absolute(root))
    layout = detect_layout(root, split)
    workers = workers or min(8, os.cpu_count() or 1)
    problems: list[tuple[str, str]] = []
    if layout == "nnunet":
        records = _nnunet_dataset(root, split, scan_labels, workers, problems, keep)
    elif layout == "nnunet_collection":
        records = []
        for child in sorted(p for p in root.iterdir() if (p / "dataset.json").is_file()):
            records += _nnunet_dataset(child, split, scan_labels, workers, problems, keep)
    elif layout == "upstream_dataset":
        records = _upstream_dataset(root, root.parent.name, split)
    else:
        records = []
        for target in sorted(p for p in root.iterdir() if p.is_dir()):
            for dataset in sorted(p for p in target.iterdir() if (p / f"labels{split}").is_dir()):
                records += _upstream_dataset(dataset, target.name, split)
    if keep is not None:
        records = [r for r in records if keep(r.dataset, r.case, r.image)]
    if not records and not problems and keep is None:
        problems.append((str(root), f"no label files found ({layout} layout, split {split!r})"))
    return records, problems


def discover(
    root: PathLike,
    *,
    split: str = "Tr",
    scan_labels: bool = True,
    strict: bool = False,
    workers: int | None = None,
) -> list[Record]:
    """Finds every binary target of a dataset folder (layout detected automatically, see the module docstring).

    Args:
        root: dataset folder (nnU-Net/MSD dataset, folder of nnU-Net datasets, upstream root or one upstream
            dataset folder).
        split: "Tr" (default) reads ``labelsTr``/``imagesTr``; "Ts" or "Val" the other splits.
        scan_labels: nnU-Net layout only. True (default): read each label map and make a record per value
            present in it. False: one record per value declared in dataset.json, without reading any file
            (fast; absent values then show up as empty targets in ``data/check.py``).
        strict: raise on the first problem instead of warning and skipping unreadable cases.
        workers: threads reading label maps (default: up to 8).

    Returns:
        Records in a deterministic order (folders and files sorted by name, then label value); absolute paths.

    Raises:
        ValueError: ``root`` matches no layout, or a dataset.json is unreadable (the message names the file);
            any discovery problem when ``strict``.
    """
    records, problems = discover_with_problems(root, split=split, scan_labels=scan_labels, workers=workers)
    if problems and strict:
        raise ValueError("; ".join(f"{path}: {problem}" for path, problem in problems))
    for path, problem in problems:
        warnings.warn(f"{path}: {problem}", stacklevel=2)
    return records


def write_manifest(path: PathLike, records: Sequence[Record], *, relative: bool = True) -> None:
    """Writes records as ``{"format", "version", "records": [...]}`` JSON.

    Args:
        path: the manifest file (parent folders are created).
        records: what to write.
        relative: store image/label paths relative to the manifest's folder (default; the dataset can then be
            moved together with its manifest) instead of absolute.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent

    def _p(p):
        return paths.relative(p, base) if relative else paths.absolute(p)

    rows = [dict(dataclasses.asdict(r), image=_p(r.image), label=_p(r.label)) for r in records]
    body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "records": rows}
    path.write_text(json.dumps(body, indent=1) + "\n")


def read_manifest(path: PathLike) -> list[Record]:
    """Reads a manifest written by ``write_manifest``; relative paths are resolved against its folder.

    Raises:
        ValueError: unreadable JSON, wrong format or version, or a malformed record (named by index).
    """
    path = epath.Path(path)
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read manifest ({err})") from err
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} file")
    if body.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {body.get('version')!r}, this code reads {MANIFEST_VERSION}")
    fields = {f.name: f.type for f in dataclasses.fields(Record)}
    base = path.parent
    records = []
    for i, row in enumerate(body.get("records", [])):
        if not isinstance(row, dict) or set(row) != set(fields):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}: record {i} must have exactly the fields {sorted(fields)}, got {got}")
        for name, kind in fields.items():
            if not isinstance(row[name], kind) or isinstance(row[name], bool):
                raise ValueError(f"{path}: record {i} field {name!r} must be {kind.__name__}, got {row[name]!r}")
        image, label = (paths.join(base, row[k]) for k in ("image", "label"))
        records.append(Record(**dict(row, image=image, label=label)))
    return records


def load_records(dataset: PathLike, keep: Callable[[str, str, str], bool] | None = None,
                 **discover_kwargs) -> tuple[list[Record], list[tuple[str, str]]]:
    """A dataset folder (discovered) or a manifest ``.json`` file (read) -> (records, discovery problems).

    ``keep(dataset, case, image_path)``, if given, selects cases (before label maps are read, when discovering).
    """
    if str(dataset).endswith(".json") and epath.Path(dataset).is_file():
        records = read_manifest(dataset)
        return [r for r in records if keep is None or keep(r.dataset, r.case, r.image)], []
    return discover_with_problems(dataset, keep=keep, **discover_kwargs)
