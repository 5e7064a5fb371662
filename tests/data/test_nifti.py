"""NIfTI I/O: geometry, axis order, RAS reorientation and its inverse, every kind of bad file."""

import gzip
import itertools

import hypothesis.extra.numpy as hnp
import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sammed3d_jax.data.nifti import (
    DataFileError,
    Geometry,
    read_geometry,
    read_image,
    read_label,
    reorient_from_ras,
    reorient_to_ras,
    write_nifti,
)

# Axis 0 -> anterior (+y), axis 1 -> left (-x), axis 2 -> inferior (-z): a deliberately scrambled file order.
SCRAMBLED = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, -3.0, 7.0], [0, 0, 0, 1]])


def _rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


@st.composite
def geometries(draw):
    """Random permutation/flip of the axes, anisotropic spacing, a mild oblique rotation and an offset."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    spacing = draw(st.lists(st.floats(0.25, 4.0), min_size=3, max_size=3))
    angles = draw(st.lists(st.floats(-0.3, 0.3), min_size=3, max_size=3))
    offset = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=3, max_size=3)))
    m = np.zeros((3, 3))
    for axis, (world, flip, s) in enumerate(zip(perm, flips, spacing)):
        m[world, axis] = flip * s
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angles) @ m
    affine[:3, 3] = offset
    # NIfTI stores the sform in float32: use representable values so that a round trip can be exact. The
    # Geometry is built in the test body (beartype's container sampling uses `random`, which hypothesis
    # forbids inside strategies).
    return affine.astype(np.float32).astype(np.float64), shape


def test_geometry_spacing_orientation_and_equality():
    g = Geometry(SCRAMBLED, (4, 5, 6))
    assert g.spacing_mm == (1.5, 2.0, 3.0)  # array order: column norms
    assert g.orientation == ("A", "L", "I")
    assert g == Geometry(SCRAMBLED.copy(), (4, 5, 6), spacing_mm=(1.5, 2, 3))
    assert hash(g) == hash(Geometry(SCRAMBLED.copy(), (4, 5, 6)))
    assert g != Geometry(SCRAMBLED, (4, 5, 7))
    with pytest.raises(ValueError):
        g.affine[0, 0] = 1.0  # read-only
    with pytest.raises(ValueError, match="disagrees"):
        Geometry(SCRAMBLED, (4, 5, 6), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="three positive sizes"):
        Geometry(SCRAMBLED, (4, 5))


def test_axis_order_is_nibabel_voxel_order(tmp_path):
    """arr[i, j, k] is the voxel at world affine @ (i, j, k, 1): never SimpleITK's reversed (k, j, i)."""
    arr = np.zeros((3, 4, 5), np.float32)
    arr[2, 1, 4] = 7.0
    write_nifti(tmp_path / "a.nii.gz", arr, Geometry(SCRAMBLED, arr.shape))
    back, geom = read_image(tmp_path / "a.nii.gz")
    assert back.shape == (3, 4, 5) and back.dtype == np.float32
    assert back[2, 1, 4] == 7.0
    np.testing.assert_array_equal(geom.affine, SCRAMBLED)
    # After RAS reorientation the marked voxel keeps its world position and axes increase towards R, A, S.
    ras, ras_geom = reorient_to_ras(back, geom)
    assert ras.shape == (4, 3, 5) and ras_geom.orientation == ("R", "A", "S")
    idx = np.argwhere(ras == 7.0)[0]
    np.testing.assert_allclose(ras_geom.affine @ [*idx, 1], SCRAMBLED @ [2, 1, 4, 1])
    # Hand-computed: axis 1 (L) flipped becomes axis 0, axis 0 (A) becomes axis 1, axis 2 (I) flipped stays.
    np.testing.assert_array_equal(ras, arr.transpose(1, 0, 2)[::-1, :, ::-1])
    np.testing.assert_allclose(ras_geom.affine, [[2, 0, 0, 4], [0, 1.5, 0, -4], [0, 0, 3, -5], [0, 0, 0, 1]])
    assert ras_geom.spacing_mm == (2.0, 1.5, 3.0)


