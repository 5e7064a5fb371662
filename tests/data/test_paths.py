"""User paths: object-store URLs survive every operation unmangled; local paths behave like os.path."""

import os

import pytest

from sammed3d_jax.data import paths, prepare


def test_urls_are_never_mangled():
    assert paths.absolute("gs://bucket/data/../x") == "gs://bucket/data/../x"
    assert paths.relative("gs://bucket/ds/imagesTr/a.nii.gz", "gs://bucket/ds") == "imagesTr/a.nii.gz"
    assert paths.relative("gs://bucket/other/a.nii.gz", "gs://bucket/ds") == "../other/a.nii.gz"
    assert paths.join("gs://bucket/ds", "../m/x.nii.gz") == "gs://bucket/m/x.nii.gz"
    assert paths.join("gs://bucket/ds", "gs://elsewhere/y") == "gs://elsewhere/y"
    assert paths.relative("/local/a", "gs://bucket") == "/local/a"  # different stores: no relative form


def test_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("a/../b") == os.fspath(tmp_path / "b")
    assert paths.relative(tmp_path / "ds" / "img.nii.gz", "ds") == "img.nii.gz"
    assert paths.join(tmp_path / "ds", "../x.nii.gz") == os.fspath(tmp_path / "x.nii.gz")
    assert paths.join("ds", "/abs/y") == "/abs/y"


def test_npy_store_on_object_storage_is_refused_before_any_work(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(ValueError, match="OUT gs://bucket/prepared: the npy store is memory-mapped"):
        prepare.prepare_dataset(tmp_path / "ds", "gs://bucket/prepared")
