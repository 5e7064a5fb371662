"""Helpers of the training tests (imported by tests/training/conftest.py, the tests and the distributed worker).

Compiling the train step dominates these tests on CPU, so every test that can reuses the same configuration:
the tiny model, batch 8, 2 clicks and one optimizer.
"""

import jax
import numpy as np

from sammed3d_jax import parallel
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.training import optim, state as state_lib, step as step_lib

TINY = ModelConfig.variant("tiny")
STEP = step_lib.StepConfig(max_clicks=2, min_clicks=2)
# eps 1e-3 keeps Adam's first update g / (|g| + eps) smooth in g, so re-ordered float reductions on other device
# layouts change it by ~lr * |dg| / eps instead of flipping the sign of near-zero gradient entries.
OPT = optim.OptimConfig(lr=3e-3, eps=1e-3, schedule="constant", lr_multipliers=())
BATCH = 8
# Cheaper LLVM passes: about half the CPU compile time of the step, at the same run time.
FAST_COMPILE = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}


def make_batch(n: int = BATCH, seed: int = 0, size: int = 32) -> dict[str, np.ndarray]:
    """Boxes of varied size and position, brighter than a noisy background (z-normalised-like values)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((n, size, size, size), np.uint8)
    for i in range(n):
        lo = rng.integers(2, size // 2, 3)
        hi = lo + rng.integers(6, size // 2, 3)
        label[i, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    image = rng.normal(0.0, 0.5, label.shape).astype(np.float32) + 1.5 * label
    return {"image": image[..., None], "label": label}


def build_step(mesh, variables, rules=((".*", "replicate"),), opt_cfg=OPT, step_cfg=STEP, cfg=TINY):
    """(jitted step, ``new_state()`` making a fresh placed state, train key) on ``mesh`` with the param rules."""
    optimizer = optim.make_optimizer(opt_cfg)

    def create(v):
        return state_lib.create_train_state(v, optimizer.tx)

    shardings = state_lib.state_shardings(jax.eval_shape(create, variables), rules, mesh)
    create_placed = jax.jit(create, out_shardings=shardings)
    fn = step_lib.jit_train_step(cfg, optimizer, step_cfg, mesh, shardings, FAST_COMPILE)
    key = parallel.put_replicated(jax.random.key(1), mesh)
    return fn, lambda: create_placed(variables), key


def run_steps(fn, state, key, mesh, batch, n):
    """Runs ``n`` steps on the same batch; returns the final state and the fetched metrics of each step."""
    history = []
    for _ in range(n):
        state, metrics = fn(state, parallel.shard_host_batch(batch, mesh), key)
        history.append(jax.device_get(metrics))
    return state, history
