"""The six-step loop: with a stand-in model (exact clicks, scores, the no-box and failed-step rules), and end to end
with a tiny checkpoint on cases made from the synthetic dataset, where a test re-derives every click and score of the
written files from ``all_segs`` alone."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import standins

from sammed3d_jax.checkpoint.params_io import save_params
from sammed3d_jax.cvpr25 import clicks, metrics, report
from sammed3d_jax.cvpr25.__main__ import main
from sammed3d_jax.cvpr25.adapter import ChallengePredictor
from sammed3d_jax.cvpr25.cases import Box, Case, case_arrays, read_case
from sammed3d_jax.cvpr25.evaluate import evaluate_case
from sammed3d_jax.cvpr25.make_cases import make_cases
from sammed3d_jax.cvpr25.safe_npz import read_npz
from sammed3d_jax.data.synthetic import make_synthetic_dataset
from sammed3d_jax.model import ModelConfig, init_variables

REPO = pathlib.Path(__file__).resolve().parents[2]


def _case(with_boxes=True, labels=(1, 2)):
    shape = (16, 30, 28)
    gts = np.zeros(shape, np.uint8)
    gts[4:12, 6:16, 5:15] = labels[0]      # a 8 x 10 x 10 block: bigger than the stand-in's ball
    gts[6:10, 20:26, 18:24] = labels[1]
    imgs = np.random.default_rng(1).uniform(1, 255, shape).astype(np.float32)
    boxes = (Box(4, 11, 8, 5, 6, 14, 15), Box(6, 9, 8, 18, 20, 23, 25)) if with_boxes else None
    return Case("toy.npz", imgs, (1.5, 1.5, 1.5), gts, boxes)


def _rederive(all_segs, gts, result_clicks, result_order, num_class):
    """Clicks of steps 2-6 recomputed from the previous step's prediction by the official rule."""
    fg = [[] for _ in range(num_class)]
    bg = [[] for _ in range(num_class)]
    for step in range(1, 6):
        for k, click in enumerate(clicks.next_clicks(all_segs[step - 1], gts, range(1, num_class + 1))):
            assert result_order[k][step - 1] == (None if click is None else click.kind)
            if click is not None:
                (fg if click.kind == "fg" else bg)[k].append(list(click.coord))
    assert [d["fg"] for d in result_clicks] == fg and [d["bg"] for d in result_clicks] == bg


def test_loop_with_a_stand_in_model():
    case = _case()
    result = evaluate_case(standins.predictor(box=False), case)
    assert result.all_segs.shape == (6, *case.imgs.shape) and result.all_segs.dtype == np.uint8
    _rederive(result.all_segs, case.gts, result.clicks, result.clicks_order, 2)
    assert result.clicks_order[0][0] == "fg"  # the first ball cannot fill the block
    for s in range(6):
        dsc, nsd = metrics.step_scores(case.gts, result.all_segs[s], case.spacing)
        assert result.row[f"DSC_{s + 1}"] == dsc and result.row[f"NSD_{s + 1}"] == nsd
    assert result.row["DSC_2"] > result.row["DSC_1"] > 0  # each fg click adds a ball
    assert result.row["num_class"] == 2 and result.row["runtime_upperbound"] == 180
    assert result.notes == []


def test_case_without_boxes_scores_zero_at_step_one():
    case = _case(with_boxes=False, labels=(2, 5))  # ids 2 and 5 are scored as classes 1 and 2
    result = evaluate_case(standins.predictor(box=False), case)
    assert not result.all_segs[0].any()
    assert result.row["DSC_1"] == result.row["NSD_1"] == result.row["RunningTime_1"] == 0.0
    assert result.row["DSC_2"] > 0 and result.notes[0] == "ground-truth ids [2, 5] scored as classes 1..2"
    assert "no boxes: step 1 scores 0" in result.notes
    renumbered = np.where(case.gts == 2, 1, np.where(case.gts == 5, 2, 0))
    _rederive(result.all_segs, renumbered, result.clicks, result.clicks_order, 2)


class _FailsAtStep3:
    def __init__(self):
        self.inner, self.calls = standins.predictor(box=False), 0

    def predict_with_report(self, *args):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("device lost")
        return self.inner.predict_with_report(*args)