@settings(max_examples=40, deadline=None)
@given(geometries())
def test_reorient_round_trip_and_world_positions(affine_shape):
    geom = Geometry(*affine_shape)
    arr = np.arange(np.prod(geom.shape), dtype=np.int32).reshape(geom.shape)
    ras, ras_geom = reorient_to_ras(arr, geom)
    assert ras_geom.shape == ras.shape
    assert ras_geom.orientation == ("R", "A", "S")
    assert sorted(ras_geom.spacing_mm) == pytest.approx(sorted(geom.spacing_mm))
    np.testing.assert_array_equal(reorient_from_ras(ras, ras_geom, geom), arr)
    # Every voxel keeps its world position.
    q = np.argwhere(np.ones(ras.shape, bool))
    p = np.stack(np.unravel_index(ras[tuple(q.T)], geom.shape), axis=1)
    world_ras = ras_geom.affine[:3, :3] @ q.T + ras_geom.affine[:3, 3:]
    world_orig = geom.affine[:3, :3] @ p.T + geom.affine[:3, 3:]
    np.testing.assert_allclose(world_ras, world_orig, atol=1e-9)
    # Channels ride along.
    both = np.stack([arr, -arr], axis=-1)
    ras2, _ = reorient_to_ras(both, geom)
    np.testing.assert_array_equal(reorient_from_ras(ras2, ras_geom, geom), both)


@settings(max_examples=15, deadline=None)
@given(geometries(), st.data())
def test_write_read_round_trip(tmp_path_factory, affine_shape, data):
    geom = Geometry(*affine_shape)
    path = tmp_path_factory.mktemp("rt") / "x.nii.gz"
    image = data.draw(hnp.arrays(np.float32, geom.shape, elements=st.floats(-1e4, 1e4, width=32)))
    write_nifti(path, image, geom)
    back, back_geom = read_image(path)
    np.testing.assert_array_equal(back, image)
    assert back_geom == geom
    label = (image > 0).astype(np.uint8) * 3
    write_nifti(path, label, geom)
    lab, lab_geom = read_label(path)
    assert lab.dtype == np.uint8 and lab_geom == geom
    np.testing.assert_array_equal(lab, label)


def test_write_dtypes_and_qform(tmp_path):
    g = Geometry(SCRAMBLED, (2, 2, 2))
    write_nifti(tmp_path / "b.nii", np.ones((2, 2, 2), bool), g)
    write_nifti(tmp_path / "i.nii", np.full((2, 2, 2), 5, np.int64), g)
    assert nib.load(tmp_path / "b.nii").get_data_dtype() == np.uint8
    assert nib.load(tmp_path / "i.nii").get_data_dtype() == np.int32
    hdr = nib.load(tmp_path / "i.nii").header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 1)
    sheared = SCRAMBLED.copy()
    sheared[0, 2] = 0.5
    write_nifti(tmp_path / "s.nii.gz", np.zeros((2, 2, 2), np.float32), Geometry(sheared, (2, 2, 2)))
    img = nib.load(tmp_path / "s.nii.gz")
    assert int(img.header["qform_code"]) == 0  # a qform cannot hold a shear; the sform keeps it exactly
    np.testing.assert_array_equal(img.affine, sheared)
    with pytest.raises(ValueError, match="does not start with"):
        write_nifti(tmp_path / "c.nii.gz", np.zeros((2, 2, 3)), g)
    with pytest.raises(ValueError, match="must end in"):
        write_nifti(tmp_path / "c.mha", np.zeros((2, 2, 2)), g)


def test_reorient_from_ras_rejects_wrong_geometry():
    g = Geometry(SCRAMBLED, (3, 4, 5))
    ras, ras_geom = reorient_to_ras(np.zeros((3, 4, 5)), g)
    other = Geometry(np.diag([1.0, 1.0, 1.0, 1.0]), (4, 3, 5))
    with pytest.raises(ValueError, match="not the RAS reorientation"):
        reorient_from_ras(ras, other, g)
    with pytest.raises(ValueError, match="does not start with"):
        reorient_from_ras(ras[:-1], ras_geom, g)


def _save(path, data, affine=None, dtype=None, slope=None):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine, dtype=dtype)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, path)
    return path


