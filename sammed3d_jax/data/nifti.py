"""NIfTI reading, writing and RAS reorientation (nibabel only).

Owns: the one place where volumes enter and leave the package as files, and the axis-order convention of
``shapes.py`` as code. An array returned here is indexed in nibabel voxel order ``(i, j, k)`` (never SimpleITK's
reversed ``(z, y, x)``); ``Geometry.spacing_mm`` is in that same array order. ``reorient_to_ras`` permutes and
flips the axes (no interpolation) so that axis 0, 1, 2 point to Right, Anterior, Superior, as torchio's
``ToCanonical`` (``nib.as_closest_canonical``) does; ``reorient_from_ras`` undoes it exactly.

Paths may be local or object-store URLs (``gs://...``, read whole through ``etils.epath`` and decoded from
memory). A header is checked against the file's size before any voxel buffer is allocated.

Bad files raise ``DataFileError`` (a ``ValueError``) whose message starts with the file name; ``.problem``
holds the message without the path so that ``data/check.py`` can tabulate it.

Signature note for other owners: ``Geometry(affine, shape)`` computes ``spacing_mm`` from the affine (column
norms, as torchio does); passing ``spacing_mm`` is allowed but must agree with the affine.

Must not import: jax, flax, model/, training/.
"""

import dataclasses
import gzip
import io
import os
import zlib

import nibabel as nib
import numpy as np
from etils import epath
from jaxtyping import Float, Integer, Shaped
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError

from sammed3d_jax.data import paths

PathLike = str | os.PathLike

# What nibabel, gzip and zlib raise on unreadable, truncated or corrupt files.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


