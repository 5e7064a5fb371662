"""The shared command-line behaviour: one-line errors with exit codes, output-path refusals."""

import os
import subprocess
import sys

import pytest

from sammed3d_jax import cli


def _run(code: str, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("raise_stmt, expected", [
    ("open('scan.nii.gz')", "error: [Errno 2] No such file or directory: 'scan.nii.gz'"),
    ("raise OSError(28, 'No space left on device')", "error: [Errno 28] No space left on device"),
    ("raise ValueError('--points entry 2: expected i,j,k')", "error: --points entry 2: expected i,j,k"),
    ("raise MemoryError()", "error: out of memory"),
    ("raise ValueError('two\\nlines')", "error: two lines"),
])
def test_guarded_prints_one_line_and_exits_2(raise_stmt, expected):
    code = ("from sammed3d_jax import cli\n"
            "@cli.guarded\n"
            f"def main():\n    {raise_stmt}\n"
            "main()\n")
    proc = _run(code)
    assert proc.returncode == 2
    assert proc.stderr.strip() == expected
    assert "Traceback" not in proc.stderr


def test_guarded_keyboard_interrupt_exits_130_and_traceback_env_reraises():
    code = ("from sammed3d_jax import cli\n"
            "@cli.guarded\n"
            "def main():\n    raise KeyboardInterrupt\n"
            "main()\n")
    proc = _run(code)
    assert proc.returncode == cli.EXIT_INTERRUPTED and proc.stderr.strip() == "error: interrupted"
    code_value_error = code.replace("raise KeyboardInterrupt", "raise ValueError('x')")
    proc = _run(code_value_error, {cli.TRACEBACK_ENV: "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_guarded_lets_bugs_and_exits_through():
    @cli.guarded
    def bug():
        raise TypeError("a bug, not a user error")

    with pytest.raises(TypeError):
        bug()

    @cli.guarded
    def ok():
        return 7

    assert ok() == 7


def test_check_output_path_refusals(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"x")
    with pytest.raises(cli.UsageError, match="is an input of this command"):
        cli.check_output_path(scan, inputs=[scan], overwrite=True)
    with pytest.raises(cli.UsageError, match="is an input of this command"):
        cli.check_output_path(tmp_path / "." / "scan.nii.gz", inputs=[str(scan)], overwrite=True)
    with pytest.raises(cli.UsageError, match="already exists; pass --overwrite"):
        cli.check_output_path(scan)
    assert cli.check_output_path(scan, overwrite=True) == scan
    with pytest.raises(cli.UsageError, match="is a file; expected a folder"):
        cli.check_output_path(scan, is_dir=True, overwrite=True)
    with pytest.raises(cli.UsageError, match="is a folder; expected a file"):
        cli.check_output_path(tmp_path, overwrite=True)
    with pytest.raises(cli.UsageError, match="does not exist"):
        cli.check_output_path(tmp_path / "missing" / "mask.nii.gz")
    # A new folder may be created with missing parents; an empty existing folder is not an overwrite.
    assert cli.check_output_path(tmp_path / "a" / "b", is_dir=True) == tmp_path / "a" / "b"
    empty = tmp_path / "empty"
    empty.mkdir()
    cli.check_output_path(empty, is_dir=True)
    (empty / "f").write_text("1")
    with pytest.raises(cli.UsageError, match="already exists"):
        cli.check_output_path(empty, is_dir=True, name="--workdir")


def test_check_output_path_unwritable_folder(tmp_path, monkeypatch):
    # Root may write anywhere, so the permission answer is stubbed: what is tested is that it is asked and reported.
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(cli.UsageError, match=f"folder {tmp_path} is not writable"):
        cli.check_output_path(tmp_path / "mask.nii.gz")


def test_url_paths_pass_through_unmangled():
    out = cli.check_output_path("gs://bucket/run/params", is_dir=True)
    assert os.fspath(out) == "gs://bucket/run/params"
