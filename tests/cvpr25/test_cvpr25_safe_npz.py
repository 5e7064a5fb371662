"""Restricted reading of the challenge's .npz files: the official layouts of boxes/clicks/clicks_order read as plain
data, and any pickled object outside the allow-list is refused before it can run."""

import os
import zipfile

import numpy as np
import pytest

from sammed3d_jax.cvpr25 import safe_npz


class _Exploit:
    """Unpickling this would run a shell command (the attack a challenge file could carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save(path, **arrays):
    np.savez_compressed(path, **arrays)  # numpy pickles object arrays itself, as the official scripts do
    return path


def test_official_prompt_layouts_read_as_plain_data(tmp_path):
    boxes = [{"z_min": np.int64(3), "z_max": np.int64(9), "z_mid": np.int64(6), "z_mid_x_min": np.int64(1),
              "z_mid_y_min": np.int64(2), "z_mid_x_max": np.int64(7), "z_mid_y_max": np.int64(8)}]
    clicks = [{"fg": [[np.int64(4), np.int64(5), np.int64(6)]], "bg": [list(np.argwhere(np.eye(3))[0])]}]
    path = _save(tmp_path / "c.npz", imgs=np.zeros((2, 3, 4), np.uint8), spacing=np.array([0.8, 0.8, 2.5]),
                 boxes=boxes, clicks=clicks, clicks_order=[["fg", "bg"], ["fg", None]],
                 order_plain=[["fg", "bg"], ["bg", "fg"]], floats=np.float32(1.5))
    data = safe_npz.read_npz(path)
    assert data["imgs"].dtype == np.uint8 and data["imgs"].shape == (2, 3, 4)
    assert data["boxes"] == [{"z_min": 3, "z_max": 9, "z_mid": 6, "z_mid_x_min": 1, "z_mid_y_min": 2,
                              "z_mid_x_max": 7, "z_mid_y_max": 8}]
    assert type(data["boxes"][0]["z_min"]) is int
    assert data["clicks"] == [{"fg": [[4, 5, 6]], "bg": [[0, 0]]}]
    assert data["clicks_order"] == [["fg", "bg"], ["fg", None]]  # object 2-D array (holds None)
    assert data["order_plain"].tolist() == [["fg", "bg"], ["bg", "fg"]]  # equal lengths, no None: a str array
    assert float(data["floats"]) == 1.5


def test_ragged_lists_and_our_writer_round_trip(tmp_path):
    order = [["fg"], ["bg", None, "fg"], []]
    safe_npz.write_npz(tmp_path / "o.npz", clicks_order=safe_npz.object_array(order), segs=np.ones((2, 2, 2)))
    data = safe_npz.read_npz(tmp_path / "o.npz")
    assert data["clicks_order"] == order and data["segs"].sum() == 8
    assert sorted(os.listdir(tmp_path)) == ["o.npz"]  # the temporary file was renamed away
    safe_npz.write_npz(tmp_path / "o.npz", segs=np.zeros((1, 1, 1)))  # replacing an existing output works
    assert set(safe_npz.read_npz(tmp_path / "o.npz")) == {"segs"}


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _save(tmp_path / "evil.npz", imgs=np.zeros((2, 2, 2)),
                 boxes=np.array([_Exploit(marker)], dtype=object))
    with pytest.raises(safe_npz.UnsafeNpzError, match=r"evil.npz \(boxes\): refusing to load global "
                                                      r"'(posix|os|nt)\.system'"):
        safe_npz.read_npz(path)
    assert not marker.exists()


@pytest.mark.parametrize("value, what", [
    ({1, 2}, "holds a set"),                        # protocol 4 pickles sets natively; not plain data
    (b"raw", "holds a bytes"),                     # allowed by pickle, not plain data
    ({1: "x"}, "dict keys must be strings"),
    (np.array([1 + 2j]), "holds a ndarray"),       # complex arrays are not prompt data
])
def test_non_plain_values_are_refused(tmp_path, value, what):
    path = _save(tmp_path / "bad.npz", clicks=np.array([value, None], dtype=object))
    with pytest.raises(safe_npz.UnsafeNpzError, match=what):
        safe_npz.read_npz(path)


def test_pickled_state_on_a_plain_object_is_refused(tmp_path):
    # PROTO 3, EMPTY_DICT, EMPTY_DICT, BUILD, STOP: state applied to a dict (how a pickle patches an object).
    header = np.lib.format.header_data_from_array_1_0(np.empty(1, dtype=object))
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as zf, zf.open("clicks.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\x80\x03}}b.")
    with pytest.raises(safe_npz.UnsafeNpzError, match=r"h.npz \(clicks\): refusing to apply pickled state to a dict"):
        safe_npz.read_npz(tmp_path / "h.npz")


@pytest.mark.parametrize("content, match", [
    (b"not a zip", "not a readable .npz file"),
    (None, "no such file"),
])
def test_unreadable_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "broken.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(safe_npz.NpzError, match=f"broken.npz.*{match}|{match}"):
        safe_npz.read_npz(path)


def test_truncated_case_is_reported(tmp_path):
    path = _save(tmp_path / "t.npz", imgs=np.arange(4096, dtype=np.float32).reshape(16, 16, 16))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(safe_npz.NpzError, match="t.npz"):
        safe_npz.read_npz(path)
