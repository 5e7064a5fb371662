"""Fine-tuning from a converted upstream checkpoint (e.g. SAM-Med3D-turbo), as upstream's train.sh does:
the sammed3d recipe with ``init_from`` set and lr 8e-5.

    python -m sammed3d_jax.convert sam_med3d_turbo.pth ckpt/turbo
    python train.py --config configs/finetune.py:init=ckpt/turbo --workdir runs/ft \
        --config.data.prepared_dir=PREPARED
    python train.py --config configs/finetune.py:init=ckpt/turbo,image_size=160 ...   # 160³ crops from 128³ weights

Derived from configs/sammed3d.py by override; the args of that file are accepted too.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import sammed3d  # noqa: E402


def get_config(arg=None):
    a = common.parse_arg(arg, lazy=True, init="", image_size=0)
    passthrough = ",".join(f"{k}={v}" for k, v in a.items() if k not in ("init", "image_size"))
    c = sammed3d.get_config(passthrough)
    c.init_from = a.init  # The loop refuses to start a fine-tuning run without it.
    if a.image_size:  # Train at another input size: the loop resamples the checkpoint's position tables.
        c.model.image_size = a.image_size
    c.require_init = True
    c.optim.lr = 8e-5  # Upstream train.sh / train_ddp.sh: --lr 8e-5 from the turbo checkpoint.
    return c
