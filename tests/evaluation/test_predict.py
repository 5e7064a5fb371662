"""Prediction without ground truth: point parsing, voxel and world clicks, windows grown over large targets (exact with
a stand-in model), and the CLI end to end with a tiny checkpoint, including its bad-input messages."""

import jax
import numpy as np
import pytest
from eval_standins import S, RecordingSegmenter, bright_image, box, central_segmenter, geometry, threshold_segmenter

from sammed3d_jax import predict
from sammed3d_jax.checkpoint.params_io import save_params
from sammed3d_jax.checkpoint.torch_convert import abstract_variables
from sammed3d_jax.data.nifti import read_image, read_label, write_nifti
from sammed3d_jax.evaluation import inference
from sammed3d_jax.model.config import ModelConfig


def _status(argv) -> int:
    """predict.main's exit status: 0 returned, or the code of the SystemExit it raised for bad input."""
    try:
        return predict.main(argv)
    except SystemExit as e:
        return e.code


def test_parse_points():
    coords, positive = predict.parse_points(" 1,2,3:+ ; 4.5, 5,6:- ;7,8,9:neg; 0,0,0")
    np.testing.assert_array_equal(coords, [[1, 2, 3], [4.5, 5, 6], [7, 8, 9], [0, 0, 0]])
    np.testing.assert_array_equal(positive, [True, False, False, True])
    for text, match in [("1,2:+", "entry 1 '1,2:\\+'"), ("1,2,3;a,b,c", "entry 2 'a,b,c'"),
                        ("1,2,3:x", "entry 1"), (" ; ", "no point"), ("1,2,nan", "entry 1")]:
        with pytest.raises(ValueError, match=match) as err:
            predict.parse_points(text)
        # The error uses the words of the --points help: 'i,j,k' entries separated by ';'.
        assert "'i,j,k" in str(err.value) and "separated by ';'" in str(err.value)
    assert "'i,j,k:+' entries separated by ';'" in predict.POINTS_HELP


def test_voxel_and_world_clicks_map_to_the_same_model_voxel():
    geom = geometry((40, 30, 20), spacing=(1.2, 1.5, 2.5), kind="oblique")
    grid = geometry((32, 40, 33), kind="ras", origin=(-50.0, -40.0, -30.0))
    voxels = np.array([[3.0, 4.0, 5.0], [39.0, 0.0, 19.0]])
    world = (np.c_[voxels, np.ones(2)] @ geom.affine.T)[:, :3]
    a = predict.to_model_grid(voxels, geom, grid)
    b = predict.to_model_grid(world, geom, grid, world=True)
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match=r"--points: point 2 \(voxel \[40.0, 0.0, 0.0\]\).*shape \(40, 30, 20\) \(scan"):
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
    _, scan_geom = read_image(tmp_path / "scan.nii.gz")
    points = np.array([[20.0, 20.0, 10.0], [5.0, 5.0, 3.0]])
    world = (np.c_[points, np.ones(2)] @ geom.affine.T)[:, :3]
    outs = []
    for text, extra, name in [("20,20,10:+;5,5,3:-", [], "a.nii.gz"),
                              (";".join(f"{x:.6f},{y:.6f},{z:.6f}:{s}" for (x, y, z), s in zip(world, "+-")),
                               ["--world"], "b.nii.gz")]:
        code = _status(["--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "scan.nii.gz"),
                        "--points", text, "--out", str(tmp_path / name), *extra])
        assert code == 0, capsys.readouterr().err
        mask, mask_geom = read_label(tmp_path / name)
        assert mask_geom == scan_geom and mask.shape == shape
        assert set(np.unique(mask)) <= {0, 1}
        outs.append(mask)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz", "scan.nii.gz"]  # no partial files


