"""--checkpoint resolution: a training workdir (latest step, params only), its manager/step/state folders, a params
directory, dtype override, and the messages for what is not a checkpoint."""

import shutil

import jax
import numpy as np
import pytest

from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.checkpoint.params_io import save_params
from sammed3d_jax.checkpoint.pth_reader import CheckpointError
from sammed3d_jax.checkpoint.torch_convert import abstract_variables
from sammed3d_jax.evaluation.checkpoints import finished_steps, load_checkpoint
from sammed3d_jax.model.config import ModelConfig

CFG = ModelConfig.variant("tiny")


def _variables(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract_variables(CFG))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # A train state as the training loop saves it: step, params, buffers and an optimizer state beside them.
    root = tmp_path_factory.mktemp("run")
    manager = orbax_io.make_manager(root, save_every=1, keep=3, async_save=False)
    for step in (1, 2):
        v = _variables(step)
        state = {"step": np.int32(step), "params": v["params"], "buffers": v["buffers"],
                 "opt_state": {"mu": jax.tree.map(np.zeros_like, v["params"])}}
        orbax_io.save(manager, step, state, force=True)
    manager.wait_until_finished()
    manager.close()
    orbax_io.save_model_config(root, CFG)
    return root


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_workdir_and_its_orbax_folders(workdir):
    assert finished_steps(workdir / "checkpoints") == [1, 2]
    latest = load_checkpoint(workdir)
    assert (latest.kind, latest.step, latest.cfg) == ("workdir", 2, CFG)
    assert sorted(latest.variables) == ["buffers", "params"] and _same(latest.variables, _variables(2))
    for path, step in [(workdir / "checkpoints", 2), (workdir / "checkpoints" / "1", 1),
                       (workdir / "checkpoints" / "1" / "state", 1)]:
        loaded = load_checkpoint(path)
        assert (loaded.kind, loaded.step) == ("orbax", step) and _same(loaded.variables, _variables(step))
    assert load_checkpoint(workdir, dtype="bfloat16").cfg == CFG.replace(dtype="bfloat16")
    with pytest.raises(ValueError, match="architecture differs"):
        load_checkpoint(workdir, model_config="small")


def test_params_directory(tmp_path):
    save_params(tmp_path / "p", _variables(5), CFG, {"source": "test", "step": 7})
    loaded = load_checkpoint(tmp_path / "p")
    assert (loaded.kind, loaded.step, loaded.cfg) == ("params", 7, CFG) and _same(loaded.variables, _variables(5))
    assert loaded.describe()["model_config"]["image_size"] == 32


def test_not_a_checkpoint_messages(tmp_path, workdir):
    with pytest.raises(CheckpointError, match="missing: checkpoint does not exist.*python train.py"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    orbax_io.save_model_config(tmp_path / "empty_run", CFG)
    with pytest.raises(CheckpointError, match="without any finished checkpoint.*python train.py"):
        load_checkpoint(tmp_path / "empty_run")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="neither a params directory"):
        load_checkpoint(tmp_path / "other")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "2").symlink_to(workdir / "checkpoints" / "2", target_is_directory=True)
    with pytest.raises(CheckpointError, match="no model_config.json beside the checkpoint"):
        load_checkpoint(moved)
    assert load_checkpoint(moved, model_config="tiny").step == 2


def test_unfinished_save_is_not_a_step(workdir):
    # An interrupted save leaves Orbax's temporary folder behind; the latest finished step is still the answer.
    unfinished = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"
    (unfinished / "state").mkdir(parents=True)
    try:
        assert finished_steps(workdir / "checkpoints") == [1, 2]
        assert load_checkpoint(workdir).step == 2
    finally:
        shutil.rmtree(unfinished)


def test_mismatched_upstream_file_names_the_working_flag(tiny_fixture_dir):
    pth, config = tiny_fixture_dir / "checkpoint.pth", tiny_fixture_dir / "config.json"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(pth, config_flag="--config.model_config")  # the default architecture is vit_b_ori
    message = str(err.value)
    assert message.startswith(f"{pth}: ") and "\n" not in message and "... and" in message
    assert "name it with --config.model_config" in message and len(message) < 1200
    loaded = load_checkpoint(pth, str(config), config_flag="--config.model_config")  # following the hint works
    assert loaded.kind == "file" and loaded.cfg == ModelConfig.from_json(config)
    with pytest.raises(ValueError, match="--config.model_config nope.json: neither a model variant"):
        load_checkpoint(pth, "nope.json", config_flag="--config.model_config")
