"""Dataset validation: ``python -m sammed3d_jax.data.check DATASET`` and ``validate_record`` for the pipeline.

Owns the list of problems a case can have and their wording: missing files or pairs, unreadable/truncated
files, 4-D images, NaN/inf voxels, non-integer label values, image/label shape or affine mismatch, empty
targets (plus what discovery finds: images without labels, undeclared label values). The CLI prints one
table and exits 1 when it found any problem, 0 on a clean dataset, 2 when DATASET itself is unusable, so it
can gate scripts. The training pipeline calls ``validate_record`` to skip a bad case with the same message.

Must not import: jax, flax, model/, training/.
"""

import argparse
import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np
from etils import epath
from tqdm import tqdm

from sammed3d_jax import cli
from sammed3d_jax.data import paths
from sammed3d_jax.data.manifest import Record, load_records
from sammed3d_jax.data.nifti import DataFileError, Geometry, nonfinite_message, read_geometry, read_image, read_label

# Image and label grids must agree to this much: direction/spacing entries (mm per voxel) and origin (mm).
# Loose enough for float32 header rounding by different writers, far below any real misregistration.
LINEAR_TOL = 1e-4
ORIGIN_TOL_MM = 1e-3


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a dataset: the file it concerns and what is wrong, in words."""

    file: str
    problem: str


def _header_geometry(path: str):
    # The voxel data could not be read; the header may still be, so geometry mismatches are reported as well.
    try:
        return read_geometry(path)
    except DataFileError:
        return None


def _validate_pair(image_path: str, label_path: str, targets: Sequence[Record]) -> list[Problem]:
    problems = []
    label = image_geom = label_geom = None
    for path, what in ((image_path, "image"), (label_path, "label")):
        if not epath.Path(path).exists():
            other = label_path if what == "image" else image_path
            problems.append(Problem(path, f"{what} file not found (missing pair of {epath.Path(other).name})"))
    if epath.Path(image_path).exists():
        try:
            image, image_geom = read_image(image_path, allow_nonfinite=True)
            message = nonfinite_message(image)
            if message:
                problems.append(Problem(image_path, message))
            del image
        except DataFileError as err:
            problems.append(Problem(image_path, err.problem))
            image_geom = _header_geometry(image_path)
    if epath.Path(label_path).exists():
        try:
            label, label_geom = read_label(label_path)
        except DataFileError as err:
            problems.append(Problem(label_path, err.problem))
            label_geom = _header_geometry(label_path)
    if image_geom is not None and label_geom is not None:
        problems += _geometry_problems(image_geom, label_geom, label_path)
    if label is not None:
        counts = None
        for record in targets:
            if not np.any(label == record.label_value):
                if counts is None:
                    counts = np.unique(label).tolist()
                problems.append(
                    Problem(
                        label_path,
                        f"empty target {record.target!r}: no voxel == {record.label_value} (values present: {counts})",
                    )
                )
    return problems


def _geometry_problems(image_geom: Geometry, label_geom: Geometry, label_path: str) -> list[Problem]:
    if image_geom.shape != label_geom.shape:
        return [Problem(label_path, f"shape {label_geom.shape} differs from the image's {image_geom.shape}")]
    diff = np.abs(image_geom.affine - label_geom.affine)
    if diff[:3, :3].max() > LINEAR_TOL or diff[:3, 3].max() > ORIGIN_TOL_MM:
        return [Problem(label_path, f"affine differs from the image's (max difference {diff.max():.3g}; image "
                                    f"{''.join(image_geom.orientation)} {image_geom.spacing_mm}, label "
                                    f"{''.join(label_geom.orientation)} {label_geom.spacing_mm})")]
    return []


def validate_records(records: Sequence[Record], *, workers: int = 1, progress: bool = False) -> list[Problem]:
    """Validates records, reading each (image, label) pair once however many targets share it.

    Args:
        records: what to check.
        workers: threads reading files (decompression and numpy release the GIL).
        progress: show a progress bar on stderr.

    Returns:
        Problems sorted by file, then message; empty when every record is usable.
    """
    pairs: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        pairs.setdefault((record.image, record.label), []).append(record)
    problems: list[Problem] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = [pool.submit(_validate_pair, image, label, targets) for (image, label), targets in pairs.items()]
        done = concurrent.futures.as_completed(jobs)
        # disable=None: tqdm shows the bar only when stderr is a terminal (so logs and pipes stay clean).
        for job in tqdm(done, total=len(jobs), disable=None if progress else True, unit="case", file=sys.stderr):
            problems += job.result()
    return sorted(set(problems))


def validate_record(record: Record) -> list[Problem]:
    """All problems of one record (empty list: safe to train on). Used by the training pipeline to skip cases."""
    return validate_records([record])


def format_table(problems: Sequence[Problem], root: str | None = None) -> str:
    """Problems as a two-column text table; files under ``root`` are shown relative to it."""

    def _short(path):
        if root:
            shown = paths.relative(path, root)
            if not shown.startswith("../"):
                return shown
        return path

    rows = [(_short(p.file), p.problem) for p in problems]
    width = max([len("file")] + [len(f) for f, _ in rows])
    lines = [f"{'file':<{width}}  problem", f"{'-' * width}  {'-' * 7}"]
    lines += [f"{f:<{width}}  {msg}" for f, msg in rows]
    return "\n".join(lines)


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 clean, 1 problems found, 2 DATASET unusable)."""
    parser = argparse.ArgumentParser(
        prog="python -m sammed3d_jax.data.check",
        description="Validate every case of a dataset folder (upstream or nnU-Net/MSD layout) or a manifest .json.",
    )
    parser.add_argument("dataset", help="dataset folder or manifest .json")
    parser.add_argument("--split", default="Tr", help="labels<split>/images<split> to check (default Tr)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        records, found = load_records(args.dataset, split=args.split, workers=args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = [Problem(f, p) for f, p in found]
    problems = sorted(set(problems + validate_records(records, workers=args.workers, progress=not args.no_progress)))
    dataset = epath.Path(args.dataset)
    root = os.fspath(dataset if dataset.is_dir() else dataset.parent)
    n_cases = len({(r.image, r.label) for r in records})
    summary = f"{args.dataset}: {n_cases} cases, {len(records)} targets"
    if not problems:
        print(f"{summary}: no problems")
        return 0
    print(format_table(problems, root))
    bad_files = len({p.file for p in problems})
    print(f"{summary}: {len(problems)} problems in {bad_files} files")
    return 1


if __name__ == "__main__":
    sys.exit(main())
