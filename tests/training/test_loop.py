"""train_and_evaluate in one process on a tiny prepared dataset: files written, resume == uninterrupted, the record
of the config, refused resumes, damaged checkpoints, divergence, unwritable folders, a gs:// workdir, validation."""

import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import testing as epath_testing

from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.training import preemption
from sammed3d_jax.training.loop import train_and_evaluate
from config_files import load_config
from train_helpers import FAST_COMPILE

# The default recipe (the demo) trains a box-capable model: 4 point embeddings.
TINY = ModelConfig.variant("tiny", dtype="float32", remat_encoder_blocks=False, num_point_embeddings=4)


def _tiny_config(prepared, **overrides):
    c = load_config("default")
    c.model.variant = "tiny"
    c.data.prepared_dir = prepared
    c.data.min_crop_foreground = 50
    c.batch_size = 2
    c.sharding.mesh = (("data", 2),)
    c.total_steps = 6
    c.clicks.max_clicks = c.clicks.min_clicks = 2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.checkpoint.keep = 2
    c.log_every_steps = 2
    c.plot_every_steps = 1000  # Only the final plot: each costs about a second.
    c.progress = False
    c.compiler_options = FAST_COMPILE
    for key, value in overrides.items():
        section, _, leaf = key.rpartition("__")
        (c[section] if section else c)[leaf] = value
    c.lock()
    return c


def _params(state):
    return jax.tree.leaves(jax.device_get(state.params))


def _digest(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, prepared):
    run = tmp_path_factory.mktemp("full")
    return run, train_and_evaluate(_tiny_config(prepared), str(run))


