"""The evaluation ConfigDict (``eval.py --config``): the interactive protocol and what to write.

    python eval.py --checkpoint runs/default --data DATASET --out runs/default/eval
    python eval.py --config sammed3d_jax/evaluation/config.py:paper ...     # the paper-era script (val_old.py)
    python eval.py --config.crop=first_click ...                           # what predict gives from one click
    python eval.py --config.click_counts="(1,2,3,5,10)" --config.click_mode=ritm --config.save_masks=True

Args: "" (default) = current upstream scripts (``medim_val_dataset.py``: resampling to 1.5 mm with torchio, an
integer-typed image cast back to its type as torchio does, RAS, a crop centred on the target, random clicks, metrics
on the file's grid); "upstream" = the same with upstream's scoring of the combined label map (later classes
overwrite earlier ones); "paper" = what the ECCV-era script ``val_old.py`` did, as far as the code shows it: data
used as stored (it read pre-resampled files through the training loader, affine ignored, CT clamped to
[-1000, 1000] when the path holds ``/ct_``), the crop centred on the label, ritm clicks 1-2 then random, Dice on the
128³ ROI, and at k clicks the best Dice of clicks 1..k. It does not reproduce the paper's test data (pre-resampled
offline by upstream's ``prepare_data_from_nnUNet.py``, with cleaning the code does not show: give such files as
``--data``), nor the crop around the first click with sliding windows that the paper's text describes (that is
``crop="first_click"``, with ``first_click="random"`` for the paper's foreground click).
Only eval.py and the runner read this ConfigDict; nothing imports this file's module at library level.
"""

import ml_collections

PRESETS = ("", "upstream", "paper")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if (arg or "") not in PRESETS:
        raise ValueError(f"unknown evaluation config arg {arg!r}; known: '' (default), 'upstream', 'paper'")
    c = ml_collections.ConfigDict()
    c.seed = 233  # Upstream's evaluation seed; each (case, target) folds its own name into it.
    c.split = "Tr"  # labels<split>/images<split> of a dataset folder (manifests list their files).
    c.click_counts = (1, 3, 5, 10)  # Metrics after these click counts; the largest is the number of clicks made.
    c.click_mode = "random"  # "random" (upstream inference), "ritm"/"dt" (distance transform), "ritm_random".
    # "target": an S^3 crop centred on the target's bounding box (upstream). "first_click": predict's chain from the
    # first click (window centred on it, grown where the mask reaches a face), later clicks on the file's grid.
    c.crop = "target"
    c.first_click = "deepest"  # crop="first_click": the target's deepest voxel, or "random" (a uniform target voxel).
    c.max_windows = 27  # crop="first_click": the most windows per target.
    c.metric_grid = "original"  # "original": pasted back onto the image grid (upstream now); "roi": the S^3 ROI.
    c.scoring = "per_target"  # "per_target": each target's own mask; "combined": upstream's overwritten label map.
    c.dice_over_clicks = "at"  # "at": Dice after k clicks; "max": the best Dice of clicks 1..k (paper-era script).
    c.resample = "torchio"  # "torchio": to spacing_mm, RAS (upstream now); "none": data used as stored (paper era).
    c.integer_cast = True  # An integer-typed image is resampled into its own type, as torchio does.
    c.ct_clip = "none"  # "path": clamp to [-1000, 1000] HU when the image path holds "/ct_" (upstream's loader).
    c.nsd_tolerance_mm = 1.0
    c.spacing_mm = (1.5, 1.5, 1.5)
    c.save_masks = False  # Predicted label maps (largest click count) as NIfTI under <out>/masks/.
    c.max_cases = 0  # > 0: evaluate only the first N cases (image/label pairs).
    c.model_config = ""  # Architecture for checkpoints that carry none (variant name or config JSON).
    c.dtype = ""  # Compute dtype override, e.g. "float32" for a bfloat16-trained model on CPU.
    c.mni152 = True  # Default run only: also evaluate on MNI152 when nilearn is installed.
    c.progress = True
    if arg == "upstream":
        c.scoring = "combined"
    if arg == "paper":
        c.click_mode = "ritm_random"
        c.metric_grid = "roi"
        c.resample = "none"
        c.ct_clip = "path"
        c.dice_over_clicks = "max"
    return c