def test_scaled_image_is_float32(tmp_path):
    raw = np.arange(8, dtype=np.int16).reshape(2, 2, 2)
    path = _save(tmp_path / "s.nii", raw, slope=(0.5, -3.0))
    img, _ = read_image(path)
    assert img.dtype == np.float32
    np.testing.assert_array_equal(img, raw * 0.5 - 3.0)


def test_labels_integer_and_float_stored(tmp_path):
    lab = np.array([0, 1, 2, 7] * 2, np.int16).reshape(2, 2, 2)
    out, _ = read_label(_save(tmp_path / "i.nii.gz", lab))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, lab)
    out, _ = read_label(_save(tmp_path / "f.nii.gz", lab.astype(np.float32)))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, lab)


@pytest.mark.parametrize(
    "data, slope, match",
    [
        (np.array([0, 1, 1.5, 2] * 2, np.float32), None, r"2 non-integer voxels \(e.g. \[1.5\]\)"),
        (np.array([0, 1, np.nan, 2] * 2, np.float32), None, r"2 non-finite voxels \(2 NaN, 0 inf\)"),
        (np.array([0, 1, 3, 2] * 2, np.int16), (0.5, 0.0), r"4 non-integer voxels \(e.g. \[0.5, 1.5\]\)"),
    ],
)
def test_bad_label_values_name_the_file(tmp_path, data, slope, match):
    path = _save(tmp_path / "bad_label.nii.gz", data.reshape(2, 2, 2), slope=slope)
    with pytest.raises(DataFileError, match=match) as info:
        read_label(path)
    assert "bad_label.nii.gz" in str(info.value)


def test_nonfinite_image(tmp_path):
    data = np.ones((2, 2, 2), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[0, 1, 0] = np.nan, np.inf, -np.inf
    path = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataFileError, match=r"nan.nii.gz: 3 non-finite voxels \(1 NaN, 2 inf\)"):
        read_image(path)
    img, _ = read_image(path, allow_nonfinite=True)
    assert np.isnan(img[0, 0, 0]) and np.isinf(img[1, 1, 1])


def test_4d_images(tmp_path):
    with pytest.raises(DataFileError, match=r"four.nii.gz: 4-D image of shape \(2, 2, 2, 3\)"):
        read_image(_save(tmp_path / "four.nii.gz", np.zeros((2, 2, 2, 3), np.float32)))
    # A trailing singleton dimension is squeezed.
    img, geom = read_image(_save(tmp_path / "single.nii.gz", np.ones((2, 3, 4, 1), np.float32)))
    assert img.shape == (2, 3, 4) and geom.shape == (2, 3, 4)
    with pytest.raises(DataFileError, match="expected a 3-D volume, got a 2-D image"):
        read_image(_save(tmp_path / "flat.nii.gz", np.zeros((2, 3), np.float32)))


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(DataFileError, match="nope.nii.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file" * 40)
    with pytest.raises(DataFileError, match="junk.nii.gz: not a readable NIfTI file"):
        read_label(tmp_path / "junk.nii.gz")
    rng = np.random.default_rng(0)
    for name in ("cut.nii.gz", "cut.nii"):
        path = _save(tmp_path / name, rng.random((16, 16, 16)).astype(np.float32))
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        # The header is intact, so the geometry is still readable lazily; the voxel data is not.
        assert read_geometry(path).shape == (16, 16, 16)
        with pytest.raises(DataFileError, match=f"{name}: cannot read voxel data, file truncated or corrupt"):
            read_image(path)
    path = tmp_path / "tiny.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))  # a gzip stream too short for a header
    with pytest.raises(DataFileError, match="tiny.nii.gz: not a readable NIfTI file"):
        read_geometry(path)


@pytest.mark.parametrize("perm, flips", list(itertools.product([(0, 1, 2), (2, 0, 1)], [(1, 1, 1), (-1, 1, -1)])))
def test_orientation_codes(perm, flips):
    m = np.eye(4)
    m[:3, :3] = 0
    for axis, (world, flip) in enumerate(zip(perm, flips)):
        m[world, axis] = flip
    codes = Geometry(m, (2, 2, 2)).orientation
    names = [("L", "R"), ("P", "A"), ("I", "S")]
    assert codes == tuple(names[w][f > 0] for w, f in zip(perm, flips))


