"""Prediction without ground truth: point parsing, voxel and world clicks, windows grown over large targets (exact with
a stand-in model), and the CLI end to end with a tiny checkpoint, including its bad-input messages."""

import jax
import numpy as np
import pytest
from eval_standins import bright_image, box, central_segmenter, geometry, threshold_segmenter

from sammed3d_jax import predict
from sammed3d_jax.checkpoint.params_io import save_params
from sammed3d_jax.checkpoint.torch_convert import abstract_variables
from sammed3d_jax.data.nifti import read_geometry, read_label, write_nifti
from sammed3d_jax.model.config import ModelConfig


def test_parse_points():
    coords, positive = predict.parse_points(" 1,2,3:+ ; 4.5, 5,6:- ;7,8,9:neg; 0,0,0")
    np.testing.assert_array_equal(coords, [[1, 2, 3], [4.5, 5, 6], [7, 8, 9], [0, 0, 0]])
    np.testing.assert_array_equal(positive, [True, False, False, True])
    for text, match in [("1,2:+", "entry 1 '1,2:\\+'"), ("1,2,3;a,b,c", "entry 2 'a,b,c'"),
                        ("1,2,3:x", "entry 1"), (" ; ", "no point"), ("1,2,nan", "entry 1")]:
        with pytest.raises(ValueError, match=match):
            predict.parse_points(text)


def test_voxel_and_world_clicks_map_to_the_same_model_voxel():
    geom = geometry((40, 30, 20), spacing=(1.2, 1.5, 2.5), kind="oblique")
    grid = geometry((32, 40, 33), kind="ras", origin=(-50.0, -40.0, -30.0))
    voxels = np.array([[3.0, 4.0, 5.0], [39.0, 0.0, 19.0]])
    world = (np.c_[voxels, np.ones(2)] @ geom.affine.T)[:, :3]
    a = predict.to_model_grid(voxels, geom, grid)
    b = predict.to_model_grid(world, geom, grid, world=True)
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match=r"scan.nii.gz: point 2 \(voxel \[40.0, 0.0, 0.0\]\).*shape \(40, 30, 20\)"):
        predict.to_model_grid(np.array([[1.0, 1, 1], [40.0, 0, 0]]), geom, grid, source="scan.nii.gz")
    with pytest.raises(ValueError, match=r"point 1 \(world \[0.0, 0.0, 999.0\] mm"):
        predict.to_model_grid(np.array([[0.0, 0.0, 999.0]]), geom, grid, world=True)


def test_small_target_one_window_exact_in_input_geometry():
    shape = (40, 36, 30)
    geom = geometry(shape, kind="lps")
    target = box(shape, (10, 12, 5), (22, 20, 18))
    image = bright_image(target)
    result = predict.predict_mask(threshold_segmenter(), image, geom, np.array([[15.0, 15.0, 10.0]]),
                                  np.array([True]))
    assert result.mask.shape == shape and len(result.windows) == 1 and result.complete
    np.testing.assert_array_equal(result.mask, target)
    world = (np.array([[15.0, 15.0, 10.0, 1.0]]) @ geom.affine.T)[:, :3]
    again = predict.predict_mask(threshold_segmenter(), image, geom, world, np.array([True]), world=True)
    np.testing.assert_array_equal(again.mask, target)


def test_large_target_is_covered_by_grown_windows():
    shape = (100, 36, 30)
    geom = geometry(shape, kind="permuted")
    target = box(shape, (8, 12, 10), (92, 22, 20))  # 84 voxels long: about 2.6 windows of 32
    image = bright_image(target)
    click = np.array([[20.0, 16.0, 14.0]])
    single = predict.predict_mask(threshold_segmenter(), image, geom, click, np.array([True]), tile=False)
    assert len(single.windows) == 1 and 0 < single.mask.sum() < target.sum() and not (single.mask & ~target).any()
    grown = predict.predict_mask(threshold_segmenter(), image, geom, click, np.array([True]))
    assert len(grown.windows) >= 4 and grown.complete
    np.testing.assert_array_equal(grown.mask, target)
    capped = predict.predict_mask(threshold_segmenter(), image, geom, click, np.array([True]), max_windows=2)
    assert len(capped.windows) == 2 and not capped.complete
    # Clicks at both ends (farther apart than a window): the clicks' extent is tiled from the start.
    ends = np.array([[10.0, 16.0, 14.0], [90.0, 16.0, 14.0]])
    tiled = predict.predict_mask(threshold_segmenter(), image, geom, ends, np.array([True, True]))
    np.testing.assert_array_equal(tiled.mask, target)
    with pytest.raises(ValueError, match="span more than one"):
        predict.predict_mask(threshold_segmenter(), image, geom, ends, np.array([True, True]), tile=False)
    with pytest.raises(ValueError, match="at least one positive"):
        predict.predict_mask(threshold_segmenter(), image, geom, click, np.array([False]))


