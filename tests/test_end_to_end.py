"""End to end on CPU, tiny: train a few steps on a generated synthetic dataset, evaluate the training workdir on that
dataset with simulated clicks, and predict a mask for one of its scans from the command line."""

import json

import numpy as np
import pytest
from config_files import load_config

from sammed3d_jax import predict
from sammed3d_jax.data.nifti import read_image, read_label
from sammed3d_jax.evaluation import inference, metrics, runner
from sammed3d_jax.evaluation.checkpoints import load_checkpoint
from sammed3d_jax.evaluation.config import get_config as eval_config


def _training_config():
    # The default CPU recipe (configs/default.py), shrunk to the tiny model and two steps.
    c = load_config("default", "steps=2,cases=2")
    c.model.variant = "tiny"
    c.batch_size = 8  # one sample per fake CPU device (tests run with 8)
    c.data.min_crop_foreground = 100  # tiny 32^3 crops hold fewer target voxels than 128^3 ones
    c.optim.warmup_steps = 1
    c.clicks.max_clicks = 2
    c.clicks.min_clicks = 1
    c.clicks.random_insert = ()
    c.checkpoint.every_steps = 2  # one save (the last step): each Orbax save costs seconds on 8 fake devices
    c.checkpoint.async_save = False
    c.log_every_steps = 1
    c.plot_every_steps = 1000
    c.progress = False
    c.export_params = False  # evaluation and prediction read the Orbax checkpoint of the workdir
    return c


@pytest.mark.slow
def test_train_evaluate_predict(tmp_path, capsys):
    from sammed3d_jax.training.loop import train_and_evaluate

    workdir = tmp_path / "run"
    state = train_and_evaluate(_training_config(), str(workdir))
    assert int(state.step) == 2

    config = eval_config()
    config.click_counts = (1, 8)  # 8: the click buffer predict builds below, so its compilation is reused
    config.max_cases = 1
    config.mni152 = False
    config.progress = False
    config.save_masks = True
    summary = runner.evaluate(config, str(workdir), None, str(tmp_path / "eval"))
    assert summary["checkpoint"]["kind"] == "workdir" and summary["checkpoint"]["step"] == 2
    assert summary["counts"] == {"cases": 1, "targets": 3, "scored": 3, "failed": 0, "skipped": 0}
    on_disk = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert on_disk["overall"]["dice_8"]["n"] == 3 and sorted(on_disk["per_target"]) == [
        "synthetic/blob", "synthetic/ellipsoid", "synthetic/tube"]
    # The saved label map is the prediction after 8 clicks on the label's own grid; the last target written (blob,
    # value 3) is never overwritten, so its Dice recomputed from the file must be the reported one, exactly.
    label, label_geom = read_label(workdir / "data" / "synthetic" / "labelsTr" / "synth_000.nii.gz")
    saved, saved_geom = read_label(tmp_path / "eval" / "masks" / "synthetic" / "synth_000.nii.gz")
    assert saved_geom == label_geom and set(np.unique(saved)) <= {0, 1, 2, 3}
    blob = next(r for r in on_disk["metric_per_target"] if r["target"] == "blob")
    assert metrics.dice(saved == 3, label == 3) == pytest.approx(blob["dice_8"], abs=1e-12)
    assert (tmp_path / "eval" / "dice_vs_clicks.png").read_bytes()[:4] == b"\x89PNG"

    image = workdir / "data" / "synthetic" / "imagesTr" / "synth_000_0000.nii.gz"
    inside = np.argwhere(label == 1)[len(np.argwhere(label == 1)) // 2]
    out = tmp_path / "mask.nii.gz"
    code = predict.main(["--checkpoint", str(workdir), "--image", str(image),
                         "--points", "{},{},{}:+".format(*inside), "--out", str(out), "--max-windows", "4"])
    assert code == 0, capsys.readouterr().err
    # The file holds what the library computes for the same checkpoint and click, on the scan's own grid.
    mask, mask_geom = read_label(out)
    scan, scan_geom = read_image(image)
    assert mask_geom == scan_geom and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    loaded = load_checkpoint(workdir)
    segmenter = inference.Segmenter.from_model(loaded.variables, loaded.cfg, max_clicks=8)
    expected = predict.predict_mask(segmenter, scan, scan_geom, inside[None].astype(float), np.array([True]),
                                    max_windows=4)
    np.testing.assert_array_equal(mask, expected.mask.astype(np.uint8))
