"""The evaluation ConfigDict (``eval.py --config``): the interactive protocol and what to write.

    python eval.py --checkpoint runs/default --data DATASET --out runs/default/eval
    python eval.py --config sammed3d_jax/evaluation/config.py:paper ...     # paper-era protocol
    python eval.py --config.click_counts="(1,2,3,5,10)" --config.click_mode=ritm --config.save_masks=True

Args: "" (default) = current upstream scripts (``medim_val_dataset.py``); "paper" = the ECCV-era protocol
(``val_old.py``): crop centred on the first click, ritm clicks 1-2 then random, metrics on the 128³ ROI.
Only eval.py and the runner read this ConfigDict; nothing imports this file's module at library level.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "upstream", "paper"):
        raise ValueError(f"unknown evaluation config arg {arg!r}; known: '' (upstream), 'paper'")
    c = ml_collections.ConfigDict()
    c.seed = 233  # Upstream's evaluation seed; each (case, target) folds its own name into it.
    c.split = "Tr"  # labels<split>/images<split> of a dataset folder (manifests list their files).
    c.click_counts = (1, 3, 5, 10)  # Metrics after these click counts; the largest is the number of clicks made.
    c.click_mode = "random"  # "random" (upstream inference), "ritm"/"dt" (distance transform), "ritm_random".
    c.crop = "target"  # "target": centred on the target's bounding box (upstream); "first_click": on click 1.
    c.metric_grid = "original"  # "original": pasted back onto the image grid (upstream now); "roi": the 128^3 ROI.
    c.nsd_tolerance_mm = 1.0
    c.spacing_mm = (1.5, 1.5, 1.5)
    c.save_masks = False  # Predicted label maps (largest click count) as NIfTI under <out>/masks/.
    c.max_cases = 0  # > 0: evaluate only the first N cases (image/label pairs).
    c.model_config = ""  # Architecture for checkpoints that carry none (variant name or config JSON).
    c.dtype = ""  # Compute dtype override, e.g. "float32" for a bfloat16-trained model on CPU.
    c.mni152 = True  # Default run only: also evaluate on MNI152 when nilearn is installed.
    c.progress = True
    if arg == "paper":
        c.crop = "first_click"
        c.click_mode = "ritm_random"
        c.metric_grid = "roi"
    return c
