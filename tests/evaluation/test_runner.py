"""Dataset runner: hand-made cases with a stand-in model whose predictions are known boxes, so every Dice in the CSV,
the per-target and overall aggregates, the failure bookkeeping, the masks and the plot can be checked exactly."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from eval_standins import bright_image, box, geometry, threshold_segmenter, write_dataset_json, write_nnunet_case

from sammed3d_jax.data.manifest import Record, discover
from sammed3d_jax.data.nifti import read_label
from sammed3d_jax.evaluation import metrics, runner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE_A, SHAPE_B = (80, 36, 30), (40, 36, 30)
L1_A, P1_A = box(SHAPE_A, (5, 10, 8), (15, 20, 18)), box(SHAPE_A, (7, 10, 8), (17, 20, 18))  # Dice 0.8
L2_A = box(SHAPE_A, (55, 8, 6), (70, 24, 20))  # predicted exactly: Dice 1; far from target 1 (crops disjoint)
L1_B, P1_B = box(SHAPE_B, (10, 10, 10), (20, 20, 20)), box(SHAPE_B, (10, 10, 10), (20, 20, 15))  # Dice 2/3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "Dataset001_Hand"
    write_dataset_json(root, {"organ": 1, "lesion": 2})
    geom_a, geom_b = geometry(SHAPE_A, kind="lps"), geometry(SHAPE_B, kind="ras")
    write_nnunet_case(root, "A", bright_image(P1_A | L2_A), L1_A + 2 * L2_A, geom_a)
    write_nnunet_case(root, "B", bright_image(P1_B), L1_B.astype(np.uint8), geom_b)
    write_nnunet_case(root, "C", bright_image(P1_B), L1_B.astype(np.uint8), geom_b)
    (root / "imagesTr" / "C_0000.nii.gz").write_bytes(b"\x1f\x8b not really a gzip file")
    shifted = geometry(SHAPE_B, kind="ras", origin=(-15.0, 12.0, 5.0))
    write_nnunet_case(root, "D", bright_image(P1_B), L1_B.astype(np.uint8), geom_b, label_geom=shifted)
    records = discover(root)
    b = next(r for r in records if r.case == "B")
    # A record naming a label value the case does not hold (as a stale manifest could): an empty target.
    records.append(Record("B", b.image, b.label, 2, "lesion", b.dataset, b.modality))
    return root, records, {"A": geom_a, "B": geom_b}


@pytest.fixture(scope="module")
def evaluated(dataset, tmp_path_factory):
    root, records, _ = dataset
    out = tmp_path_factory.mktemp("out")
    options = runner.EvalOptions(click_counts=(1, 2, 4), save_masks=True)
    summary = runner.evaluate_records(threshold_segmenter(max_clicks=4), records, options, str(out),
                                      problems=[("x.nii.gz", "image without a label")], info={"note": "test"})
    return out, summary


def test_rows_hold_hand_computed_scores(evaluated, dataset):
    out, summary = evaluated
    _, _, geoms = dataset
    with open(out / "per_target.csv") as f:
        rows = {(r["case"], r["target"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("A", "organ"), ("A", "lesion"), ("B", "organ"), ("B", "lesion"), ("C", "organ"),
                         ("D", "organ")}
    expected = {("A", "organ"): (P1_A, L1_A, geoms["A"]), ("A", "lesion"): (L2_A, L2_A, geoms["A"]),
                ("B", "organ"): (P1_B, L1_B, geoms["B"])}
    hand_dice = {("A", "organ"): 0.8, ("A", "lesion"): 1.0, ("B", "organ"): 2 / 3}
    for key, (pred, gt, geom) in expected.items():
        row = rows[key]
        assert row["status"] == "ok" and int(row["gt_voxels"]) == gt.sum() and int(row["n_clicks"]) == 4
        nsd = metrics.normalized_surface_dice(pred, gt, geom.spacing_mm)
        for c in (1, 2, 4):  # the stand-in ignores clicks: the same score after every count
            assert float(row[f"dice_{c}"]) == pytest.approx(hand_dice[key], abs=1e-5)
            assert float(row[f"nsd_{c}"]) == pytest.approx(nsd, abs=1e-5)
        assert float(row["dice_auc"]) == pytest.approx(hand_dice[key], abs=1e-5)
        assert float(row["click_s"]) > 0 and float(row["case_s"]) >= float(row["target_s"]) > 0
    assert nsd < 1.0  # B's prediction misses a slab: the surface score is not trivially 1


def test_summary_aggregates_and_failures(evaluated):
    out, summary = evaluated
    on_disk = json.loads((out / "summary.json").read_text())  # strict JSON: NaN would not parse as null
    assert on_disk["counts"] == summary["counts"] == {"cases": 4, "targets": 6, "scored": 3, "failed": 3,
                                                     "skipped": 1}
    organ = on_disk["per_target"]["Dataset001_Hand/organ"]["dice_1"]
    assert organ["mean"] == pytest.approx((0.8 + 2 / 3) / 2, abs=1e-6)
    assert organ["std"] == pytest.approx(np.std([0.8, 2 / 3]), abs=1e-6) and organ["n"] == 2
    lesion = on_disk["per_target"]["Dataset001_Hand/lesion"]["dice_4"]
    assert lesion["mean"] == pytest.approx(1.0) and lesion["n"] == 1
    overall = on_disk["overall"]["dice_2"]
    assert overall["mean"] == pytest.approx(np.mean([0.8, 2 / 3, 1.0]), abs=1e-6) and overall["n"] == 3
    errors = {(f["case"], f["target"]): f["error"] for f in on_disk["failed"]}
    assert "C_0000.nii.gz" in errors[("C", "organ")] and "not a readable NIfTI" in errors[("C", "organ")]
    assert "D.nii.gz" in errors[("D", "organ")] and "not on the same grid" in errors[("D", "organ")]
    assert "empty ground-truth target 'lesion'" in errors[("B", "lesion")]
    assert on_disk["skipped"] == [{"file": "x.nii.gz", "problem": "image without a label"}]
    assert on_disk["timing"]["click_s"]["n"] == 3 and on_disk["timing"]["case_s"]["n"] == 4
    assert "NaN" in on_disk["nan_policy"] and on_disk["note"] == "test"
    assert (out / "dice_vs_clicks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = runner.report.format_table(on_disk)
    assert "| Dataset001_Hand/organ | 2 | 73.3 ± 6.7 |" in table and "FAILED Dataset001_Hand/D" in table
    assert "3 targets scored, 3 failed, 1 skipped, 4 cases" in table
    assert "SKIPPED x.nii.gz: image without a label" in table


def test_masks_are_label_maps_on_the_label_grid(evaluated, dataset):
    out, _ = evaluated
    root, _, geoms = dataset
    mask, geom = read_label(out / "masks" / "Dataset001_Hand" / "A.nii.gz")
    assert geom == geoms["A"]
    np.testing.assert_array_equal(mask, P1_A.astype(np.uint8) + 2 * L2_A)
    assert not (out / "masks" / "Dataset001_Hand" / "C.nii.gz").exists()


def test_roi_grid_scores_the_crop(dataset, tmp_path):
    _, records, _ = dataset
    options = runner.EvalOptions(click_counts=(1,), metric_grid="roi", click_mode="ritm")
    ok = [r for r in records if r.case in ("A", "B") and r.label_value == 1]
    summary = runner.evaluate_records(threshold_segmenter(max_clicks=1), ok, options, str(tmp_path))
    assert [r["error"] for r in summary["metric_per_target"]] == ["", ""]
    dice = {r["case"]: r["dice_1"] for r in summary["metric_per_target"]}
    # Both targets and predictions lie inside their crops and the grids are 1.5 mm: same Dice as on the image grid.
    assert dice == {"A": pytest.approx(0.8, abs=1e-6), "B": pytest.approx(2 / 3, abs=1e-6)}


def test_option_and_default_data_errors(tmp_path):
    with pytest.raises(ValueError, match="increasing positive"):
        runner.EvalOptions(click_counts=(3, 1))
    with pytest.raises(ValueError, match="metric_grid"):
        runner.EvalOptions(metric_grid="slice")
    with pytest.raises(ValueError, match="crop"):
        runner.EvalOptions(crop="centre")
    with pytest.raises(FileNotFoundError, match="no synthetic dataset"):
        runner.default_datasets(str(tmp_path))


def test_eval_cli_without_a_trained_checkpoint_says_to_train_first(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "model_config.json").write_text("{}")
    for ckpt in (tmp_path / "missing", workdir):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--checkpoint={ckpt}"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "python train.py" in proc.stderr and str(ckpt) in proc.stderr


def test_paper_crop_centred_on_the_first_click(dataset, tmp_path):
    _, records, _ = dataset
    options = runner.EvalOptions(click_counts=(1, 2), crop="first_click", click_mode="ritm_random")
    b = [r for r in records if r.case == "B" and r.label_value == 1]
    row = runner.evaluate_records(threshold_segmenter(max_clicks=2), b, options, str(tmp_path))["metric_per_target"][0]
    # The 32^3 window around any voxel of the 10^3 target holds the whole predicted box: the same Dice as before.
    assert row["error"] == "" and row["first_label"] == 1 and row["dice_2"] == pytest.approx(2 / 3, abs=1e-6)


def test_prepared_store_and_manifest_select_the_targets(dataset, tmp_path):
    from sammed3d_jax.data.manifest import write_manifest
    from sammed3d_jax.data.prepare import prepare_dataset

    root, records, _ = dataset
    a = [r for r in records if r.case == "A"]
    write_manifest(tmp_path / "a.json", a)
    prepare_dataset(tmp_path / "a.json", tmp_path / "prepared", workers=1, progress=False)
    for path in (tmp_path / "a.json", tmp_path / "prepared", tmp_path / "prepared" / "prepared.json"):
        found, problems = runner.load_dataset(str(path))
        assert sorted((r.case, r.target, r.image, r.label) for r in found) == sorted(
            (r.case, r.target, r.image, r.label) for r in a) and problems == []
    found, problems = runner.load_dataset(str(root))
    assert len(found) == 5 and problems == []


def test_label_side_problems_are_listed_with_reasons(tmp_path, capsys):
    # Labels that cannot give a target (truncated, fractional, background only) must not vanish from the report.
    root = tmp_path / "Dataset002_Labels"
    write_dataset_json(root, {"organ": 1})
    geom = geometry(SHAPE_B, kind="ras")
    for case in ("good", "truncated", "fractional", "background"):
        write_nnunet_case(root, case, bright_image(P1_B), L1_B.astype(np.uint8), geom)
    truncated = root / "labelsTr" / "truncated.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200])
    from sammed3d_jax.data.nifti import write_nifti

    write_nifti(root / "labelsTr" / "fractional.nii.gz", L1_B * 0.5, geom)
    write_nifti(root / "labelsTr" / "background.nii.gz", np.zeros(SHAPE_B, np.uint8), geom)
    records, problems = runner.load_dataset(str(root))
    assert [r.case for r in records] == ["good"]
    summary = runner.evaluate_records(threshold_segmenter(max_clicks=1), records, runner.EvalOptions(click_counts=(1,)),
                                      str(tmp_path / "out"), problems=problems)
    assert summary["counts"]["scored"] == 1 and summary["counts"]["skipped"] == 3
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    reasons = {os.path.basename(s["file"]): s["problem"] for s in on_disk["skipped"]}
    assert set(reasons) == {"truncated.nii.gz", "fractional.nii.gz", "background.nii.gz"}
    assert "not a readable NIfTI" in reasons["truncated.nii.gz"] or "truncated" in reasons["truncated.nii.gz"]
    assert "whole numbers" in reasons["fractional.nii.gz"] or "integer" in reasons["fractional.nii.gz"]
    assert reasons["background.nii.gz"] == "empty label map: no target voxel (values present: [0])"
    table = runner.report.format_table(on_disk)
    assert "1 targets scored, 0 failed, 3 skipped" in table
    assert all(f"SKIPPED {s['file']}: {s['problem']}" in table for s in on_disk["skipped"])
    # Nothing left to score: no model is needed to say so, and the report still lists every reason.
    empty = runner.evaluate_records(None, [], runner.EvalOptions(click_counts=(1,)), str(tmp_path / "none"),
                                    problems=problems)
    assert empty["counts"] == {"cases": 0, "targets": 0, "scored": 0, "failed": 0, "skipped": 3}
    assert (tmp_path / "none" / "dice_vs_clicks.png").exists()
