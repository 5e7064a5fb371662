"""Params directories (Orbax + JSON) and the convert/export command lines, end to end in a tmp dir."""

import hashlib
import json
import os
import stat

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


def _status(main, args) -> int:
    """The exit status of a guarded CLI main: its return value, or the code of the SystemExit it raised."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {p: v for k, sub in tree.items() for p, v in _leaves(sub, f"{prefix}/{k}").items()}
    return {prefix: tree}


def test_convert_then_export_cli_round_trip(tmp_path, tiny_fixture_dir, weights, capsys):
    pth, config = tiny_fixture_dir / "checkpoint.pth", tiny_fixture_dir / "config.json"
    out_dir, out_file = tmp_path / "params", tmp_path / "exported.safetensors"
    assert _status(convert.main, [str(pth), str(out_dir), "--config", str(config)]) == 0
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

    assert _status(export.main, [str(out_dir), str(out_file)]) == 0
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
    assert _status(convert.main, [pth, str(tmp_path / "busy"), "--config", config, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"OUT_DIR {tmp_path / 'busy'} exists and is not an earlier conversion" in err and err.count("\n") == 1
    assert (tmp_path / "busy" / "file.txt").read_text() == "keep me"
    # Wrong architecture: the default vit_b_ori config does not fit the tiny checkpoint. One line, a few problems.
    assert _status(convert.main, [pth, str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pth}: ") and err.count("\n") == 1
    assert "... and" in err and "name it with --config" in err
    assert not (tmp_path / "wrong").exists()
    assert _status(convert.main, [pth, str(tmp_path / "x"), "--config", "nonsense"]) == 2
    assert "--config nonsense: neither a model variant" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert _status(convert.main, [pth, str(tmp_path / "x"), "--config", str(tmp_path / "bad.json")]) == 2
    assert f"--config {tmp_path / 'bad.json'}: not a valid model config JSON" in capsys.readouterr().err
    assert _status(export.main, [str(tmp_path), str(tmp_path / "o.safetensors")]) == 2
    assert "not a converted sammed3d_jax params directory" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    bad = dict(weights)
    bad["unexpected.key"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match="unexpected: unexpected.key"):
        torch_to_flax(bad, ModelConfig.from_json(config))


def test_overwrite_replaces_only_a_previous_conversion(tmp_path, tiny_fixture_dir):
    args = [str(tiny_fixture_dir / "weights.npz"), str(tmp_path / "p"), "--config",
            str(tiny_fixture_dir / "config.json")]
    assert _status(convert.main, args) == 0
    assert _status(convert.main, args) == 2  # refuses to overwrite silently
    assert _status(convert.main, args + ["--overwrite"]) == 0
    variables, cfg, _ = load_params(tmp_path / "p")
    assert list(flax_to_torch(variables, cfg)) == list(read_state_dict(tiny_fixture_dir / "weights.npz"))


def test_output_paths_are_checked_before_the_work(tmp_path, tiny_fixture_dir, capsys, monkeypatch):
    npz, config = str(tiny_fixture_dir / "weights.npz"), str(tiny_fixture_dir / "config.json")
    reads = []
    monkeypatch.setattr(convert, "convert_file", lambda *a: reads.append(a))  # must not be reached
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "file", "is a file; expected a folder"),
                         (tmp_path / "file" / "sub", "is not a folder"),
                         (npz, "is an input of this command")]:
        assert _status(convert.main, [npz, str(out), "--config", config]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(convert.cli.os, "access", lambda path, mode: False)  # root may write anywhere: stubbed
    assert _status(convert.main, [npz, str(tmp_path / "new"), "--config", config]) == 2
    assert f"folder {tmp_path} is not writable" in capsys.readouterr().err
    assert reads == [] and not (tmp_path / "new").exists()


def test_export_refuses_to_overwrite_and_uses_the_umask(tmp_path, tiny_fixture_dir, capsys):
    params = tmp_path / "p"
    assert _status(convert.main, [str(tiny_fixture_dir / "weights.npz"), str(params), "--config",
                                  str(tiny_fixture_dir / "config.json")]) == 0
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    assert _status(export.main, [str(params), str(out)]) == 2
    assert f"OUT {out} already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert _status(export.main, [str(params), str(tmp_path / "w.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    old = os.umask(0o022)
    try:
        assert _status(export.main, [str(params), str(out), "--overwrite"]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        os.umask(0o077)
        assert _status(export.main, [str(params), str(tmp_path / "private.safetensors")]) == 0
        assert stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert len(load_file(str(out))) == 204 and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))\
        == []
