"""The training pipeline as it was when every step ran on the host: the reference for the device-side finishing.

Each element: crop-or-pad around the target box, redraw from the element's generator while the crop is unusable
(too little target, unreadable, non-finite, zero variance), CT clip, z-normalisation, then flips from the same
generator; batches pooled-normalised on the host when asked. The same record order and per-element generators as
``data/pipeline.py``, so element ``e`` draws the same numbers. Not a test module; also timed by ``benchmarks/pipeline.py``.
"""

import dataclasses

import grain
import numpy as np

from sammed3d_jax.data import cache, transforms
from sammed3d_jax.data.sampler import EpochShuffle, crop_window


@dataclasses.dataclass(frozen=True)
class HostSampler(grain.transforms.RandomMap):
    prepared_dir: str
    records: tuple
    record_ids: tuple
    crop_size: int
    normalization: str = "per_volume"
    ct_clip: str = "modality"
    min_crop_foreground: int = transforms.MIN_CROP_FOREGROUND
    flip_axes: tuple = (0, 1, 2)

    def _crop(self, record):
        window = crop_window(record, self.crop_size)
        image = cache.open_array(self.prepared_dir, record.image)
        label = cache.open_array(self.prepared_dir, record.label)
        if image.shape != record.shape or label.shape != record.shape:
            raise ValueError(f"{record.id}: shape")
        image = transforms.apply_crop_or_pad(image, window)
        if not np.isfinite(image).all():
            raise ValueError(f"{record.id}: non-finite")
        return image, transforms.apply_crop_or_pad(label, window)

    def random_map(self, element, rng):
        index, redraws, bad = int(element), 0, 0
        while True:
            record = self.records[index]
            try:
                image, label = self._crop(record)
                usable = transforms.has_enough_foreground(label, self.min_crop_foreground)
                if usable:
                    if self.ct_clip == "always" or (self.ct_clip == "modality" and record.modality.upper() == "CT"):
                        image = transforms.clip_intensity(image)
                    if self.normalization == "per_volume":
                        image = transforms.z_normalize(image)
            except (ValueError, OSError):
                bad += 1
                index = int(rng.integers(len(self.records)))
                continue
            if usable:
                break
            redraws += 1
            index = int(rng.integers(len(self.records)))
        image, label = transforms.random_flip(rng, image, label, axes=self.flip_axes)
        return {"image": image[..., None], "label": label, "record": np.array(self.record_ids[index], np.int32),
                "redraws": np.array(redraws, np.int32), "bad_skipped": np.array(bad, np.int32)}


def host_batches(prepared_dir, *, global_batch_size, seed, crop_size, normalization="per_volume", ct_clip="modality",
                 min_crop_foreground=transforms.MIN_CROP_FOREGROUND, flip_axes=(0, 1, 2)) -> grain.MapDataset:
    """The global batches of the host-side pipeline (one process, all rows)."""
    _, records = cache.read_index(prepared_dir)
    eligible = [(i, r) for i, r in enumerate(records) if r.foreground_voxels > min_crop_foreground]
    sampler = HostSampler(str(prepared_dir), tuple(r for _, r in eligible), tuple(i for i, _ in eligible),
                          crop_size, normalization, ct_clip, min_crop_foreground, tuple(flip_axes))
    ds = EpochShuffle(len(eligible), seed).random_map(sampler, seed=seed)
    ds = ds.batch(global_batch_size, drop_remainder=True)
    if normalization == "batch_pooled":
        ds = ds.map(lambda b: {**b, "image": transforms.z_normalize(b["image"][..., 0], batch_pooled=True)[..., None]})
    return ds