def _header_only(path, shape, dtype=np.float32, affine=None):
    """A file holding a NIfTI header (claiming ``shape``) and no voxel data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4) if affine is None else affine, code=1)
    block = header.binaryblock + b"\x00" * 4
    path.write_bytes(gzip.compress(block) if path.name.endswith(".gz") else block)
    return path


@pytest.mark.parametrize("shape", [(1100, 1100, 1100), (10000, 10000, 10000), (200, 200, 200)])
@pytest.mark.parametrize("name", ["bomb.nii.gz", "bomb.nii"])
def test_header_claiming_more_voxels_than_the_file_holds_is_a_bad_file(tmp_path, shape, name):
    import resource

    path = _header_only(tmp_path / name, shape)
    assert path.stat().st_size < 400
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for read in (read_image, read_label):
        with pytest.raises(DataFileError, match=f"{name}: cannot read voxel data, file truncated or corrupt "
                                                r"\(the header claims shape"):
            read(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: nothing was allocated


def test_gzip_size_check_accepts_multi_member_files(tmp_path):
    """A gzip file of several members (bgzip style): the trailer's ISIZE is the last member's, so it is counted."""
    rng = np.random.default_rng(0)
    data = rng.random((20, 20, 20)).astype(np.float32)
    whole = _save(tmp_path / "one.nii", data).read_bytes()
    cut = len(whole) - 1000
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(whole[:cut]) + gzip.compress(whole[cut:]))
    np.testing.assert_array_equal(read_image(path)[0], data)
    path.write_bytes(gzip.compress(whole[:cut]) + gzip.compress(whole[cut:-8]))
    with pytest.raises(DataFileError, match="multi.nii.gz: cannot read voxel data"):
        read_image(path)


@pytest.mark.parametrize("column, value", [(1, 0.0), (2, np.nan), (0, np.inf)])
def test_zero_length_or_nan_affine_axis_is_a_bad_file(tmp_path, column, value):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, column] = value
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.uint8)
    header.set_sform(affine, code=1)  # written raw: nibabel's image class would refuse to encode this affine
    path = tmp_path / "label.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\x00" * 4 + np.ones(64, np.uint8).tobytes()))
    for read in (read_label, read_geometry):
        with pytest.raises(DataFileError, match="label.nii.gz: unusable geometry in the header"):
            read(path)


def test_object_store_paths_read_through_memory_and_stay_checked(tmp_path, monkeypatch):
    """The object-store route (bytes through etils.epath, decoded in memory) reads the same arrays and refuses the
    same bad files; a local folder stands in for the bucket."""
    from sammed3d_jax.data import nifti as nifti_module

    rng = np.random.default_rng(3)
    data = rng.random((7, 6, 5)).astype(np.float32)
    label = (data > 0.5).astype(np.uint8)
    for name in ("img.nii.gz", "img.nii"):
        write_nifti(tmp_path / name, data, Geometry(SCRAMBLED, data.shape))
    write_nifti(tmp_path / "lab.nii.gz", label, Geometry(SCRAMBLED, data.shape))
    local = {name: read_image(tmp_path / name) for name in ("img.nii.gz", "img.nii")}
    monkeypatch.setattr(nifti_module.paths, "is_url", lambda path: True)
    for name, (expected, geom) in local.items():
        got, got_geom = read_image(tmp_path / name)
        np.testing.assert_array_equal(got, expected)
        assert got_geom == geom
    np.testing.assert_array_equal(read_label(tmp_path / "lab.nii.gz")[0], label)
    bomb = _header_only(tmp_path / "bomb.nii.gz", (1100, 1100, 1100))
    with pytest.raises(DataFileError, match="bomb.nii.gz: cannot read voxel data, file truncated or corrupt"):
        read_image(bomb)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file" * 40)
    with pytest.raises(DataFileError, match="junk.nii.gz: not a readable NIfTI file"):
        read_label(tmp_path / "junk.nii.gz")
    with pytest.raises(DataFileError, match="gone.nii.gz: file not found"):
        read_image(tmp_path / "gone.nii.gz")
