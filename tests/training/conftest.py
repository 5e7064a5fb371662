"""Session fixtures of the training tests: tiny variables, one fixed batch, the compiled single-device step."""

import jax
import pytest

from sammed3d_jax import parallel
from sammed3d_jax.data.prepare import prepare_dataset
from sammed3d_jax.data.synthetic import make_synthetic_dataset
from sammed3d_jax.model.sam import init_variables
from train_helpers import FAST_COMPILE, TINY, build_step, make_batch, run_steps


@pytest.fixture(scope="session")
def tiny_batch():
    return make_batch()


@pytest.fixture(scope="session")
def tiny_variables():
    return jax.jit(init_variables, static_argnums=0, compiler_options=FAST_COMPILE)(TINY, jax.random.key(0))


@pytest.fixture(scope="session")
def single_device_step(tiny_variables):
    """The compiled single-device step (reused by every test that compares against one device)."""
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    fn, new_state, key = build_step(mesh, tiny_variables)
    return mesh, fn, new_state, key


@pytest.fixture(scope="session")
def replicated_8_device_run(tiny_variables, tiny_batch):
    """Two steps of the replicated step on all 8 devices: (mesh, final state, per-step metrics)."""
    mesh = parallel.make_mesh()
    fn, new_state, key = build_step(mesh, tiny_variables)
    state, history = run_steps(fn, new_state(), key, mesh, tiny_batch, 2)
    return mesh, state, history


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared store of three small synthetic cases (one per test module)."""
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "raw", 3, seed=0, shape=(48, 48, 20))
    prepare_dataset(root / "raw", root / "prepared", workers=1, progress=False)
    return str(root / "prepared")
