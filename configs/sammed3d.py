"""Upstream SAM-Med3D training recipe: vit_b_ori at 128^3, 11 clicks, AdamW 8e-4 (x0.1 prompt encoder/decoder),
weight decay 0.1, 20-step accumulation, MultiStep x0.1 at epochs 120 and 180 of 200, batch 12.

    python train.py --config configs/sammed3d.py --workdir runs/sammed3d --config.data.prepared_dir=PREPARED

Args (``--config configs/sammed3d.py:arg``): ``runlocal`` shrinks the run to a few CPU-sized steps (same shapes);
``dice_only`` drops the BCE term (MONAI < 1.3, as the base model most likely trained);
``batch_pooled`` normalises over the batch as upstream training does.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False, dice_only=False, batch_pooled=False)
    c = common.base_config()
    c.loss.use_bce = not a.dice_only
    if a.batch_pooled:
        c.data.normalization = "batch_pooled"
    if a.runlocal:
        c.model.dtype = "float32"
        c.batch_size = 1
        c.total_steps = 4
        c.optim.accum_steps = 2
        c.clicks.max_clicks = c.clicks.min_clicks = 2
        c.log_every_steps = 1
        c.checkpoint.every_steps = 2
    return c