def test_a_failed_step_scores_as_empty_and_the_loop_goes_on():
    result = evaluate_case(_FailsAtStep3(), _case())
    assert not result.all_segs[2].any() and result.row["DSC_3"] == 0.0 and result.all_segs[3].any()
    assert result.notes == ["step 3: prediction failed (RuntimeError: device lost); scored as empty"]
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate_case(_FailsAtStep3(), Case("x.npz", np.zeros((4, 4, 4)), (1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="only background"):
        evaluate_case(_FailsAtStep3(), Case("x.npz", np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), np.zeros((4, 4, 4), int)))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvpr25")
    data = make_synthetic_dataset(root / "synth", cases=2, shape=(40, 40, 20))
    made, failures = make_cases(data, root / "cases")
    assert failures == [] and len(made) == 2
    cfg = ModelConfig.variant("tiny")
    save_params(root / "ckpt", init_variables(cfg, jax.random.key(0)), cfg)
    return root


@pytest.mark.slow
def test_evaluate_writes_the_official_files_and_they_are_reproducible(made, capsys):
    out = made / "eval"
    code = main(["evaluate", "--cases", str(made / "cases"), "--checkpoint", str(made / "ckpt"), "--out", str(out),
                 "--no-compilation-cache"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "model compiled in" in captured.out and "2 cases evaluated, 0 failed" in captured.out
    rows = report.read_metrics_csv(out / "metrics.csv")
    assert (out / "metrics.csv").read_text().splitlines()[0].split(",") == metrics.CSV_COLUMNS
    assert [r["CaseName"] for r in rows] == ["synth_000.npz", "synth_001.npz"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == {"evaluated": 2, "failed": 0} and summary["compile_s"] > 0
    assert summary["settings"]["box_prompt"] == "centre click" and summary["checkpoint"]["kind"] == "params"
    assert summary["metrics"]["DSC_Final"]["n"] == 2
    assert (out / "dsc_nsd_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        case = read_case(made / "cases" / row["CaseName"])
        saved = read_npz(out / row["CaseName"])
        assert set(saved) == {"segs", "all_segs", "clicks", "clicks_order"}
        all_segs = saved["all_segs"]
        assert all_segs.shape == (6, *case.imgs.shape) and all_segs.dtype == np.uint8
        assert np.array_equal(saved["segs"], all_segs[-1])
        _rederive(all_segs, case.gts, saved["clicks"], saved["clicks_order"], 3)
        dscs, nsds = zip(*(metrics.step_scores(case.gts, s, case.spacing) for s in all_segs))
        again = metrics.case_row(row["CaseName"], dscs, nsds, [row[f"RunningTime_{i}"] for i in range(1, 7)], 3)
        assert again == row  # every score, AUC and total time, bit for bit through the CSV
        assert all(row[f"RunningTime_{i}"] > 0 for i in range(1, 7)) and row["runtime_upperbound"] == 270
    # --resume keeps the cases done (row and file present) and evaluates the rest, with the same scores.
    (out / "synth_001.npz").unlink()
    code = main(["evaluate", "--cases", str(made / "cases"), "--checkpoint", str(made / "ckpt"), "--out", str(out),
                 "--no-compilation-cache", "--resume"])
    assert code == 0 and "resuming: 1 case(s) already evaluated" in capsys.readouterr().out
    again = report.read_metrics_csv(out / "metrics.csv")
    assert again[0] == rows[0] and (out / "synth_001.npz").exists()
    scores = [k for k in metrics.CSV_COLUMNS if k.startswith(("DSC", "NSD"))]
    assert [again[1][k] for k in scores] == [rows[1][k] for k in scores]


@pytest.mark.slow
def test_predict_cli_on_a_click_step_and_its_refusals(made, capsys, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = read_case(made / "cases" / "synth_000.npz")
    step = dataclasses.replace(case, gts=None, clicks=({"fg": [[5, 10, 10]], "bg": []}, {"fg": [], "bg": [[1, 1, 1]]},
                                                       {"fg": [], "bg": []}),
                               clicks_order=(["fg"], ["bg"], [None]), prev_pred=np.zeros(case.imgs.shape, np.uint8))
    np.savez_compressed(inputs / "synth_000.npz", **case_arrays(step))
    np.savez_compressed(inputs / "evil.npz", imgs=np.zeros((4, 4, 4)), spacing=[1, 1, 1],
                        boxes=np.array([{1, 2}], dtype=object))
    outputs = tmp_path / "outputs"
    args = ["predict", "--inputs", str(inputs), "--outputs", str(outputs), "--checkpoint", str(made / "ckpt"),
            "--no-compilation-cache"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed evil.npz: " in err and "holds a set" in err and "error: 1 of 2 case(s) failed" in err
    segs = read_npz(outputs / "synth_000.npz")["segs"]
    assert segs.dtype == np.uint8 and segs.shape == case.imgs.shape and set(np.unique(segs)) <= {0, 1, 2, 3}
    with pytest.raises(SystemExit) as exc:  # the previous step's outputs are kept unless --overwrite
        main(args)
    assert exc.value.code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    (inputs / "evil.npz").unlink()
    assert main(args + ["--overwrite"]) == 0
    assert np.array_equal(read_npz(outputs / "synth_000.npz")["segs"], segs)  # deterministic


@pytest.mark.slow
def test_predict_sh_is_the_container_entry(made, tmp_path):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    case = read_case(made / "cases" / "synth_001.npz")
    np.savez_compressed(inputs / case.name, **case_arrays(dataclasses.replace(case, gts=None)))
    np.savez_compressed(outputs / case.name, segs=np.zeros(case.imgs.shape, np.uint8))  # the previous step's
    env = {k: v for k, v in os.environ.items() if k != "SAMMED3D_TRACEBACK"}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", SAMMED3D_INPUTS=str(inputs),
               SAMMED3D_OUTPUTS=str(outputs), SAMMED3D_CHECKPOINT=str(made / "ckpt"),
               SAMMED3D_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["sh", str(REPO / "predict.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    expected = ChallengePredictor.from_model(init_variables(ModelConfig.variant("tiny"), jax.random.key(0)),
                                             ModelConfig.variant("tiny")).predict_case(case.imgs, case.spacing,
                                                                                       case.prompts())
    assert np.array_equal(read_npz(outputs / case.name)["segs"], expected)
    assert any((tmp_path / "cache").iterdir())
