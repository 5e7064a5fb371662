"""A small prepared store for the pipeline tests (not a test module)."""

import pathlib

import numpy as np

from sammed3d_jax.data import cache

def record_json(store, key, value, image, label, modality="MRI"):
    case_dir = store / "cases" / key
    image_rel, label_rel = f"cases/{key}/image.npy", f"cases/{key}/label_{value}.npy"
    if not (store / image_rel).exists():
        cache.save_array(store / image_rel, image.astype(np.float32))
    binary = (label == value).astype(np.uint8)
    cache.save_array(store / label_rel, binary)
    idx = np.argwhere(binary)
    assert case_dir.exists()
    return cache.PreparedRecord(
        id=f"{key}/{value}", case=key, dataset="test", target=f"t{value}", modality=modality, label_value=value,
        image=image_rel, label=label_rel, shape=tuple(binary.shape), spacing_mm=(1.5, 1.5, 1.5),
        affine=tuple(map(tuple, np.diag([1.5, 1.5, 1.5, 1.0]))),
        bbox=tuple((int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0))),
        foreground_voxels=int(binary.sum()), source_volume_mm3=float(binary.sum() * 1.5**3),
        source_image=f"/src/{key}.nii.gz", source_label=f"/src/{key}_label.nii.gz",
    ).to_json()


def ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.sum((grid - np.asarray(centre)) ** 2, axis=-1) <= radius**2


def make_store(root: pathlib.Path) -> pathlib.Path:
    """Four usable targets (one padded, one CT), one sparse target whose centred crop is empty, one tiny target,
    one constant-image target (index 6)."""
    rng = np.random.default_rng(0)
    records = []
    shape = (40, 36, 30)
    label = np.zeros(shape, np.uint8)
    label[ball(shape, (14, 14, 12), 8)] = 1
    label[ball(shape, (28, 24, 18), 7)] = 2
    label[ball(shape, (33, 8, 5), 2)] = 3  # tiny: 33 voxels
    image = rng.uniform(0.0, 100.0, shape) * (rng.random(shape) > 0.2) + 50.0 * label
    records += [record_json(root, "a", v, image, label) for v in (1, 2, 3)]

    shape = (24, 20, 28)  # smaller than the crop: padding path
    label = ball(shape, (12, 10, 14), 8).astype(np.uint8)
    records.append(record_json(root, "b", 1, rng.uniform(1.0, 10.0, shape), label))

    shape = (70, 70, 70)  # two far-apart blobs: > 1000 voxels, but the crop centred on their box holds none
    label = (ball(shape, (7, 7, 7), 6.5) | ball(shape, (62, 62, 62), 6.5)).astype(np.uint8)
    records.append(record_json(root, "sparse", 1, rng.uniform(1.0, 10.0, shape), label))

    shape = (36, 36, 36)
    label = ball(shape, (18, 18, 18), 9).astype(np.uint8)
    records.append(record_json(root, "ct", 1, rng.uniform(-3000.0, 3000.0, shape), label, modality="CT"))
    shape = (30, 30, 30)  # constant image: cannot be z-normalised per volume, fine for the other modes
    label = ball(shape, (15, 15, 15), 8).astype(np.uint8)
    records.append(record_json(root, "flat", 1, np.full(shape, 5.0), label))
    cache.write_json(root / cache.INDEX_NAME, {"format": cache.FORMAT, "spacing_mm": [1.5] * 3, "records": records,
                                                "skipped": []})
    return root


