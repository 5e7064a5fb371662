"""Weights trained at one input size loaded at another: torch's interpolation rule (hand-computed values), the same
size gives the same arrays, ``convert --image-size`` then encoding at the new size works, the point-embedding count
is read from the state dict, and fine-tuning configs resample at load time."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from config_files import load_config
from sammed3d_jax import convert
from sammed3d_jax.checkpoint import orbax_io
from sammed3d_jax.checkpoint.params_io import convert_file, load_params, load_variables
from sammed3d_jax.checkpoint.resize import resample_linear, resize_variables
from sammed3d_jax.checkpoint.torch_convert import ConversionError, flax_to_torch
from sammed3d_jax.model import ModelConfig, Sam3D, init_variables


def test_linear_resampling_is_torchs_rule():
    """F.interpolate(mode="linear", align_corners=False) by hand: 3 -> 5 (up) and 5 -> 3 (down, no antialias)."""
    up = resample_linear(np.array([0.0, 1.0, 2.0]), 0, 5)
    np.testing.assert_allclose(up, [0.0, 0.4, 1.0, 1.6, 2.0], rtol=0, atol=1e-6)
    down = resample_linear(np.array([0.0, 1.0, 4.0, 9.0, 16.0]), 0, 3)
    np.testing.assert_allclose(down, [1 / 3, 4.0, 9 + 7 * 2 / 3], rtol=0, atol=1e-5)
    table = np.random.default_rng(0).normal(size=(15, 4)).astype(np.float32)
    assert np.array_equal(resample_linear(table, 0, 15), table)
    assert resample_linear(table, 0, 19).shape == (19, 4)


@pytest.fixture(scope="module")
def fixture_weights(tiny_fixture_dir):
    return load_variables(tiny_fixture_dir / "checkpoint.pth", tiny_fixture_dir / "config.json")


def test_same_size_is_the_same_arrays_and_other_sizes_resample(fixture_weights):
    variables, cfg, _ = fixture_weights
    same, same_cfg = resize_variables(variables, cfg, cfg.image_size)
    assert same is variables and same_cfg == cfg
    big, big_cfg = resize_variables(variables, cfg, 96)  # 4³ -> 6³ tokens
    assert big_cfg == cfg.replace(image_size=96)
    enc, enc0 = big["params"]["image_encoder"], variables["params"]["image_encoder"]
    pos0 = enc0["pos_embed"]
    assert enc["pos_embed"].shape == (1, 6, 6, 6, 96)
    # Trilinear = the 1-D rule along each axis: output i reads source (i + 0.5) * 4/6 - 0.5, clamped. Token
    # (0, 0, 0) reads source (0, 0, 0); token (1, 2, 5) reads (0.5, 7/6, 3) -> four corners with product weights.
    np.testing.assert_allclose(enc["pos_embed"][0, 0, 0, 0], pos0[0, 0, 0, 0], rtol=1e-6)
    w = [(0, 1, 0.5), (1, 2, 1 / 6), (3, 3, 0.0)]
    want = sum((1 - w[0][2] if a == 0 else w[0][2]) * (1 - w[1][2] if b == 0 else w[1][2])
               * pos0[0, w[0][a], w[1][b], 3] for a in (0, 1) for b in (0, 1))
    np.testing.assert_allclose(enc["pos_embed"][0, 1, 2, 5], want, rtol=1e-5, atol=1e-6)
    # Global blocks (1, 3): 7 -> 11 rows along the length; windowed blocks keep their 27-row tables.
    assert enc["blocks_1"]["attn"]["rel_pos_d"].shape == (11, 24)
    np.testing.assert_array_equal(enc["blocks_1"]["attn"]["rel_pos_h"],
                                  resample_linear(enc0["blocks_1"]["attn"]["rel_pos_h"], 0, 11))
    assert enc["blocks_0"]["attn"]["rel_pos_d"] is enc0["blocks_0"]["attn"]["rel_pos_d"]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resize_variables(variables, cfg, 100)


def test_convert_at_another_size_then_encode(tiny_fixture_dir, tmp_path, fixture_weights):
    variables, cfg, _ = fixture_weights
    args = [str(tiny_fixture_dir / "checkpoint.pth"), "--config", str(tiny_fixture_dir / "config.json")]
    assert convert.main([args[0], str(tmp_path / "plain"), *args[1:]]) == 0
    assert convert.main([args[0], str(tmp_path / "same"), *args[1:], "--image-size", "64"]) == 0
    assert convert.main([args[0], str(tmp_path / "big"), *args[1:], "--image-size", "80"]) == 0
    plain, _, _ = load_params(tmp_path / "plain")
    same, _, _ = load_params(tmp_path / "same")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(same)))
    big, big_cfg, meta = load_params(tmp_path / "big")
    assert big_cfg.image_size == 80 and meta["resized_from_image_size"] == 64
    model = Sam3D(big_cfg)
    emb = jax.jit(lambda v, x: model.apply(v, x, method=Sam3D.encode))(big, jnp.ones((1, 80, 80, 80, 1)))
    assert emb.shape == (1, 5, 5, 5, 48) and bool(jnp.all(jnp.isfinite(emb)))
    # Loading the plain conversion at 80 gives the converter's arrays.
    again, again_cfg, _ = load_params(tmp_path / "plain", image_size=80)
    assert again_cfg == big_cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(big)))


def test_convert_refuses_a_bad_image_size_in_one_line(tiny_fixture_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(tiny_fixture_dir / "checkpoint.pth"), str(tmp_path / "out"), "--config",
                      str(tiny_fixture_dir / "config.json"), "--image-size", "100"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --image-size 100: not a positive multiple of the patch size 16"]
    assert not (tmp_path / "out").exists()


def test_point_embeddings_come_from_the_state_dict(fixtures_dir, tmp_path):
    box = fixtures_dir / "upstream_box_tiny"
    cfg_dict = json.loads((box / "config.json").read_text())
    del cfg_dict["num_point_embeddings"]
    (tmp_path / "no_key.json").write_text(json.dumps(cfg_dict))
    _, cfg, _ = convert_file(box / "weights.npz", tmp_path / "no_key.json")
    assert cfg.num_point_embeddings == 4
    # A config that states the number is strict: 2 stated, 4 stored -> one error naming both.
    (tmp_path / "two.json").write_text(json.dumps(cfg_dict | {"num_point_embeddings": 2}))
    with pytest.raises(ConversionError) as err:
        convert_file(box / "weights.npz", tmp_path / "two.json")
    assert "unexpected: prompt_encoder.point_embeddings.2.weight" in str(err.value)
    assert "the state dict has 4 point embeddings, the model config 2" in str(err.value)
    # Variant names take the count from the file (here a random tiny model with box corners).
    tiny4 = ModelConfig.variant("tiny", num_point_embeddings=4)
    np.savez(tmp_path / "tiny4.npz", **flax_to_torch(init_variables(tiny4, jax.random.key(0)), tiny4))
    variables, cfg, _ = load_variables(tmp_path / "tiny4.npz", "tiny")
    assert cfg == tiny4 and "point_embeddings_3" in variables["params"]["prompt_encoder"]


def test_finetune_at_another_size_resamples_at_load(tiny_fixture_dir, tmp_path, fixture_weights):
    from sammed3d_jax.training.run_config import model_config

    variables, cfg, _ = fixture_weights
    assert convert.main([str(tiny_fixture_dir / "checkpoint.pth"), str(tmp_path / "p"),
                         "--config", str(tiny_fixture_dir / "config.json")]) == 0
    c = load_config("finetune", f"init={tmp_path / 'p'},image_size=160")
    assert c.init_from == str(tmp_path / "p")
    assert model_config(c).image_size == 160 and model_config(load_config("finetune", "init=x")).image_size == 128
    wanted = cfg.replace(image_size=80, dtype="bfloat16", scan_encoder_blocks=True)
    loaded = orbax_io.load_init_variables(tmp_path / "p", wanted)
    assert loaded["params"]["image_encoder"]["pos_embed"].shape == (1, 5, 5, 5, 96)
    with pytest.raises(ValueError, match="architecture differs"):
        orbax_io.load_init_variables(tmp_path / "p", wanted.replace(encoder_depth=2, encoder_global_attn_indexes=(1,)))
