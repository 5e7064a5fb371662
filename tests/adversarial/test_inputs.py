"""Adversarial replay of ordinary mistakes against predict, export, convert and eval, each as a real process: the
command is refused with exit status != 0 and one line naming the file or flag, prints no traceback, leaves no
output behind and leaves its inputs unchanged. Where an error message gives a hint, following it must work.

Small inputs only: every refusal happens before a model is compiled.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from cli_assert import REPO, assert_refused, raw_label, run_cli, snapshot

FIXTURE = REPO / "tests" / "fixtures" / "upstream_tiny"
PTH, CONFIG = FIXTURE / "checkpoint.pth", FIXTURE / "config.json"


def _nifti(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    return path


@pytest.fixture
def scan(tmp_path):
    return _nifti(tmp_path / "scan.nii.gz", np.ones((20, 20, 20), np.float32))


def _predict(*args):
    return run_cli(["-m", "sammed3d_jax.predict", "--checkpoint", PTH, *map(str, args)])


def test_predict_never_overwrites_its_input(scan, tmp_path):
    before = snapshot([scan])
    for extra in ([], ["--overwrite"]):
        proc = _predict("--image", scan, "--points", "5,5,5:+", "--out", scan, *extra)
        assert_refused(proc, mentions=["--out", str(scan), "is an input"], unchanged=before)


def test_predict_refuses_an_existing_output_and_bad_flags(scan, tmp_path):
    old = tmp_path / "old.nii.gz"
    old.write_bytes(b"an earlier mask")
    before = snapshot([scan, old])
    proc = _predict("--image", scan, "--points", "5,5,5:+", "--out", old)
    assert_refused(proc, mentions=["--out", "already exists; pass --overwrite"], unchanged=before)
    new = tmp_path / "new.nii.gz"
    for args, mentions in [
        (["--max-windows", "0"], ["--max-windows must be at least 1, got 0"]),
        (["--points", "5,5:+"], ["--points", "'i,j,k'", "separated by ';'"]),
        (["--image", tmp_path / "missing.nii.gz"], ["--image", "missing.nii.gz: does not exist"]),
    ]:
        base = {"--image": str(scan), "--points": "5,5,5:+", "--out": str(new)}
        base.update(dict(zip(map(str, args[::2]), map(str, args[1::2]))))
        proc = _predict(*[x for kv in base.items() for x in kv])
        assert_refused(proc, mentions=mentions, unchanged=before, absent=[new])
    (tmp_path / "a_file").write_text("x")
    proc = _predict("--image", scan, "--points", "5,5,5:+", "--out", tmp_path / "a_file" / "mask.nii.gz")
    assert_refused(proc, mentions=["--out", "is not a folder"], unchanged=before)


def test_export_refuses_to_overwrite(tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    params = tmp_path / "params"
    params.mkdir()
    before = snapshot([out, params])
    assert_refused(run_cli(["-m", "sammed3d_jax.export", params, out]), mentions=["OUT", str(out), "--overwrite"],
                   unchanged=before)
    assert_refused(run_cli(["-m", "sammed3d_jax.export", tmp_path / "nope", tmp_path / "x.safetensors"]),
                   mentions=["CKPT_DIR", "does not exist"], absent=[tmp_path / "x.safetensors"])


def test_convert_checks_its_output_and_config_first(tmp_path):
    before = snapshot([PTH, CONFIG])
    (tmp_path / "a_file").write_text("x")
    proc = run_cli(["-m", "sammed3d_jax.convert", PTH, tmp_path / "a_file", "--config", CONFIG])
    assert_refused(proc, mentions=["OUT_DIR", "is a file; expected a folder"], unchanged=before)
    bad = tmp_path / "bad.json"
    bad.write_text('{"image_size": 64,')
    proc = run_cli(["-m", "sammed3d_jax.convert", PTH, tmp_path / "out", "--config", bad])
    assert_refused(proc, mentions=["--config", str(bad), "not a valid model config JSON"], unchanged=before,
                   absent=[tmp_path / "out"])
    # The default architecture (vit_b_ori) does not fit the tiny fixture: a short line that names --config.
    proc = run_cli(["-m", "sammed3d_jax.convert", PTH, tmp_path / "out"])
    line = assert_refused(proc, mentions=[str(PTH), "--config", "... and"], unchanged=before,
                          absent=[tmp_path / "out"])
    assert len(line) < 1500


def _eval(*args, cwd):
    return run_cli([REPO / "eval.py", *map(str, args)], cwd=cwd)


def test_eval_flag_mistakes_are_one_line(tmp_path):
    proc = _eval("--config.clickmode=ritm", cwd=tmp_path)
    assert_refused(proc, mentions=["--config.clickmode", "did you mean click_mode?", "keys: click_counts"])
    json_config = tmp_path / "c.json"
    json_config.write_text('{"click_mode": "ritm", "save_masks": true}')
    proc = _eval(f"--config={json_config}", cwd=tmp_path)
    assert_refused(proc, mentions=["--config", str(json_config), "not a Python config file"])
    proc = _eval("--checkpoint", PTH, "--data", tmp_path / "nowhere", cwd=tmp_path)
    assert_refused(proc, mentions=["--data", "nowhere: does not exist"], absent=[tmp_path / "eval"])
    (tmp_path / "a_file").write_text("x")
    proc = _eval("--checkpoint", PTH, "--data", tmp_path, "--out", tmp_path / "a_file", cwd=tmp_path)
    assert_refused(proc, mentions=["--out", "is a file; expected a folder"])


def test_eval_of_an_upstream_file_names_the_working_flag_and_reports_skipped_labels(tmp_path):
    # A dataset whose every label is unusable: following the hint loads the checkpoint, and nothing being scored
    # ends the run with status 1, the reasons printed and in summary.json.
    root = tmp_path / "Dataset009_Bad"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                   "file_ending": ".nii.gz"}))
    for case in ("empty", "fractional"):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.ones((20, 20, 20), np.float32))
    _nifti(root / "labelsTr" / "empty.nii.gz", np.zeros((20, 20, 20), np.uint8))
    _nifti(root / "labelsTr" / "fractional.nii.gz", np.full((20, 20, 20), 0.5, np.float32))
    # Hostile labels are per-file problems too: a 70-byte header claiming 1100^3 voxels, a NaN affine axis, a
    # truncated file. Each is skipped with its reason; none aborts the run or allocates what the header claims.
    for case in ("bomb", "nan_affine", "truncated"):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.ones((20, 20, 20), np.float32))
    raw_label(root / "labelsTr" / "bomb.nii.gz", (1100, 1100, 1100), np.eye(4))
    nan_affine = np.eye(4)
    nan_affine[1, 1] = np.nan
    raw_label(root / "labelsTr" / "nan_affine.nii.gz", (20, 20, 20), nan_affine, bytes(20 ** 3))
    whole = _nifti(tmp_path / "whole.nii.gz", np.ones((20, 20, 20), np.uint8)).read_bytes()
    (root / "labelsTr" / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    before = snapshot([root, PTH])
    out = tmp_path / "report"
    line = assert_refused(_eval("--checkpoint", PTH, "--data", root, "--out", out, cwd=tmp_path),
                          mentions=[str(PTH), "--config.model_config"], unchanged=before, absent=[out])
    assert "--config " not in line  # the eval flag, not convert's
    proc = _eval("--checkpoint", PTH, f"--config.model_config={CONFIG}", "--data", root, "--out", out, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: no target was scored (0 failed, 5 skipped" in proc.stderr
    skipped = {line.split(":")[0].split("/")[-1]: line for line in proc.stdout.splitlines() if "SKIPPED" in line}
    assert sorted(skipped) == ["bomb.nii.gz", "empty.nii.gz", "fractional.nii.gz", "nan_affine.nii.gz",
                               "truncated.nii.gz"], proc.stdout
    assert "empty label map: no target voxel" in skipped["empty.nii.gz"]
    assert "the header claims shape (1100, 1100, 1100)" in skipped["bomb.nii.gz"]
    assert "geometry" in skipped["nan_affine.nii.gz"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["skipped"] == 5 and summary["checkpoint"]["kind"] == "file"
    assert snapshot([root, PTH]) == before
