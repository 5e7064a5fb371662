"""train_and_evaluate end to end on a tiny synthetic dataset: files written, and resume == uninterrupted."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.data.prepare import prepare_dataset
from sammed3d_jax.data.synthetic import make_synthetic_dataset
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.training.loop import train_and_evaluate
from train_helpers import FAST_COMPILE

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
TINY = ModelConfig.variant("tiny", dtype="float32", remat_encoder_blocks=False)


def _load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "raw", 2, seed=0, shape=(48, 48, 20))
    prepare_dataset(root / "raw", root / "prepared", workers=1, progress=False)
    return str(root / "prepared")


def _tiny_config(prepared, **overrides):
    c = _load_config("default")
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
        c[key] = value
    c.lock()
    return c


def _params(state):
    return jax.tree.leaves(jax.device_get(state.params))


def test_run_writes_everything_and_resume_matches_uninterrupted(tmp_path, prepared):
    full = train_and_evaluate(_tiny_config(prepared), str(tmp_path / "full"))
    run = tmp_path / "full"
    assert sorted(os.listdir(run / "checkpoints"), key=int) == ["3", "6"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("loss", "dice_last", "grad_norm", "lr", "skipped", "samples_per_s", "dice_per_click"):
        assert key in records[-1], key
    assert records[-1]["skipped"] == 0 and records[-1]["updates"] == 6
    assert (run / "curves.png").stat().st_size > 1000
    assert json.loads((run / "model_config.json").read_text())["image_size"] == 32
    assert (run / "params" / "sammed3d_jax.json").exists()

    # Killed after step 4: the last checkpoint is step 3, so the resumed run replays step 4 onwards.
    part = tmp_path / "part"
    train_and_evaluate(_tiny_config(prepared, stop_after_steps=4), str(part))
    assert os.listdir(part / "checkpoints") == ["3"]
    with pytest.raises(FileExistsError, match="--resume"):
        train_and_evaluate(_tiny_config(prepared), str(part))
    resumed = train_and_evaluate(_tiny_config(prepared, resume=True), str(part))
    assert int(resumed.step) == 6
    for a, b in zip(_params(resumed), _params(full)):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # The killed run's record of step 4 was dropped on resume, then rewritten.

    # Fine-tuning start: the exported params dir initialises a new run (lr is 0 during the first warm-up update,
    # so after one step the params are still exactly the loaded ones).
    loaded = orbax_io.load_init_variables(run / "params", TINY)
    for a, b in zip(jax.tree.leaves(loaded["params"]), _params(full)):
        np.testing.assert_array_equal(a, b)
    tuned = train_and_evaluate(_tiny_config(prepared, init_from=str(run / "params"), stop_after_steps=1),
                               str(tmp_path / "tuned"))
    for a, b in zip(_params(tuned), _params(full)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="architecture differs"):
        orbax_io.load_init_variables(run / "params", TINY.replace(encoder_depth=3, encoder_global_attn_indexes=(2,)))


def test_configs_build(tmp_path):
    for name, arg in (("default", None), ("sammed3d", "runlocal"), ("finetune", "init=/some/dir,dice_only")):
        c = _load_config(name, arg)
        assert c.optim.lr > 0 and c.batch_size > 0, name
    ft = _load_config("finetune", "init=/some/dir,dice_only")
    assert ft.init_from == "/some/dir" and ft.optim.lr == 8e-5 and not ft.loss.use_bce
    assert _load_config("sammed3d").model.variant == "vit_b_ori"
    with pytest.raises(ValueError, match="unknown config arg"):
        _load_config("sammed3d", "runlokal")