class DataFileError(ValueError):
    """A data file that cannot be used; ``str()`` names the file, ``problem`` is the message alone."""

    def __init__(self, path: PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Where a voxel array sits in world (RAS+ mm) space.

    Attributes:
        affine: 4x4 float64 voxel-index -> world-mm matrix (nibabel convention, RAS+ world), read-only.
        shape: the three spatial sizes, array order.
        spacing_mm: voxel size per array axis (column norms of ``affine[:3, :3]``, as torchio computes it).
            Optional at construction; if given it must agree with the affine.
    """

    affine: Float[np.ndarray, "4 4"]
    shape: tuple[int, ...]
    spacing_mm: tuple[float | int, ...] | None = None

    def __post_init__(self):
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"Geometry: affine must be a finite 4x4 matrix, got {self.affine!r}")
        affine.setflags(write=False)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"Geometry: shape must be three positive sizes, got {self.shape!r}")
        spacing = tuple(float(s) for s in np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0)))
        if min(spacing) <= 0:
            raise ValueError(f"Geometry: affine has a zero-length axis: {affine.tolist()}")
        if self.spacing_mm is not None and not np.allclose(self.spacing_mm, spacing, rtol=1e-5, atol=1e-6):
            raise ValueError(f"Geometry: spacing_mm={self.spacing_mm} disagrees with the affine's {spacing}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_mm", spacing)

    @property
    def orientation(self) -> tuple[str, ...]:
        """Axis codes, e.g. ``("R", "A", "S")``: the world direction each array axis increases towards."""
        return tuple(nib.aff2axcodes(self.affine))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self.shape == other.shape and np.array_equal(self.affine, other.affine)

    def __hash__(self) -> int:
        return hash((self.shape, self.affine.tobytes()))

    def __repr__(self) -> str:
        return f"Geometry(shape={self.shape}, spacing_mm={self.spacing_mm}, orientation={''.join(self.orientation)})"


def _from_bytes(path: str, data: bytes) -> nib.Nifti1Image:
    """A NIfTI image over an in-memory file (an object-store read); voxels are decoded lazily, like ``nib.load``."""
    errors = []
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        raw = io.BytesIO(data)
        fileobj = gzip.GzipFile(fileobj=raw) if data[:2] == b"\x1f\x8b" else raw
        holder = nib.FileHolder(filename=path, fileobj=fileobj)
        try:
            img = cls.from_file_map({"header": holder, "image": holder})
        except _READ_ERRORS as err:
            errors.append(err)
            continue
        img.raw_file_bytes = data  # what _check_size measures
        return img
    raise errors[0]


def _load(path: PathLike) -> nib.Nifti1Image:
    path = os.fspath(path)
    remote = paths.is_url(path)
    if not epath.Path(path).exists():
        raise DataFileError(path, "file not found")
    try:
        img = _from_bytes(path, epath.Path(path).read_bytes()) if remote else nib.load(path)
    except _READ_ERRORS as err:
        message = f"not a readable NIfTI file: truncated, corrupt or another format ({type(err).__name__}: {err})"
        raise DataFileError(path, message) from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataFileError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def _spatial_shape(img: nib.Nifti1Image, path: PathLike) -> tuple[int, int, int]:
    # A 4-D (or 5-D) file whose extra dimensions are all 1 is a 3-D volume stored with a singleton time or
    # channel axis (some converters do this); it is read as 3-D. Anything else is refused, since picking one
    # channel or time point silently would feed the wrong data.
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise DataFileError(path, f"expected a 3-D volume, got a {len(shape)}-D image of shape {shape}")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise DataFileError(
            path,
            f"4-D image of shape {shape}: expected a 3-D volume (only trailing singleton dimensions are "
            "squeezed); split multi-channel or multi-timepoint files into one 3-D file per channel",
        )
    return shape[:3]


# Deflate cannot expand data by more than about 1032:1; a header that claims more voxels than that is a lie.
MAX_DEFLATE_RATIO = 1032


def _stored_bytes(img: nib.Nifti1Image, shape: tuple[int, ...]) -> int:
    return int(img.header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * img.get_data_dtype().itemsize


def _gzip_holds_at_least(raw, needed: int) -> bool:
    """Whether the gzip stream ``raw`` decompresses to >= ``needed`` bytes, in bounded chunks (no buffer)."""
    decomp = zlib.decompressobj(zlib.MAX_WBITS | 32)
    total = 0
    while total < needed:
        chunk = raw.read(1 << 20)
        if not chunk:
            return False
        total += len(decomp.decompress(chunk, 1 << 24))
        while decomp.unconsumed_tail and total < needed:
            total += len(decomp.decompress(decomp.unconsumed_tail, 1 << 24))
        if decomp.eof:
            rest = decomp.unused_data
            decomp = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a multi-member gzip file: next member
            if rest:
                total += len(decomp.decompress(rest, 1 << 24))
    return True


def _raw(img: nib.Nifti1Image, path: str):
    data = getattr(img, "raw_file_bytes", None)
    return io.BytesIO(data) if data is not None else open(path, "rb")  # noqa: SIM115 (closed by the caller)


def _check_size(img: nib.Nifti1Image, path: PathLike, shape: tuple[int, ...]) -> None:
    """Refuses a header whose shape x dtype needs more bytes than the file can hold, before anything is allocated.

    ``.nii``: the file size. ``.nii.gz``: at most ``MAX_DEFLATE_RATIO`` times the compressed size; then the gzip
    trailer's ISIZE (uncompressed size mod 2^32, of the last member); only when that disagrees is the stream
    decompressed and counted, in bounded chunks.
    """
    path = os.fspath(path)
    needed = _stored_bytes(img, shape)
    with _raw(img, path) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            ok, holds = size >= needed, f"{size} bytes"
        elif needed > size * MAX_DEFLATE_RATIO:
            ok, holds = False, f"{size} compressed bytes (at most {size * MAX_DEFLATE_RATIO} uncompressed)"
        else:
            isize = -1
            if size >= 18:
                f.seek(-4, os.SEEK_END)
                isize = int.from_bytes(f.read(4), "little")
            f.seek(0)
            ok = (needed < 2**32 and isize >= needed) or _gzip_holds_at_least(f, needed)
            holds = "less once decompressed"
    if not ok:
        raise DataFileError(path, f"cannot read voxel data, file truncated or corrupt (the header claims shape "
                                  f"{shape} of {img.get_data_dtype()}, {needed} bytes; the file holds {holds})")


def _read_voxels(img: nib.Nifti1Image, path: PathLike, dtype) -> np.ndarray:
    shape = _spatial_shape(img, path)
    _check_size(img, path, tuple(int(s) for s in img.shape))
    try:
        # One read through the lazy proxy; nibabel applies scl_slope/scl_inter in the requested dtype.
        data = np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as err:
        raise DataFileError(
            path, f"cannot read voxel data, file truncated or corrupt ({type(err).__name__}: {err})"
        ) from err
    return data.reshape(shape)


def _geometry(img: nib.Nifti1Image, path: PathLike, shape: tuple[int, ...]) -> Geometry:
    try:
        return Geometry(img.affine, shape)
    except ValueError as err:  # zero-length, NaN or infinite axes in the header's affine
        raise DataFileError(path, f"unusable geometry in the header: {' '.join(str(err).split())}") from err


def nonfinite_message(data: Shaped[np.ndarray, "..."]) -> str | None:
    """``"<n> non-finite voxels (<a> NaN, <b> inf)"``, or None when every voxel is finite."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return None
    n_nan = int(np.isnan(data).sum())
    return f"{int(bad.sum())} non-finite voxels ({n_nan} NaN, {int(bad.sum()) - n_nan} inf)"


def read_geometry(path: PathLike) -> Geometry:
    """Reads only the header: the geometry of a 3-D NIfTI file (no voxel data is loaded).

    Raises:
        DataFileError: missing or unreadable file, or not a 3-D volume.
    """
    img = _load(path)
    return _geometry(img, path, _spatial_shape(img, path))


def read_image(path: PathLike, *, allow_nonfinite: bool = False) -> tuple[Float[np.ndarray, "h w d"], Geometry]:
    """Reads an intensity volume as float32 in nibabel voxel order.

    Args:
        path: ``.nii`` or ``.nii.gz`` file holding a 3-D volume (a trailing singleton 4th dimension is squeezed).
        allow_nonfinite: if False (default), NaN or inf voxels raise; if True they are returned as stored.

    Returns:
        ``(image, geometry)``; the image is float32 with scaling (scl_slope/scl_inter) applied.

    Raises:
        DataFileError: missing, unreadable or truncated file; not 3-D; NaN/inf voxels (unless allowed).
    """
    img = _load(path)
    data = _read_voxels(img, path, np.float32)
    if not allow_nonfinite:
        message = nonfinite_message(data)
        if message:
            raise DataFileError(path, message)
    return data, _geometry(img, path, data.shape)


def read_label(path: PathLike) -> tuple[Integer[np.ndarray, "h w d"], Geometry]:
    """Reads a label map as integers in nibabel voxel order.

    Integer files keep their stored dtype (no copy to a wider type); float-stored or scaled files must hold
    whole numbers only and are returned as int32.

    Raises:
        DataFileError: missing, unreadable or truncated file; not 3-D; NaN/inf or non-integer values.
    """
    img = _load(path)
    stored = img.get_data_dtype()
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if np.issubdtype(stored, np.integer) and slope == 1 and inter == 0:
        data = _read_voxels(img, path, None)
        return data, _geometry(img, path, data.shape)
    data = _read_voxels(img, path, np.float64)
    message = nonfinite_message(data)
    if message:
        raise DataFileError(path, f"label map has {message}")
    fractional = data != np.round(data)
    if fractional.any():
        examples = np.unique(data[fractional])[:3].tolist()
        raise DataFileError(
            path,
            f"label map has {int(fractional.sum())} non-integer voxels (e.g. {examples}); labels must be whole numbers",
        )
    if data.size and (data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max):
        raise DataFileError(path, f"label values outside the int32 range ({data.min()}..{data.max()})")
    return data.astype(np.int32), _geometry(img, path, data.shape)


def _check_shape(array: np.ndarray, geom: Geometry, what: str) -> None:
    if array.ndim < 3 or tuple(array.shape[:3]) != geom.shape:
        raise ValueError(f"{what}: array shape {array.shape} does not start with the geometry's shape {geom.shape}")


def _ras_transform(geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(geom.affine)
    return ornt, geom.affine @ inv_ornt_aff(ornt, geom.shape)


def reorient_to_ras(
    array: Shaped[np.ndarray, "h w d *c"], geom: Geometry
) -> tuple[Shaped[np.ndarray, "..."], Geometry]:
    """Permutes/flips the spatial axes so that they point to R, A, S (torchio ``ToCanonical``).

    Oblique affines go to the closest RAS axes (``nib.io_orientation``); no interpolation happens. Extra
    trailing axes (channels) are carried along.

    Args:
        array: volume ``[h, w, d, ...]`` in the file's voxel order.
        geom: its geometry.

    Returns:
        ``(ras_array, ras_geometry)``; the array is C-contiguous and is the input itself when already RAS.
    """
    _check_shape(array, geom, "reorient_to_ras")
    ornt, ras_affine = _ras_transform(geom)
    out = np.ascontiguousarray(apply_orientation(array, ornt))
    return out, Geometry(ras_affine, out.shape[:3])


def reorient_from_ras(
    array: Shaped[np.ndarray, "h w d *c"], ras_geom: Geometry, original_geom: Geometry
) -> Shaped[np.ndarray, "..."]:
    """Undoes ``reorient_to_ras``: brings a RAS-ordered array back to the original file's voxel order.

    Args:
        array: ``[h, w, d, ...]`` on ``ras_geom``'s grid (e.g. a prediction).
        ras_geom: the geometry ``reorient_to_ras`` returned for ``original_geom``.
        original_geom: the geometry of the file the data came from.

    Raises:
        ValueError: ``ras_geom`` is not the RAS version of ``original_geom`` or the array does not fit it.
    """
    _check_shape(array, ras_geom, "reorient_from_ras")
    ornt, ras_affine = _ras_transform(original_geom)
    if not np.allclose(ras_geom.affine, ras_affine, rtol=0, atol=1e-6 * max(1.0, np.abs(ras_affine).max())):
        raise ValueError(
            f"reorient_from_ras: {ras_geom!r} is not the RAS reorientation of {original_geom!r} "
            f"(expected affine {ras_affine.tolist()}, got {ras_geom.affine.tolist()})"
        )
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), ornt)
    return np.ascontiguousarray(apply_orientation(array, back))