def test_first_window_is_recentred_on_its_prediction():
    shape = (60, 50, 40)
    geom = geometry(shape, kind="lps")
    target = box(shape, (20, 15, 10), (36, 31, 26))  # 16^3: a 14-voxel ball covers it only when centred on it
    image = bright_image(target)
    corner = np.array([[21.0, 16.0, 11.0]])
    fixed = predict.predict_mask(central_segmenter(), image, geom, corner, np.array([True]), recentre=0)
    assert fixed.recentred == 0 and fixed.mask.sum() < 0.6 * target.sum()
    moved = predict.predict_mask(central_segmenter(), image, geom, corner, np.array([True]), recentre=2)
    assert moved.recentred == 2 and len(moved.windows) == 1
    np.testing.assert_array_equal(moved.mask, target)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = ModelConfig.variant("tiny")
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), abstract_variables(cfg))
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(directory, variables, cfg, {"source": "test"})
    return directory


def test_cli_end_to_end_voxel_and_world(tiny_checkpoint, tmp_path, capsys):
    shape = (48, 40, 24)
    geom = geometry(shape, spacing=(1.1, 1.2, 2.6), kind="oblique")
    rng = np.random.default_rng(0)
    target = box(shape, (10, 12, 5), (30, 28, 15))
    image = (bright_image(target) + 0.1 * rng.random(shape)).astype(np.float32)
    write_nifti(tmp_path / "scan.nii.gz", image, geom)
    points = np.array([[20.0, 20.0, 10.0], [5.0, 5.0, 3.0]])
    world = (np.c_[points, np.ones(2)] @ geom.affine.T)[:, :3]
    outs = []
    for text, extra, name in [("20,20,10:+;5,5,3:-", [], "a.nii.gz"),
                              (";".join(f"{x:.6f},{y:.6f},{z:.6f}:{s}" for (x, y, z), s in zip(world, "+-")),
                               ["--world"], "b.nii.gz")]:
        code = predict.main(["--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "scan.nii.gz"),
                             "--points", text, "--out", str(tmp_path / name), *extra])
        assert code == 0, capsys.readouterr().err
        mask, mask_geom = read_label(tmp_path / name)
        assert mask_geom == read_geometry(tmp_path / "scan.nii.gz") and mask.shape == shape
        assert set(np.unique(mask)) <= {0, 1}
        outs.append(mask)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--points", "99,1,1:+"], "point 1 (voxel [99.0, 1.0, 1.0]) lies outside the volume of shape (20, 20, 20)"),
    (["--points", "1,1"], "--points: entry 1"),
    (["--image", "missing.nii.gz"], "missing.nii.gz: file not found"),
    (["--out", "mask.png"], "--out mask.png: file name must end in .nii or .nii.gz"),
    (["--checkpoint", "nowhere"], "nowhere: no such checkpoint"),
])
def test_cli_bad_input_messages(tiny_checkpoint, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "scan.nii.gz", np.ones((20, 20, 20), np.float32), geometry((20, 20, 20)))
    base = {"--checkpoint": str(tiny_checkpoint), "--image": "scan.nii.gz", "--points": "5,5,5:+",
            "--out": "mask.nii.gz"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    assert predict.main([x for kv in base.items() for x in kv]) == 2
    assert message in capsys.readouterr().err
