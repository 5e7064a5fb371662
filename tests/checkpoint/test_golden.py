"""Weights converted from the fixture's checkpoint.pth reproduce the PyTorch golden outputs through our model
(fixture tolerances, float32). The decoder-only check isolates the prompt-encoder/decoder entries of the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sammed3d_jax.checkpoint.params_io import load_variables
from sammed3d_jax.model.sam import Sam3D

RTOL, ATOL = 1e-5, 2e-5  # fixture README tolerances for everything but the enc_* intermediates; never loosen


@pytest.fixture(scope="module")
def converted(tiny_fixture_dir):
    variables, cfg, _ = load_variables(tiny_fixture_dir / "checkpoint.pth", tiny_fixture_dir / "config.json")
    return variables, cfg


@pytest.fixture(scope="module")
def golden(tiny_fixture_dir):
    with np.load(tiny_fixture_dir / "golden.npz") as z:
        return {k: z[k] for k in z.files}


def _channels_last(x):
    return jnp.asarray(np.moveaxis(x, 1, -1))


def _decode(variables, cfg, embedding, golden):
    points, labels = jnp.asarray(golden["point_coords"]), jnp.asarray(golden["point_labels"], jnp.int32)
    decode = jax.jit(lambda v, e, p, l, m: Sam3D(cfg).apply(v, e, p, l, m, multimask_output=False,
                                                           method=Sam3D.decode))
    return decode(variables, embedding, points, labels, _channels_last(golden["mask_input"]))


def test_decoder_from_golden_embeddings(converted, golden):
    variables, cfg = converted
    with jax.default_matmul_precision("float32"):
        low, iou = _decode(variables, cfg, _channels_last(golden["image_embeddings"]), golden)
    np.testing.assert_allclose(low, _channels_last(golden["low_res_masks_single"]), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(iou, golden["iou_predictions_single"], rtol=RTOL, atol=ATOL)


def test_end_to_end_low_res_masks(converted, golden):
    variables, cfg = converted
    with jax.default_matmul_precision("float32"):
        encode = jax.jit(lambda v, x: Sam3D(cfg).apply(v, x, method=Sam3D.encode))
        low, _ = _decode(variables, cfg, encode(variables, _channels_last(golden["image"])), golden)
    np.testing.assert_allclose(low, _channels_last(golden["low_res_masks_single"]), rtol=RTOL, atol=ATOL)
