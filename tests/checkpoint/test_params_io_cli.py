"""Params directories (Orbax + JSON) and the convert/export command lines, end to end in a tmp dir."""

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from sammed3d_jax import convert, export
from sammed3d_jax.checkpoint.params_io import load_params, load_variables, save_params
from sammed3d_jax.checkpoint.pth_reader import CheckpointError, read_state_dict
from sammed3d_jax.checkpoint.torch_convert import ConversionError, flax_to_torch, torch_to_flax
from sammed3d_jax.model.config import ModelConfig


@pytest.fixture(scope="module")
def weights(tiny_fixture_dir):
    with np.load(tiny_fixture_dir / "weights.npz") as z:
        return {k: z[k] for k in z.files}


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in _leaves(sub, f"{prefix}/{k}").items()}
    return {prefix: tree}


def test_convert_then_export_cli_round_trip(tmp_path, tiny_fixture_dir, weights, capsys):
    pth, config = tiny_fixture_dir / "checkpoint.pth", tiny_fixture_dir / "config.json"
    out_dir, out_file = tmp_path / "params", tmp_path / "exported.safetensors"
    assert convert.main([str(pth), str(out_dir), "--config", str(config)]) == 0
    assert "1,389,274 parameters + 48 buffer elements in 204 arrays" in capsys.readouterr().out

    variables, cfg, meta = load_params(out_dir)
    assert cfg == ModelConfig.from_json(config)
    assert meta["source"] == "checkpoint.pth" and meta["source_format"] == "pth"
    assert meta["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert (meta["source_key_count"], meta["parameter_count"], meta["buffer_element_count"]) == (204, 1_389_274, 48)
    assert json.loads((out_dir / "sammed3d_jax.json").read_text()) == meta
    expected = _leaves(torch_to_flax(weights, cfg))
    got = _leaves(variables)
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], expected[k]) for k in expected)

    assert export.main([str(out_dir), str(out_file)]) == 0
    exported = load_file(str(out_file))
    assert exported.keys() == weights.keys()
    assert all(exported[k].dtype == np.float32 and np.array_equal(exported[k], weights[k]) for k in weights)
    # The exported file converts again (safetensors reader path) to the identical tree.
    again, _, meta2 = load_variables(out_file, config)
    assert meta2["source_format"] == "safetensors"
    assert all(np.array_equal(_leaves(again)[k], expected[k]) for k in expected)


def test_load_variables_from_a_file_and_a_directory(tmp_path, tiny_fixture_dir, weights):
    config = tiny_fixture_dir / "config.json"
    variables, cfg, meta = load_variables(tiny_fixture_dir / "weights.npz", config)
    assert meta["source_key_count"] == 204
    save_params(tmp_path / "p", variables, cfg, meta)
    from_dir, cfg2, _ = load_variables(tmp_path / "p", config)
    assert cfg2 == cfg and all(np.array_equal(a, _leaves(variables)[k]) for k, a in _leaves(from_dir).items())
    with pytest.raises(ValueError, match="different parameter layout"):
        load_variables(tmp_path / "p", "vit_b_ori")


def test_bad_directories_and_arguments_give_clear_errors(tmp_path, tiny_fixture_dir, weights, capsys):
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: not a converted sammed3d_jax params directory"):
        load_params(tmp_path)
    with pytest.raises(CheckpointError, match="no such params directory"):
        load_params(tmp_path / "nope")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("keep me")
    pth, config = str(tiny_fixture_dir / "checkpoint.pth"), str(tiny_fixture_dir / "config.json")
    assert convert.main([pth, str(tmp_path / "busy"), "--config", config, "--overwrite"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "file.txt").read_text() == "keep me"
    # Wrong architecture: the default vit_b_ori config does not fit the tiny checkpoint.
    assert convert.main([pth, str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err
    assert "check that the model config (--config) is the right one" in err and "... and" in err
    assert convert.main([pth, str(tmp_path / "x"), "--config", "nonsense"]) == 2
    assert "--config nonsense" in capsys.readouterr().err
    assert export.main([str(tmp_path), str(tmp_path / "o.safetensors")]) == 2
    assert "not a converted sammed3d_jax params directory" in capsys.readouterr().err
    bad = dict(weights)
    bad["unexpected.key"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match="unexpected: unexpected.key"):
        torch_to_flax(bad, ModelConfig.from_json(config))


def test_overwrite_replaces_only_a_previous_conversion(tmp_path, tiny_fixture_dir):
    args = [str(tiny_fixture_dir / "weights.npz"), str(tmp_path / "p"), "--config",
            str(tiny_fixture_dir / "config.json")]
    assert convert.main(args) == 0
    assert convert.main(args) == 2  # refuses to overwrite silently
    assert convert.main(args + ["--overwrite"]) == 0
    variables, cfg, _ = load_params(tmp_path / "p")
    assert list(flax_to_torch(variables, cfg)) == list(read_state_dict(tiny_fixture_dir / "weights.npz"))
