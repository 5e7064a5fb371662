"""Offline preparation end to end: store contents, world-space consistency, resume, bad cases, options, CLI."""

import json
import os
import shutil

import numpy as np
import pytest

from sammed3d_jax.data import cache, manifest, nifti, pipeline, prepare, synthetic, transforms

SHAPE = (36, 32, 20)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return synthetic.make_synthetic_dataset(tmp_path_factory.mktemp("src") / "synth", cases=3, seed=11, shape=SHAPE)


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    summary = prepare.prepare_dataset(source, out, workers=2, progress=False)
    return out, summary


def _mtimes(root):
    return {p: os.stat(p).st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_store_contents_match_source_in_world_space(source, prepared):
    out, summary = prepared
    assert summary == {"cases": 3, "prepared": 3, "reused": 0, "failed_cases": 0, "records": 9, "skipped": 0,
                       "skip_reasons": {}}
    meta, records = cache.read_index(out)
    assert meta["spacing_mm"] == [1.5] * 3 and meta["min_target_mm3"] == 10.0
    assert len({r.image for r in records}) == 3 and len(list(out.rglob("image.npy"))) == 3  # one image per case
    assert [r.target for r in records] == ["ellipsoid", "tube", "blob"] * 3
    for rec in records:
        image, label = np.load(out / rec.image), np.load(out / rec.label)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape == rec.shape
        assert set(np.unique(label)) == {0, 1} and int(label.sum()) == rec.foreground_voxels
        idx = np.argwhere(label)
        assert rec.bbox == tuple((int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0)))
        geom = nifti.Geometry(np.array(rec.affine), rec.shape)
        assert geom.orientation == ("R", "A", "S") and np.allclose(geom.spacing_mm, 1.5)
        # The same image, independently: resample on the file grid, then reorient (transforms' documented order).
        src_image, src_geom = nifti.read_image(rec.source_image)
        expected, g = transforms.resample_to_spacing(src_image, src_geom, (1.5,) * 3, order=1)
        expected, g = nifti.reorient_to_ras(expected, g)
        np.testing.assert_array_equal(image, expected)
        np.testing.assert_allclose(np.array(rec.affine), g.affine)
        # The target sits at the same world position as in the source label map (centroid within one voxel).
        src_label, label_geom = nifti.read_label(rec.source_label)
        src_idx = np.argwhere(src_label == rec.label_value)
        world = lambda ijk, aff: ijk @ aff[:3, :3].T + aff[:3, 3]  # noqa: E731
        src_centre = world(src_idx, label_geom.affine).mean(0)
        assert np.linalg.norm(world(idx, geom.affine).mean(0) - src_centre) < 1.5
        assert rec.source_volume_mm3 == pytest.approx(len(src_idx) * np.prod(label_geom.spacing_mm))


def test_resume_does_nothing_then_redoes_only_changed_cases(source, prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    before = _mtimes(out)
    summary = prepare.prepare_dataset(source, out, workers=1, progress=False)
    assert summary["prepared"] == 0 and summary["reused"] == 3 and summary["records"] == 9
    assert _mtimes(out) == before  # not one file rewritten, index included
    changed_source = tmp_path / "src"
    shutil.copytree(source, changed_source)
    out2 = tmp_path / "copy2"
    prepare.prepare_dataset(changed_source, out2, workers=1, progress=False)
    label = changed_source / "labelsTr" / "synth_001.nii.gz"
    os.utime(label, ns=(os.stat(label).st_atime_ns, os.stat(label).st_mtime_ns + 10**9))
    summary = prepare.prepare_dataset(changed_source, out2, workers=1, progress=False)
    assert summary["prepared"] == 1 and summary["reused"] == 2


def test_corrupt_case_is_skipped_counted_and_not_retried(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    image = broken / "imagesTr" / "synth_002_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:300])  # truncated gzip
    out = tmp_path / "out"
    summary = prepare.prepare_dataset(broken, out, workers=1, progress=False)
    assert summary["failed_cases"] == 1 and summary["records"] == 6 and summary["skipped"] == 3
    assert sum(summary["skip_reasons"].values()) == 3
    meta, records = cache.read_index(out)
    assert all("synth_002" not in r.id for r in records)
    assert all("synth_002_0000.nii.gz" in s["reason"] for s in meta["skipped"])
    assert len(list((out / "failed").iterdir())) == 1
    again = prepare.prepare_dataset(broken, out, workers=1, progress=False)
    assert again["prepared"] == 0 and again["failed_cases"] == 1
    retried = prepare.prepare_dataset(broken, out, workers=1, progress=False, retry_failed=True)
    assert retried["prepared"] == 1 and retried["failed_cases"] == 1


def test_small_target_option_and_manifest_source(source, prepared, tmp_path):
    records = manifest.discover(source)
    manifest.write_manifest(tmp_path / "m.json", records[:3])  # first case only
    summary = prepare.prepare_dataset(tmp_path / "m.json", tmp_path / "big", workers=1, progress=False,
                                      min_target_mm3=1e9)
    assert summary["records"] == 0 and summary["skip_reasons"] == {"target below min_target_mm3": 3}
    summary = prepare.prepare_dataset(tmp_path / "m.json", tmp_path / "all", workers=1, progress=False,
                                      min_target_mm3=0)
    _, from_manifest = cache.read_index(tmp_path / "all")
    _, from_folder = cache.read_index(prepared[0])
    assert [r.id for r in from_manifest] == [r.id for r in from_folder[:3]]
    with pytest.raises(ValueError, match="spacing"):
        prepare.prepare_dataset(source, tmp_path / "x", spacing_mm=(1.5, 0.0, 1.5))


def test_cli_and_training_batches_from_prepared_store(source, prepared, capsys):
    out, _ = prepared
    assert prepare.main([str(source), str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "3 cases (0 prepared now, 3 already done, 0 failed), 9 targets indexed, 0 skipped" in text
    it = pipeline.build_train_iterator(str(out), crop_size=32, global_batch_size=2, rows=range(2), seed=0, min_crop_foreground=50)
    batch = next(it)
    assert batch["image"].shape == (2, 32, 32, 32, 1) and np.all(batch["label"].reshape(2, -1).sum(1) > 50)
    assert json.loads(json.dumps(it.get_state()))["next_batch"] == 1
