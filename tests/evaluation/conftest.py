"""Session fixtures of the evaluation tests."""

import jax
import numpy as np
import pytest

from sammed3d_jax.checkpoint.torch_convert import abstract_variables
from sammed3d_jax.model.config import ModelConfig


@pytest.fixture(scope="session")
def tiny():
    """``(cfg, variables)``: the tiny model with random weights in its exact tree (no init compilation), enough for
    comparisons of one code path against another."""
    cfg = ModelConfig.variant("tiny")
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), abstract_variables(cfg))
    return cfg, variables
