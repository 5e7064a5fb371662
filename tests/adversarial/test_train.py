"""train.py refuses bad launches, configs and workdirs with one line: exit != 0, no traceback, the flag or path
named, nothing left behind, inputs unchanged. Every case is refused before any step is compiled."""


import numpy as np
import pytest

from cli_assert import REPO, assert_refused, run_cli, snapshot
from config_files import load_config
from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.data.prepare import prepare_dataset
from sammed3d_jax.data.synthetic import make_synthetic_dataset
from sammed3d_jax.model.config import ModelConfig

TINY = ["--config.model.variant=tiny", "--config.data.min_crop_foreground=50", "--config.batch_size=2",
        "--config.total_steps=6", "--config.optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "raw", 2, seed=0, shape=(40, 40, 16))
    prepare_dataset(root / "raw", root / "prepared", workers=1, progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, prepared):
    """A workdir as a tiny run leaves it after step 3 (a checkpoint, its config and model config)."""
    workdir = tmp_path_factory.mktemp("run")
    config = load_config("default")
    config.model.variant = "tiny"
    config.data.prepared_dir = str(prepared)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    orbax_io.save_model_config(workdir, ModelConfig.variant("tiny"))
    manager = orbax_io.make_manager(workdir, save_every=3, keep=2, async_save=False)
    orbax_io.save(manager, 3, {"step": np.int32(3)}, {"next_batch": 3}, force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir


def _train(*args, cwd, env=None):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}  # One CPU device, as a laptop.
    return run_cli([str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("args, mentions", [
    (["--config.optim.lrr=1"], ["--config.optim.lrr", "--config.optim.lr"]),
    (["--config.optim.lr=abc"], ["optim.lr"]),
    (["--config.batch_size=0"], ["--config.batch_size"]),
    (["--config.total_steps=5", "--config.optim.warmup_steps=10"], ["warmup_steps=10"]),
    (["--config.distributed.mode=maybe"], ["distributed.mode"]),
    (["--config.clicks.min_clicks=9", "--config.clicks.max_clicks=3"], ["min_clicks"]),
    (["--config=/nonexistent/config.py"], ["/nonexistent/config.py"]),
    (["--resume"], ["--resume", "holds no checkpoint"]),
    (["--resum"], ["resum"]),
    (["extra"], ["unexpected arguments"]),
])
def test_bad_config_or_flags_are_one_line(tmp_path, args, mentions):
    workdir = tmp_path / "run"
    proc = _train(f"--workdir={workdir}", *args, cwd=tmp_path)
    assert_refused(proc, mentions=mentions, absent=[workdir])


def test_existing_run_needs_resume_and_keeps_its_recipe(tmp_path, prepared, existing_run):
    before = snapshot([existing_run])
    data = f"--config.data.prepared_dir={prepared}"
    proc = _train(f"--workdir={existing_run}", *TINY, data, cwd=tmp_path)
    assert_refused(proc, mentions=["already holds a run", "--resume"], unchanged=before)
    # Resuming with another model is a recipe change: refused without the flag, an architecture error with it.
    proc = _train(f"--workdir={existing_run}", "--resume", "--config.model.variant=small", data, cwd=tmp_path)
    assert_refused(proc, mentions=["model.variant", "--allow_recipe_change"], unchanged=before)
    proc = _train(f"--workdir={existing_run}", "--resume", "--allow_recipe_change", "--config.model.variant=small",
                  data, cwd=tmp_path)
    assert_refused(proc, mentions=["architecture differs"], unchanged=before)


def test_missing_data_and_unwritable_workdir(tmp_path, prepared):
    proc = _train(f"--workdir={tmp_path / 'run'}", *TINY, f"--config.data.prepared_dir={tmp_path / 'nope'}",
                  cwd=tmp_path)
    assert_refused(proc, mentions=["prepared_dir", "does not exist"], absent=[tmp_path / "run"])
    (tmp_path / "file").write_text("x")
    proc = _train(f"--workdir={tmp_path / 'file' / 'run'}", *TINY, f"--config.data.prepared_dir={prepared}",
                  cwd=tmp_path)
    assert_refused(proc, mentions=["cannot write to the checkpoint folder", "file/run/checkpoints"])


def test_slurm_task_per_node_with_idle_gpus_is_refused(tmp_path, prepared):
    # One SLURM task on a node with 4 GPUs: JAX's detection would give it a single device. (On this CPU machine
    # the process sees one device, which is what a GPU node would give it.)
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = _train(f"--workdir={tmp_path / 'run'}", *TINY, f"--config.data.prepared_dir={prepared}", cwd=tmp_path,
                  env=env)
    assert_refused(proc, mentions=["4 GPUs", "--ntasks-per-node=4", "local_device_ids=all"], absent=[tmp_path / "run"])
