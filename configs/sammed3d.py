"""Upstream SAM-Med3D training recipe: vit_b_ori at 128^3, 11 clicks, AdamW 8e-4 (x0.1 prompt encoder/decoder),
weight decay 0.1, 20-step accumulation, MultiStep x0.1 at epochs 120 and 180 of 200, batch 12.

    python train.py --config configs/sammed3d.py --workdir runs/sammed3d --config.data.prepared_dir=PREPARED

Args (``--config configs/sammed3d.py:arg``): ``runlocal`` shrinks the run to a few CPU-sized steps (same shapes);
``dice_only`` drops the BCE term (MONAI < 1.3, as the base model most likely trained);
``batch_pooled`` normalises over the batch as upstream training does.

Off-centre prompting stays off here, as upstream trains: crops centred on the target (``data.target_offset`` 0) and
every first step a click (``clicks.box_first_step`` 0). ``--config.data.target_offset=1.0`` places the target
anywhere in the crop where it fits whole; ``--config.clicks.box_first_step=0.5`` starts half the samples from the
target's bounding box (box-capable models only: ``--config.model.num_point_embeddings=4``, e.g. fine-tuning
``sam_med3d_turbo_bbox_init.pth``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False, dice_only=False, batch_pooled=False)
    c = common.base_config()
    c.data.target_offset = 0.0  # Upstream: the crop is centred on the target's bounding box.
    c.clicks.box_first_step = 0.0  # Upstream: every interaction starts with a click.
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