def test_run_writes_everything_and_resume_matches_uninterrupted(tmp_path, prepared, full_run, capsys):
    run, full = full_run
    assert sorted(os.listdir(run / "checkpoints"), key=int) == ["3", "6"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("loss", "dice_last", "grad_norm", "lr", "skipped", "samples_per_s", "samples_per_s_per_device",
                "data_wait_s", "compute_s", "step_s", "dice_per_click"):
        assert key in records[-1], key
    assert "stop" not in records[-1] and records[-1]["skipped"] == 0 and records[-1]["updates"] == 6
    assert records[-1]["samples_per_s"] == pytest.approx(2 / records[-1]["step_s"])
    assert records[-1]["data_wait_s"] + records[-1]["compute_s"] == pytest.approx(records[-1]["step_s"])
    assert (run / "curves.png").stat().st_size > 1000
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert json.loads((run / "model_config.json").read_text())["image_size"] == 32
    assert json.loads((run / "config.json").read_text())["optim"]["warmup_steps"] == 2
    assert (run / "params" / "sammed3d_jax.json").exists()
    position = json.loads((run / "checkpoints" / "6" / "data" / "metadata").read_text())
    assert position["next_batch"] == 6 and position["global_batch_size"] == 2 and "fingerprint" in position

    # Killed after step 4: the last checkpoint is step 3, so the resumed run replays step 4 onwards.
    part = tmp_path / "part"
    train_and_evaluate(_tiny_config(prepared, stop_after_steps=4), str(part))
    assert os.listdir(part / "checkpoints") == ["3"]
    config_digest = _digest(part / "config.json")
    with pytest.raises(FileExistsError, match="--resume"):
        train_and_evaluate(_tiny_config(prepared), str(part))
    capsys.readouterr()
    resumed = train_and_evaluate(_tiny_config(prepared, resume=True), str(part))
    assert int(resumed.step) == 6
    # The run ends with one summary: steps, final loss and Dice, where checkpoints and params went, what to type next.
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trained steps")]
    assert line.startswith("trained steps 4-6 of 6 in ") and "; loss " in line and "; dice_last " in line
    assert line.endswith(f"checkpoints in {part / 'checkpoints'}; params in {part / 'params'}; "
                         f"next: python eval.py --checkpoint {part}")
    for a, b in zip(_params(resumed), _params(full)):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # The killed run's record of step 4 was dropped on resume, then rewritten.
    (record,) = [json.loads(x) for x in (part / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and record["changes"] == {"stop_after_steps": [4, 0]} and record["topology"] == "1x8"
    assert len(list((part / "tensorboard").iterdir())) == 2  # One event file per invocation.

    # The recipe is protected: a changed lr is refused, then accepted and recorded with the flag; config.json stays.
    with pytest.raises(ValueError, match=r"would change its recipe \(optim.lr 0.0008 -> 0.0003\).*allow_recipe_change"):
        train_and_evaluate(_tiny_config(prepared, resume=True, optim__lr=3e-4), str(part))
    train_and_evaluate(_tiny_config(prepared, resume=True, optim__lr=3e-4), str(part), allow_recipe_change=True)
    last = json.loads((part / "resumes.jsonl").read_text().splitlines()[-1])
    assert last["changes"] == {"optim.lr": [0.0008, 0.0003]} and last["step"] == 6
    assert _digest(part / "config.json") == config_digest


def test_ctrl_c_saves_at_the_current_step_and_resumes(tmp_path, prepared, full_run):
    run, full = full_run
    workdir = tmp_path / "ctrl_c"

    def press_ctrl_c_after_step_2():
        deadline = time.time() + 600
        while time.time() < deadline:
            metrics = workdir / "metrics.jsonl"
            handler = signal.getsignal(signal.SIGINT)
            if (metrics.exists() and '"step": 2' in metrics.read_text()
                    and isinstance(getattr(handler, "__self__", None), preemption.StopSignals)):
                os.kill(os.getpid(), signal.SIGINT)  # Only while the loop's handler is installed.
                return
            time.sleep(0.01)

    threading.Thread(target=press_ctrl_c_after_step_2, daemon=True).start()
    with pytest.raises(preemption.Preempted) as stopped:
        train_and_evaluate(_tiny_config(prepared), str(workdir))
    message = str(stopped.value)
    assert stopped.value.exit_status == 130 and message.startswith("stopped by SIGINT at step ")
    step = int(message.split(" at step ")[1].split(";")[0])
    assert 2 < step < 6 and f"--workdir {workdir} --resume" in message
    assert sorted(os.listdir(workdir / "checkpoints"), key=int)[-1] == str(step)
    assert not (workdir / "params").exists()
    resumed = train_and_evaluate(_tiny_config(prepared, resume=True), str(workdir))
    for a, b in zip(_params(resumed), _params(full)):
        np.testing.assert_array_equal(a, b)


def test_finetune_start_from_exported_params(tmp_path, prepared, full_run):
    run, full = full_run
    # The exported params dir initialises a new run (lr is 0 during the first warm-up update, so after one step
    # the params are still exactly the loaded ones).
    loaded = orbax_io.load_init_variables(run / "params", TINY)
    for a, b in zip(jax.tree.leaves(loaded["params"]), _params(full)):
        np.testing.assert_array_equal(a, b)
    tuned = train_and_evaluate(_tiny_config(prepared, init_from=str(run / "params"), stop_after_steps=1),
                               str(tmp_path / "tuned"))
    for a, b in zip(_params(tuned), _params(full)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="architecture differs"):
        orbax_io.load_init_variables(run / "params", TINY.replace(encoder_depth=3, encoder_global_attn_indexes=(2,)))


def test_resume_skips_a_damaged_checkpoint_and_needs_one(tmp_path, prepared, full_run, caplog):
    run, full = full_run
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to resume from"):
        train_and_evaluate(_tiny_config(prepared, resume=True), str(tmp_path / "typo"))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # Checkpoint 6 silently damaged (NaN params, as flipped bytes in compressed data produce): resume falls back to 3.
    manager = orbax_io.make_manager(copy, save_every=3, keep=5, async_save=False)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), full)
    state, position = orbax_io.restore(manager, target, 6)
    shutil.rmtree(copy / "checkpoints" / "6")
    manager.reload()
    bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    orbax_io.save(manager, 6, bad, position, force=True)
    manager.wait_until_finished()
    manager.close()
    with caplog.at_level(logging.WARNING):
        resumed = train_and_evaluate(_tiny_config(prepared, resume=True, export_params=False), str(copy))
    assert "step 6: holds non-finite values" in caplog.text and "resuming from step 3" in caplog.text
    assert (copy / "checkpoints_damaged" / "6").is_dir()  # Kept for inspection; a new step 6 was saved.
    assert sorted(os.listdir(copy / "checkpoints"), key=int) == ["3", "6"]
    for a, b in zip(_params(resumed), _params(full)):
        np.testing.assert_array_equal(a, b)


def test_a_moved_run_and_its_moved_data_resume(tmp_path, prepared, full_run):
    # Case keys are dataset-relative: the run folder and its prepared store, both moved, continue the same stream.
    _, full = full_run
    first = tmp_path / "first"
    train_and_evaluate(_tiny_config(prepared, stop_after_steps=4), str(first))
    moved_data, moved_run = tmp_path / "elsewhere" / "prepared", tmp_path / "elsewhere" / "run"
    shutil.copytree(prepared, moved_data)
    shutil.move(first, moved_run)
    resumed = train_and_evaluate(_tiny_config(str(moved_data), resume=True), str(moved_run))
    for a, b in zip(_params(resumed), _params(full)):
        np.testing.assert_array_equal(a, b)
    (record,) = [json.loads(x) for x in (moved_run / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and "data.prepared_dir" in record["changes"]


def test_unwritable_checkpoint_folder_fails_at_once(tmp_path, prepared):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write to the checkpoint folder .*file/run/checkpoints"):
        train_and_evaluate(_tiny_config(prepared), str(blocker / "run"))


def test_failed_save_stops_and_exports_what_it_can(tmp_path, prepared, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(OSError, match=r"checkpoint 3 could not be written .*No space left.*params of step 3 "
                                      r"exported to .*run/params"):
        train_and_evaluate(_tiny_config(prepared), str(tmp_path / "run"))
    assert (tmp_path / "run" / "params" / "sammed3d_jax.json").exists()


def test_divergence_stops_without_saving_or_exporting(tmp_path, prepared):
    # An absurd lr makes the params huge after one update; the loss overflows and every later update is skipped.
    config = _tiny_config(prepared, optim__lr=1e36, optim__warmup_steps=0, optim__schedule="constant",
                          optim__max_consecutive_skips=2, checkpoint__every_steps=5)
    with pytest.raises(preemption.Diverged, match="non-finite"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "params").exists()
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_url_workdir_reaches_orbax_and_writers_unmangled(tmp_path, prepared, monkeypatch):
    bucket = tmp_path / "bucket"

    def local(path):
        text = os.fspath(path)
        return str(bucket / text[len("gs://"):]) if text.startswith("gs://") else text

    def mapped(fn, path, *args, **kwargs):
        args = [local(a) if isinstance(a, (str, os.PathLike)) and os.fspath(a).startswith("gs://") else a
                for a in args]
        return fn(local(path), *args, **kwargs)

    seen = []
    real_init = ocp.CheckpointManager.__init__

    def manager_init(self, directory, *args, **kwargs):
        seen.append(os.fspath(directory))  # What Orbax receives; then a local stand-in for the bucket.
        real_init(self, local(directory), *args, **kwargs)

    real_save = ocp.StandardCheckpointer.save

    def params_save(self, directory, *args, **kwargs):
        seen.append(os.fspath(directory))
        return real_save(self, local(directory), *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", manager_init)
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", params_save)
    names = ("open", "exists", "isdir", "listdir", "glob", "walk", "makedirs", "mkdir", "rmtree", "remove",
             "rename", "replace", "copy", "stat")
    with epath_testing.mock_epath(**{n: mapped for n in names}):
        train_and_evaluate(_tiny_config(prepared), "gs://bucket/runs/demo")
    assert seen == ["gs://bucket/runs/demo/checkpoints", "gs://bucket/runs/demo/params/params"]
    run = bucket / "bucket" / "runs" / "demo"
    for name in ("metrics.jsonl", "config.json", "model_config.json", "curves.png", "params/sammed3d_jax.json"):
        assert (run / name).exists(), name
    assert len(list((run / "tensorboard").iterdir())) == 1 and not pathlib.Path("gs:").exists()


def test_periodic_validation_on_held_out_cases(tmp_path, prepared):
    config = _tiny_config(prepared, validation__every_steps=3, validation__holdout_fraction=0.5,
                          validation__clicks=2, validation__max_batches=2, stop_after_steps=3, profile_steps=(2, 2))
    train_and_evaluate(config, str(tmp_path / "run"))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if "val_dice_1" in r]
    assert val["step"] == 3 and 0.0 <= val["val_dice_1"] <= 1.0 and val["val_samples"] >= 1
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))


def test_configs_build(tmp_path):
    for name, arg in (("default", None), ("sammed3d", "runlocal"), ("finetune", "init=/some/dir,dice_only")):
        c = load_config(name, arg)
        assert c.optim.lr > 0 and c.batch_size > 0, name
    ft = load_config("finetune", "init=/some/dir,dice_only")
    assert ft.init_from == "/some/dir" and ft.optim.lr == 8e-5 and not ft.loss.use_bce
    assert load_config("sammed3d").model.variant == "vit_b_ori"
    with pytest.raises(ValueError, match="unknown config arg"):
        load_config("sammed3d", "runlokal")
