"""Helpers of the training tests (imported by tests/training/conftest.py and the tests).

Compiling the train step dominates these tests on CPU, so every test that can reuses the same configuration:
the tiny model, batch 8, 2 clicks and one optimizer, built by the same set-up the loop uses
(``training.setup.build``).
"""

import jax
import numpy as np

from sammed3d_jax import parallel
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.training import optim, setup as setup_lib, step as step_lib

TINY = ModelConfig.variant("tiny")
STEP = step_lib.StepConfig(max_clicks=2, min_clicks=2)
# eps 1e-3 keeps Adam's first update g / (|g| + eps) smooth in g, so re-ordered float reductions on other device
# layouts change it by ~lr * |dg| / eps instead of flipping the sign of near-zero gradient entries.
OPT = optim.OptimConfig(lr=3e-3, eps=1e-3, schedule="constant", lr_multipliers=())
BATCH = 8
# Cheaper LLVM passes: about half the CPU compile time of the step, at the same run time.
FAST_COMPILE = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}


def make_batch(n: int = BATCH, seed: int = 0, size: int = 32) -> dict[str, np.ndarray]:
    """Boxes of varied size and position, brighter than a noisy background; ``element`` = row index."""
    return setup_lib.synthetic_batch(n, size, seed)


def build_step(mesh, variables, rules=((".*", "replicate"),), opt_cfg=OPT, step_cfg=STEP, cfg=TINY):
    """(jitted step, ``new_state()`` making a fresh placed state, train key) on ``mesh`` with the param rules."""
    setup = setup_lib.build(cfg, opt_cfg, step_cfg, mesh, rules=rules, compiler_options=FAST_COMPILE)
    key = parallel.put_replicated(jax.random.key(1), mesh)
    return setup.train_step, lambda: setup.from_variables(variables), key


def run_steps(fn, state, key, mesh, batch, n):
    """Runs ``n`` steps on the same batch; returns the final state and the fetched metrics of each step."""
    history = []
    for _ in range(n):
        state, metrics = fn(state, parallel.shard_host_batch(batch, mesh), key)
        history.append(jax.device_get(metrics))
    return state, history