def _qform_representable(affine: np.ndarray) -> bool:
    # The NIfTI qform stores rotation + zooms only; a sheared affine would be silently approximated there.
    m = affine[:3, :3] / np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    return np.allclose(m.T @ m, np.eye(3), atol=1e-5)


def write_nifti(path: PathLike, array: Shaped[np.ndarray, "h w d *c"], geom: Geometry) -> None:
    """Writes an array with the given geometry (``.nii`` or ``.nii.gz`` from the suffix).

    The affine goes into the sform (code 1, scanner) and, when it has no shear, also into the qform (code 1),
    as SimpleITK writes files. bool is stored as uint8, int64 as int32 when the values fit, float64 as float32.
    Parent directories are created; ``gs://``-style paths are written through ``etils.epath``.

    Raises:
        ValueError: array shape does not match the geometry, or unsupported suffix.
    """
    path = os.fspath(path)
    if not (path.endswith(".nii") or path.endswith(".nii.gz")):
        raise ValueError(f"write_nifti: {path}: file name must end in .nii or .nii.gz")
    _check_shape(array, geom, f"write_nifti({path})")
    data = np.asarray(array)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype == np.int64:
        info = np.iinfo(np.int32)
        if data.size == 0 or (data.min() >= info.min and data.max() <= info.max):
            data = data.astype(np.int32)
    elif data.dtype == np.float64:
        data = data.astype(np.float32)
    img = nib.Nifti1Image(data, geom.affine)
    img.set_sform(geom.affine, code=1)
    img.set_qform(geom.affine, code=1 if _qform_representable(geom.affine) else 0)
    img.header.set_xyzt_units("mm", "sec")
    if paths.is_url(path):  # object storage: serialise in memory, one write through etils.epath
        raw = img.to_bytes()
        epath.Path(path).write_bytes(gzip.compress(raw, compresslevel=6) if path.endswith(".gz") else raw)
        return
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