@pytest.mark.parametrize("args, message", [
    (["--points", "99,1,1:+"], "point 1 (voxel [99.0, 1.0, 1.0]) lies outside the volume of shape (20, 20, 20)"),
    (["--points", "1,1"], "--points: entry 1 '1,1' is not 'i,j,k'"),
    (["--image", "missing.nii.gz"], "--image missing.nii.gz: does not exist"),
    (["--out", "mask.png"], "--out mask.png: the file name must end in .nii or .nii.gz"),
    (["--checkpoint", "nowhere"], "--checkpoint nowhere: does not exist"),
    (["--out", "scan.nii.gz"], "--out scan.nii.gz is an input of this command"),
    (["--out", "scan.nii.gz", "--overwrite"], "--out scan.nii.gz is an input of this command"),
    (["--out", "old.nii.gz"], "--out old.nii.gz already exists; pass --overwrite"),
    (["--out", "no/such/dir/mask.nii.gz"], "folder no/such/dir does not exist"),
    (["--max-windows", "0"], "--max-windows must be at least 1, got 0"),
    (["--recentre", "-1"], "--recentre must be at least 0, got -1"),
    (["--config", "bad.json"], "--config bad.json: not a valid model config JSON"),
])
def test_cli_bad_input_is_refused_before_the_work(tiny_checkpoint, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "scan.nii.gz", np.ones((20, 20, 20), np.float32), geometry((20, 20, 20)))
    (tmp_path / "old.nii.gz").write_bytes(b"an earlier result")
    (tmp_path / "bad.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    base = {"--checkpoint": str(tiny_checkpoint), "--image": "scan.nii.gz", "--points": "5,5,5:+",
            "--out": "mask.nii.gz"}
    flags = [a for a in args if a == "--overwrite"]
    values = [a for a in args if a != "--overwrite"]
    base.update(dict(zip(values[::2], values[1::2], strict=True)))
    assert _status([x for kv in base.items() for x in kv] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing changed


def test_cli_overwrite_replaces_an_earlier_mask(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image = bright_image(box((40, 40, 40), (10, 10, 10), (30, 30, 30)))
    write_nifti(tmp_path / "scan.nii.gz", image, geometry((40, 40, 40)))
    (tmp_path / "mask.nii.gz").write_bytes(b"an earlier result")
    argv = ["--checkpoint", str(tiny_checkpoint), "--image", "scan.nii.gz", "--points", "20,20,20:+", "--out",
            "mask.nii.gz", "--overwrite"]
    assert _status(argv) == 0, capsys.readouterr().err
    mask, _ = read_label(tmp_path / "mask.nii.gz")
    assert mask.shape == (40, 40, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "scan.nii.gz"]


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_each_window_receives_its_clicks_in_its_own_coordinates(kind):
    # A stand-in that reports what it was given: every click must reach its window in window-local voxels, on the
    # very voxel the user clicked (the image has a unique bright peak there), with its sign.
    shape = (100, 50, 40)
    geom = geometry(shape, kind=kind)
    image = (1.0 + 0.01 * np.arange(shape[0])[:, None, None] + np.zeros(shape)).astype(np.float32)
    clicks = np.array([[12.0, 30.0, 25.0], [18.0, 26.0, 22.0], [88.0, 20.0, 15.0]])
    positive = np.array([True, False, True])
    for c in clicks.astype(int):
        image[tuple(c)] = 50.0
    seg = RecordingSegmenter()
    result = predict.predict_mask(seg, image, geom, clicks, positive, edge_margin=1)
    received = [(w, p, s) for w, (_, got) in enumerate(seg.windows) for p, s in got]
    user = [(w, p, s) for w, p, s in received if np.isin(p, np.arange(S)).all() and seg.windows[w][0][
        tuple(np.round(p).astype(int))] == seg.windows[w][0].max()]
    assert len(seg.windows) >= 2 and len(result.windows) == len(seg.windows)
    # Each user click reached exactly the windows that contain it, on the peak, with its sign.
    for n, (c, s) in enumerate(zip(clicks, positive, strict=True)):
        model = predict.to_model_grid(c[None], geom, inference.resample_case(image, geom, None).geom)[0]
        hits = [(w, p) for w, p, sign in user if sign == s and np.allclose(p, model - result.windows[w])]
        inside = [w for w, start in enumerate(result.windows) if np.all((model >= start) & (model < np.add(start, S)))]
        assert [w for w, _ in hits] == inside and inside, f"click {n}: {received}"
    # A window on the far click never sees the near clicks: clicks are not broadcast in whole-image coordinates.
    assert all(np.all((p >= 0) & (p <= S - 1)) for _, p, _ in received)
