"""init_variables: upstream's from-scratch distributions, the same weights for a seed on every platform and call
style (stored checksum), stable under adding parameters."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from init_checksum import check_tiny_checksum
from sammed3d_jax.model import ModelConfig, init_variables, sam
from sammed3d_jax.model.initialization import init_rule


@pytest.fixture(scope="module")
def tiny_eager():
    return init_variables(ModelConfig.variant("tiny"), jax.random.key(0))


def test_stored_checksum(tiny_eager):
    check_tiny_checksum(tiny_eager)
    legacy = init_variables(ModelConfig.variant("tiny"), jax.random.PRNGKey(0))
    check_tiny_checksum(legacy)  # a raw uint32 key is the same key


def _expected(name: str, shape: tuple[int, ...], siblings: dict[str, tuple[int, ...]]):
    """Upstream's rules written from the specification: PyTorch's default U(±1/√fan_in) for Linear/Conv weights and
    biases (ConvTranspose3d takes fan_in from weight dim 1, i.e. out·k³), N(0, 1) embeddings and PE matrix, zero
    pos/rel-pos tables, LayerNorms ones/zeros."""
    parts = name.split("/")
    leaf, module = parts[-1], parts[-2]
    if leaf in ("embedding", "positional_encoding_gaussian_matrix"):
        return "normal", 1.0
    if leaf == "pos_embed" or leaf.startswith("rel_pos_"):
        return "constant", 0.0
    if "scale" in siblings:  # a LayerNorm
        return "constant", 1.0 if leaf == "scale" else 0.0
    kernel = siblings["kernel"]
    if len(kernel) == 2:
        fan_in = kernel[0]
    elif module.startswith("output_upscaling"):
        fan_in = kernel[-1] * 8
    else:
        fan_in = math.prod(kernel[:-1])
    return "uniform", 1.0 / math.sqrt(fan_in)


@pytest.mark.parametrize("variant", ["tiny", "vit_b_ori"])
def test_every_leaf_follows_upstreams_initialisation(variant, tiny_eager):
    """The library's rule for every leaf equals the specification's; on tiny the drawn values follow it: constants
    exactly, uniform leaves inside ±bound and filling it (max ≥ 0.9 bound, std ≈ bound/√3 on ≥ 1000 values),
    normal leaves mean ≈ 0 and std ≈ 1."""
    cfg = ModelConfig.variant(variant)
    plan = sam._init_plan(cfg)
    shapes = dict(zip(plan.names, plan.shapes))
    assert len(shapes) == (174 if variant == "tiny" else 324)
    values = dict(zip(plan.names, jax.tree_util.tree_leaves(tiny_eager))) if variant == "tiny" else {}
    kinds = set()
    for name, rule in zip(plan.names, plan.rules):
        module = name.rsplit("/", 1)[0]
        siblings = {n.rsplit("/", 1)[1]: shape for n, shape in shapes.items() if n.rsplit("/", 1)[0] == module}
        kind, value = _expected(name, shapes[name], siblings)
        assert rule[0] == kind and rule[1] == pytest.approx(value, rel=1e-12), (name, rule, kind, value)
        kinds.add(kind)
        if name not in values:
            continue
        x = np.asarray(values[name], np.float64)
        if kind == "constant":
            assert np.all(x == value), name
        elif kind == "uniform":
            assert np.all(x < value) and np.all(x >= -value), name
            if x.size >= 1000:
                assert np.max(np.abs(x)) >= 0.9 * value, name
                assert abs(np.std(x) / (value / math.sqrt(3)) - 1) < 0.1, name
        elif x.size >= 48:
            assert abs(np.mean(x)) < 0.5 and 0.6 < np.std(x) < 1.4, (name, np.mean(x), np.std(x))
    assert kinds == {"constant", "uniform", "normal"}


def test_leaves_are_independent_and_stable_under_added_parameters(tiny_eager):
    """Per-leaf draws folded in by path: same-shaped leaves differ, another key differs everywhere, and a deeper
    encoder leaves every shared leaf bit-identical."""
    cfg = ModelConfig.variant("tiny")
    blocks = tiny_eager["params"]["image_encoder"]
    lin1 = [blocks[f"blocks_{i}"]["mlp"]["lin1"]["kernel"] for i in (0, 1)]
    assert not np.array_equal(*lin1)
    other = init_variables(cfg, jax.random.key(1))
    assert not np.array_equal(other["params"]["mask_decoder"]["iou_token"]["embedding"],
                              tiny_eager["params"]["mask_decoder"]["iou_token"]["embedding"])
    deeper = init_variables(cfg.replace(encoder_depth=3, encoder_global_attn_indexes=(1,)), jax.random.key(0))
    for path, x in jax.tree_util.tree_leaves_with_path(tiny_eager):
        y = deeper
        for k in path:
            y = y[k.key]
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert "blocks_2" in deeper["params"]["image_encoder"]


def test_unknown_layer_needs_a_rule():
    class Mystery(nn.Module):
        pass

    with pytest.raises(ValueError, match="no initialisation rule for variable 'w' of Mystery"):
        init_rule(Mystery, "w", {"w": (3,)})


def test_jitted_with_shardings_gives_the_same_bits(tiny_eager):
    """Callers create the variables already placed (init under jit with out_shardings on a mesh): the traced
    construction gives exactly the eager one's values."""
    cfg = ModelConfig.variant("tiny")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.device_put(jax.random.key(0), replicated)
    with jax.transfer_guard("disallow"):
        placed = jax.jit(init_variables, static_argnums=0, out_shardings=replicated)(cfg, key)
    for a, b in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(tiny_eager)):
        assert a.sharding == replicated and a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
