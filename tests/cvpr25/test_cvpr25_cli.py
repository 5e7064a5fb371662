"""The command line as a user runs it: one-line refusals (exit 2, nothing written, inputs unchanged), make-cases
from a dataset folder, and the persistent compilation cache switched on for a fresh process."""

import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "adversarial"))
from cli_assert import assert_refused, run_cli, snapshot  # noqa: E402

from sammed3d_jax.cvpr25.__main__ import default_cache_dir  # noqa: E402
from sammed3d_jax.data.synthetic import make_synthetic_dataset  # noqa: E402

MODULE = ["-m", "sammed3d_jax.cvpr25"]


def test_refusals_name_the_argument(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    np.savez_compressed(cases / "a.npz", imgs=np.zeros((4, 4, 4)), spacing=[1, 1, 1])
    before = snapshot([cases])
    proc = run_cli(MODULE + ["evaluate", "--cases", str(tmp_path / "nope"), "--checkpoint", "x", "--out",
                             str(tmp_path / "o")])
    assert_refused(proc, mentions=["nope: does not exist"], absent=[tmp_path / "o"])
    proc = run_cli(MODULE + ["evaluate", "--cases", str(cases / "a.npz"), "--checkpoint", "x", "--out",
                             str(tmp_path / "o")])
    assert_refused(proc, mentions=["a.npz: not a folder of .npz cases"], unchanged=before, absent=[tmp_path / "o"])
    proc = run_cli(MODULE + ["evaluate", "--cases", str(cases), "--gts", str(tmp_path / "no_gts"), "--checkpoint",
                             "x", "--out", str(tmp_path / "o")])
    assert_refused(proc, mentions=["--gts", "no_gts: does not exist"], unchanged=before, absent=[tmp_path / "o"])
    proc = run_cli(MODULE + ["evaluate", "--cases", str(cases), "--checkpoint", "x", "--out", str(cases)])
    assert_refused(proc, mentions=["--out", "is an input of this command"], unchanged=before)
    proc = run_cli(MODULE + ["predict", "--inputs", str(cases), "--outputs", str(tmp_path / "o"), "--checkpoint",
                             str(tmp_path / "no_ckpt"), "--no-compilation-cache"])
    assert_refused(proc, mentions=["no_ckpt", "checkpoint does not exist"], unchanged=before)
    proc = run_cli(MODULE + ["make-cases", str(tmp_path / "missing"), str(tmp_path / "m")])
    assert_refused(proc, mentions=["DATASET", "missing"], absent=[tmp_path / "m"])
    proc = run_cli(MODULE + ["make-cases", str(cases), str(tmp_path / "m"), "--window", "5,1"])
    assert proc.returncode == 2 and "HI must exceed LO" in proc.stderr and "Traceback" not in proc.stderr


def test_make_cases_command(tmp_path):
    data = make_synthetic_dataset(tmp_path / "synth", cases=1, shape=(20, 18, 10))
    out = tmp_path / "cases"
    proc = run_cli(MODULE + ["make-cases", str(data), str(out), "--seed", "7", "--window", "0,200"])
    assert proc.returncode == 0, proc.stderr
    assert "1 case(s)" in proc.stdout and sorted(os.listdir(out)) == ["cases.json", "synth_000.npz"]
    proc = run_cli(MODULE + ["make-cases", str(data), str(out)])
    assert_refused(proc, mentions=["OUT", "already exists; pass --overwrite"])
    assert run_cli(MODULE + ["make-cases", str(data), str(out), "--overwrite"]).returncode == 0


def test_compilation_cache_is_written_by_a_fresh_process(tmp_path):
    code = ("import jax, jax.numpy as jnp\n"
            "from sammed3d_jax.cvpr25.__main__ import enable_compilation_cache\n"
            f"enable_compilation_cache({str(tmp_path / 'cache')!r})\n"
            "print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).sum()))\n")
    proc = run_cli(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "cache").iterdir())  # the compiled program was stored for the next process


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("SAMMED3D_JAX_CACHE", "/somewhere/cache")
    assert default_cache_dir() == "/somewhere/cache"
    monkeypatch.delenv("SAMMED3D_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == os.path.join("/xdg", "sammed3d_jax", "jax")
