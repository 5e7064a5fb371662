"""Adversarial replay of the data commands: bad arguments and hostile files, at small sizes.

Every refusal exits non-zero with one ``error:`` line naming the argument or file, prints no traceback, leaves no
output behind and leaves its inputs unchanged. Hostile files inside a dataset (a 70-byte header claiming 1100^3
voxels, a zero-length or NaN affine axis) are per-file problems: ``check`` and ``prepare`` name the file and carry
on with the other cases.
"""

import json

import numpy as np
import pytest
from cli_assert import assert_refused, raw_label, run_cli, snapshot

from sammed3d_jax.data import synthetic

SHAPE = ("24", "24", "12")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("adv") / "synth"
    synthetic.make_synthetic_dataset(root, 2, seed=3, shape=tuple(map(int, SHAPE)))
    return root


def _prepare(args, **kwargs):
    return run_cli(["-m", "sammed3d_jax.data.prepare", *map(str, args), "--no-progress"], **kwargs)


@pytest.mark.parametrize("flag, value, mentions", [
    ("--spacing", "nan", "--spacing"), ("--spacing", "inf", "--spacing"), ("--spacing", "1000", "--spacing"),
    ("--spacing", "0", "--spacing"), ("--workers", "0", "--workers"), ("--workers", "-3", "--workers"),
    ("--window", "5", "--window"), ("--min-target-mm3", "nan", "--min-target-mm3"),
    ("--shard-index", "3", "--shard-index"),
])
def test_prepare_refuses_bad_settings_up_front(dataset, tmp_path, flag, value, mentions):
    before = snapshot([dataset])
    out = tmp_path / "out"
    extra = ["--store", "windows"] if flag == "--window" else ["--num-shards", "2"] if flag == "--shard-index" else []
    proc = _prepare([dataset, out, flag, value, *extra])
    assert_refused(proc, mentions=[mentions], unchanged=before, absent=[out])


def test_prepare_refuses_unusable_output_paths(dataset, tmp_path):
    before = snapshot([dataset])
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_refused(_prepare([dataset, a_file]), mentions=["OUT", "is a file"], unchanged=snapshot([a_file]))
    assert_refused(_prepare([dataset, dataset]), mentions=["OUT", "input"], unchanged=before)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8")
    assert_refused(_prepare([dataset, other]), mentions=["OUT", "not a prepared store"], unchanged=snapshot([other]))
    under_a_file = a_file / "store"
    assert_refused(_prepare([dataset, under_a_file]), mentions=["OUT", "is not a folder"], absent=[under_a_file])
    missing = tmp_path / "nope"
    out = tmp_path / "out"
    assert_refused(_prepare([missing, out]), mentions=["nope", "does not exist"], absent=[out])
    assert snapshot([dataset]) == before


def test_prepare_refuses_a_settings_change_naming_it(dataset, tmp_path):
    out = tmp_path / "store"
    assert _prepare([dataset, out, "--min-target-mm3", "0", "--workers", "1"]).returncode == 0
    store_before = snapshot([out])
    proc = _prepare([dataset, out, "--spacing", "2", "--min-target-mm3", "0", "--workers", "1"])
    assert_refused(proc, mentions=["spacing_mm", "[1.5, 1.5, 1.5]", "[2.0, 2.0, 2.0]"], unchanged=store_before)


def test_hostile_files_are_per_file_problems_in_check_and_prepare(dataset, tmp_path):
    import shutil

    root = tmp_path / "hostile"
    shutil.copytree(dataset, root)
    labels = sorted((root / "labelsTr").iterdir())
    raw_label(labels[0], (1100, 1100, 1100), np.eye(4))  # ~70 bytes claiming 1.3 GB
    nan_affine = np.eye(4)
    nan_affine[1, 1] = np.nan
    bomb, nan = labels[0].name, labels[1].name
    before = snapshot([root])
    proc = run_cli(["-m", "sammed3d_jax.data.check", root, "--no-progress"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"labelsTr/{bomb}" in proc.stdout and "the header claims shape (1100, 1100, 1100)" in proc.stdout
    raw_label(labels[1], tuple(int(s) for s in SHAPE), nan_affine, np.zeros(24 * 24 * 12, np.uint8).tobytes())
    before = snapshot([root])
    proc = run_cli(["-m", "sammed3d_jax.data.check", root, "--no-progress"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"labelsTr/{nan}" in proc.stdout and "unusable geometry in the header" in proc.stdout
    out = tmp_path / "prepared"
    # Discovery reads every label map (nnU-Net layout): both files are named as skipped, nothing aborts.
    proc = _prepare([root, out, "--workers", "1"])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1 and "0 targets indexed, 2 skipped" in proc.stdout, proc.stdout
    index = json.loads((out / "prepared.json").read_text())
    reasons = " ".join(f"{s.get('file', s.get('label'))}: {s['reason']}" for s in index["skipped"])
    assert bomb in reasons and "header claims shape" in reasons and nan in reasons and "geometry" in reasons
    assert snapshot([root]) == before


@pytest.mark.parametrize("args, mentions", [
    (["--cases", "0"], ["--cases"]), (["--cases", "-2"], ["--cases"]), (["--shape", "4", "24", "12"], ["--shape"]),
])
def test_synthetic_refuses_bad_arguments(tmp_path, args, mentions):
    out = tmp_path / "new"
    proc = run_cli(["-m", "sammed3d_jax.data.synthetic", out, *args])
    assert_refused(proc, mentions=mentions, absent=[out])


def test_synthetic_refuses_an_existing_dataset(dataset):
    before = snapshot([dataset])
    proc = run_cli(["-m", "sammed3d_jax.data.synthetic", dataset, "--cases", "1", "--shape", *SHAPE])
    assert_refused(proc, mentions=["OUT", "already exists", "--overwrite"], unchanged=before)


def test_mni152_refuses_an_existing_folder(dataset):
    before = snapshot([dataset])
    proc = run_cli(["-m", "sammed3d_jax.data.mni152", dataset])
    assert_refused(proc, mentions=["OUT", "already exists"], unchanged=before)
