"""Memory bombs against the checkpoint reader: tiny files that ask for gigabytes must be refused before allocating.

Each bomb is a few hundred bytes to a few hundred KB. The reader runs in a child process under an address-space
limit (so a regression fails here instead of exhausting the shared machine) and reports its peak resident memory
after each file: every bomb must be refused with a message naming the file while the peak stays near the
interpreter's own. Two bombs are also replayed through the ``convert`` command line.
"""

import json
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from cli_assert import REPO, assert_refused, run_cli, snapshot

GIB = 1 << 30
PEAK_LIMIT_MB = 150  # the child's interpreter + numpy is about 50 MB; the reader's smallest budget is 64 MiB


# --- hand-assembled protocol-2 pickles ----------------------------------------------------------------------------
def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(n: int) -> bytes:
    raw = pickle.encode_long(n)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _pkl(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _range(n: int) -> bytes:
    return _call(_global("builtins", "range"), _int(0), _int(n))


def _storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    # persistent id ("storage", type, key, location, numel), then BINPERSID
    return _tuple(_str("storage"), _global("torch", kind), _str(key), _str("cpu"), _int(numel)) + b"Q"


def _tensor(storage: bytes, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), storage, _int(0), _tuple(*map(_int, size)),
                 _tuple(*map(_int, stride)), b"\x89", _call(_global("collections", "OrderedDict")))


def _state_dict(tensor: bytes) -> bytes:
    return _pkl(b"}" + _str("w") + tensor + b"s")  # {"w": tensor}


def _write_pth(path, data_pkl: bytes, records: dict[str, bytes] | None = None, deflate: set[str] = frozenset()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in (records or {}).items():
            method = zipfile.ZIP_DEFLATED if key in deflate else zipfile.ZIP_STORED
            zf.writestr(f"archive/data/{key}", raw, compress_type=method)
    return path


def _zeros_member(zf: zipfile.ZipFile, name: str, nbytes: int, header: bytes = b"") -> None:
    """A deflated member of ``header`` + ``nbytes`` zeros, streamed (the zeros are never held in memory)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(16 << 20)
    with zf.open(info, "w", force_zip64=True) as f:
        f.write(header)
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    n = 3 * 10**7
    out = {
        # Pickles of allowed types that expand a lazy range: 2-5 GB before the reader bounded them.
        "set_range.pth": _write_pth(root / "set_range.pth", _pkl(_call(_global("builtins", "set"), _range(n)))),
        "frozenset_range.pth": _write_pth(root / "frozenset_range.pth",
                                          _pkl(_call(_global("__builtin__", "frozenset"), _range(n)))),
        "counter_range.pth": _write_pth(root / "counter_range.pth",
                                        _pkl(_call(_global("collections", "Counter"), _range(n)))),
        "size_range.pth": _write_pth(root / "size_range.pth", _pkl(_call(_global("torch", "Size"), _range(10**9)))),
        # numpy.ndarray((n,), "O"): an object array of n pointers.
        "object_array.pth": _write_pth(root / "object_array.pth", _pkl(_call(
            _global("numpy", "ndarray"), _tuple(_int(n)), _str("O")))),
        # One stored float viewed 2**31 times with stride 0: an 8 GiB copy.
        "stride0.pth": _write_pth(root / "stride0.pth", _state_dict(_tensor(_storage("0", 1), (2**31,), (0,))),
                                  {"0": b"\x00" * 4}),
        # A storage that claims 2**31 floats from a 4-byte record.
        "short_record.pth": _write_pth(root / "short_record.pth",
                                       _state_dict(_tensor(_storage("0", 2**31), (2**31,), (1,))), {"0": b"\x00" * 4}),
    }
    # A deflated record of 256 MiB of zeros (about 256 KB on disk) that the pickle legitimately asks for.
    numel = (256 << 20) // 4
    path = root / "zip_bomb.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _state_dict(_tensor(_storage("0", numel), (numel,), (1,))))
        _zeros_member(zf, "archive/data/0", numel * 4)
    out["zip_bomb.pth"] = path
    # The same as a compressed .npz, and an .npz whose header claims 10**10 floats in a 200-byte member.
    path = root / "zip_bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        _zeros_member(zf, "w.npy", numel * 4, _npy_header((numel,)))
    out["zip_bomb.npz"] = path
    path = root / "header_lie.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("w.npy", _npy_header((10**10,)) + b"\x00" * 64)
    out["header_lie.npz"] = path
    assert all(p.stat().st_size < (1 << 20) for p in out.values())
    return out


_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a regression fails here, not on the shared machine
from sammed3d_jax.checkpoint.pth_reader import CheckpointError, read_state_dict
results = {}
for path in sys.argv[1:]:
    try:
        read_state_dict(path)
        outcome = "loaded"
    except CheckpointError as e:
        outcome = "refused: " + str(e)
    except MemoryError:
        outcome = "MemoryError"
    # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, inherited through fork).
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    results[path] = (outcome, peak_kb / 1024)
print(json.dumps(results))
"""


def test_bombs_are_refused_before_allocating(bombs):
    paths = [str(p) for p in bombs.values()]
    env = {"PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *paths], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    expected = {
        "set_range.pth": "refusing to build a set from a range",
        "frozenset_range.pth": "refusing to build a frozenset from a range",
        "counter_range.pth": "refusing to build a Counter from a range",
        "size_range.pth": "torch.Size must be a list or tuple of at most 32 integers",
        "object_array.pth": "'_Marker' object is not callable",
        "stride0.pth": "a tensor of shape (2147483648,) needs 8,589,934,592 bytes",
        "short_record.pth": "record archive/data/0 holds 4 bytes, expected 8,589,934,592",
        "zip_bomb.pth": "record archive/data/0 (268,435,456 bytes inflated from",
        "zip_bomb.npz": "record w.npy (268,435,584 bytes inflated from",
        "header_lie.npz": "member w.npy declares shape (10000000000,) float32",
    }
    for name, text in expected.items():
        outcome, peak_mb = results[str(bombs[name])]
        assert outcome.startswith(f"refused: {bombs[name]}"), f"{name}: {outcome}"
        assert text in outcome, f"{name}: {outcome}"
        assert peak_mb < PEAK_LIMIT_MB, f"{name}: peak resident memory {peak_mb:.0f} MB"


@pytest.mark.parametrize("name", ["set_range.pth", "zip_bomb.pth"])
def test_convert_refuses_a_bomb_in_one_line(bombs, tmp_path, name):
    before = snapshot([bombs[name]])
    out = tmp_path / "converted"
    proc = run_cli(["-m", "sammed3d_jax.convert", bombs[name], out], timeout=180)
    line = assert_refused(proc, mentions=[str(bombs[name])], unchanged=before, absent=[out])
    assert "refusing" in line
