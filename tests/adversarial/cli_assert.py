"""Assertions shared by the adversarial replays (tests/adversarial/test_*.py): a refused command exits non-zero
with one line naming the file or argument, prints no traceback, leaves no output behind and leaves its inputs
unchanged. Not a test module."""

import gzip
import hashlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]


def raw_label(path: pathlib.Path, shape: Sequence[int], affine, payload: bytes = b"") -> None:
    """A gzipped uint8 NIfTI written byte by byte, so its header may claim anything (shape, affine) whatever the
    payload holds."""
    import nibabel as nib  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(header.binaryblock + b"\x00" * 4 + payload))


def run_cli(args: Sequence[str], *, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``python *args`` with this checkout first on the path; captures text output."""
    full_env = {k: v for k, v in os.environ.items() if k != "SAMMED3D_TRACEBACK"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(paths: Iterable[str | os.PathLike]) -> dict[str, str | None]:
    """SHA-256 of every file under ``paths`` (None for a missing path), to show inputs are left unchanged."""
    out: dict[str, str | None] = {}
    for p in map(pathlib.Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
    return out


def assert_refused(proc: subprocess.CompletedProcess, *, mentions: Sequence[str] = (),
                   unchanged: Mapping[str, str | None] | None = None,
                   absent: Iterable[str | os.PathLike] = ()) -> str:
    """Checks a refusal; returns the error line.

    Args:
      proc: the finished command.
      mentions: substrings the error line must contain (the file or argument it names).
      unchanged: a :func:`snapshot` taken before the command; the same files must hold the same bytes.
      absent: outputs that must not exist afterwards.
    """
    output = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, f"command succeeded but should have been refused\n{output}"
    assert "Traceback" not in proc.stderr + proc.stdout, f"traceback instead of a one-line error\n{output}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line on stderr\n{output}"
    line = errors[0]
    for text in mentions:
        assert text in line, f"the error line does not name {text!r}: {line!r}"
    if unchanged is not None:
        after = snapshot(pathlib.Path(p) for p in unchanged)
        changed = [p for p in unchanged if after.get(p) != unchanged[p]]
        assert not changed, f"inputs changed: {changed}"
    left = [str(p) for p in absent if pathlib.Path(p).exists()]
    assert not left, f"outputs left behind: {left}"
    return line
