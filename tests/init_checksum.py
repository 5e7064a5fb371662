"""The stored fingerprint of ``init_variables(ModelConfig.variant("tiny"), jax.random.key(0))``, shared by the CPU
init tests and the GPU tests (same seed, same weights on every platform)."""

import hashlib

import jax
import numpy as np

# Computed once with threefry on CPU for ModelConfig.variant("tiny") and jax.random.key(0). The hash covers every
# leaf except the normal ones (bit-exact on every backend by construction); the sums cover all leaves (the normal
# leaves' erf_inv may differ in the last bit between backends, hence the tolerance).
TINY_UNIFORM_SHA256 = "846a7f56c141dd834ea765cd3d724f249e271870a910559acd61f31edf668e6e"
TINY_WEIGHTED_SUM = 66555.68545546843
TINY_SUM_OF_SQUARES = 2004.2700671286573


def fingerprint(variables) -> tuple[str, float, float]:
    """(sha256 over the non-normal leaves' names and bytes, Σ_i (i+1)·Σ leaf_i, Σ x²) in float64."""
    h = hashlib.sha256()
    weighted = squares = 0.0
    for i, (path, x) in enumerate(jax.tree_util.tree_leaves_with_path(variables)):
        name = jax.tree_util.keystr(path)
        x = np.asarray(jax.device_get(x))
        if not (name.endswith("['embedding']") or "gaussian" in name):
            h.update(name.encode())
            h.update(x.tobytes())
        weighted += float(np.sum(x.astype(np.float64) * (i + 1)))
        squares += float(np.sum(x.astype(np.float64) ** 2))
    return h.hexdigest(), weighted, squares


def check_tiny_checksum(variables):
    digest, weighted, squares = fingerprint(variables)
    assert digest == TINY_UNIFORM_SHA256
    np.testing.assert_allclose([weighted, squares], [TINY_WEIGHTED_SUM, TINY_SUM_OF_SQUARES], rtol=1e-6)
