"""Shared config pieces: ``parse_arg`` (big_vision style) and the base ConfigDict every training config starts from.

Every key the training loop reads is defined here with its upstream default, so a config file only overrides.
Step counts: ``total_steps`` and ``checkpoint.every_steps`` count micro-batches (train-step calls); optimizer
updates happen every ``optim.accum_steps`` of them; ``optim.milestones_epochs`` are epochs, converted to updates with
``steps_per_epoch``.
"""

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses ``"key=value,flag"`` config arguments (the part after ``:`` in ``--config=path:arg``).

    Args:
      arg: comma-separated ``key=value`` pairs; a bare ``key`` sets a boolean to True.
      lazy: allow keys not in ``spec`` (kept as strings).
      **spec: known keys with their defaults; values are converted to the default's type.

    Returns:
      A ConfigDict of the parsed values.
    """
    def convert(key, value, default):
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", ""):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(f"config arg {key}={value!r} is not a boolean")
        return type(default)(value) if default is not None else value

    out = ml_collections.ConfigDict(dict(spec))
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in spec and not lazy:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(spec)}")
        out[key] = convert(key, value.strip(), spec.get(key)) if key in spec else value.strip()
    return out


def base_config() -> ml_collections.ConfigDict:
    """Upstream SAM-Med3D's training recipe as the base every config overrides."""
    c = ml_collections.ConfigDict()
    c.seed = 2023  # Upstream's seed (one jax.random.key, split into init/train streams).
    c.distributed = ml_collections.ConfigDict()  # How to join a multi-process job (sammed3d_jax/cluster.py).
    c.distributed.mode = "auto"  # "auto": join when JAX detects a cluster or a coordinator is given; "on"; "off".
    c.distributed.coordinator_address = ""  # host:port; "" = JAX_COORDINATOR_ADDRESS or JAX's detection.
    c.distributed.num_processes = 0  # 0 = JAX_NUM_PROCESSES or detection.
    c.distributed.process_id = -1  # -1 = JAX_PROCESS_ID or detection.
    c.distributed.local_device_ids = ""  # "0,1,..." | "all" (one task per node) | "" (JAX's choice).
    c.distributed.initialization_timeout_s = 300
    c.distributed.cluster_detection_method = ""  # Force one of JAX's detectors ("slurm", "ompi", "mpi4py", ...).
    c.distributed.expect_devices = 0  # > 0: refuse to start unless the job has exactly this many devices.
    c.resume = False  # Continue from <workdir>/checkpoints (train.py --resume sets it).

    c.model = ml_collections.ConfigDict()
    c.model.variant = "vit_b_ori"
    c.model.dtype = "bfloat16"  # Compute dtype; params stay float32.
    c.model.attention_impl = "auto"
    c.model.remat_encoder_blocks = True
    c.model.num_point_embeddings = 0  # 0: the variant's 2 (released turbo layout); 4: box-capable (clicks + corners).
    c.init_from = ""  # Converted params dir (python -m sammed3d_jax.convert); "" = from scratch.
    c.require_init = False  # True (fine-tuning configs): refuse to start from scratch.

    c.data = ml_collections.ConfigDict()
    c.data.prepared_dir = ""  # Store written by python -m sammed3d_jax.data.prepare.
    c.data.synthetic_cases = 0  # > 0 and no prepared_dir: generate + prepare a synthetic dataset in <workdir>/data.
    c.data.normalization = "per_volume"  # Upstream training pools stats over the batch: "batch_pooled".
    c.data.ct_clip = "modality"
    c.data.min_crop_foreground = 1000
    c.data.flip_axes = (0, 1, 2)
    c.data.target_offset = 0.0  # Not upstream: > 0 shifts crops off-centre, up to this fraction of the free room.
    c.data.target_offset_prob = 1.0  # The share of crops shifted when target_offset > 0 (the rest stay centred).
    c.data.offset_mode = "uniform"  # Or "target_voxel": each shifted crop centred on a target voxel (clamped).
    c.data.worker_count = 0
    c.data.read_threads = 1
    c.data.prefetch_batches = 2

    c.batch_size = 12  # Global micro-batch (upstream default --batch_size 12).
    c.total_steps = 0  # Micro-batches to train; 0 = total_epochs * steps_per_epoch.
    c.total_epochs = 200
    c.steps_per_epoch = 0  # 0 = prepared targets // batch_size.

    c.clicks = ml_collections.ConfigDict()
    c.clicks.max_clicks = 11
    c.clicks.min_clicks = 11
    c.clicks.random_insert = (2, 8)  # Inclusive range of the random prompt-less step; () disables.
    c.clicks.prompt_less_last = True
    c.clicks.accumulate = False  # Upstream --multi_click.
    c.clicks.stop_mask_gradient = False
    c.clicks.threshold = 0.5  # On logits (probability 0.62), as upstream training; 0.0 = probability 0.5.
    c.clicks.remat = True
    c.clicks.box_first_step = 0.0  # Not upstream: P(first step prompted by the target's box); needs 4 embeddings.
    c.loss = ml_collections.ConfigDict()
    c.loss.use_bce = True  # False = Dice only (upstream's loss under MONAI < 1.3).

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 8e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.lr_multipliers = (("^prompt_encoder/", 0.1), ("^mask_decoder/", 0.1))
    c.optim.frozen = ("^mask_decoder/iou_prediction_head/", "^prompt_encoder/no_mask_embed/")
    c.optim.schedule = "multistep"  # "multistep" | "cosine" | "constant"
    c.optim.milestones_epochs = (120, 180)
    c.optim.gamma = 0.1
    c.optim.warmup_steps = 0  # Optimizer updates.
    c.optim.final_lr_fraction = 0.0
    c.optim.clip_grad_norm = 0.0
    c.optim.accum_steps = 20
    c.optim.skip_nonfinite = True
    c.optim.mu_dtype = ""  # "" = param dtype; "bfloat16" halves Adam's first moment.
    c.optim.max_consecutive_skips = 20  # Stop the run after this many non-finite micro-batches in a row (0 = never).

    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh = (("data", -1),)
    c.sharding.rules = ((".*", "replicate"),)  # Or ((".*", "fsdp"),) to shard params and optimizer state.
    c.sharding.fsdp_axis = "data"
    # Multi-slice / multi-node: how the granules (TPU slices, or processes) tile the mesh axes, e.g.
    # (("data", -1),) puts them on the data axis; () = one granule. `mesh` then describes one granule.
    c.sharding.dcn_mesh = ()
    c.sharding.dcn_granule = "auto"  # "slice" (TPU slice_index) | "process" | "auto".

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.async_timeout_s = 600  # How long processes wait for each other to finish an async save.
    c.export_params = True  # Write <workdir>/params (params_io format, for eval/predict) at the end.

    c.compiler_options = ml_collections.ConfigDict()  # XLA options of the jitted init and step ({} = defaults).

    c.validation = ml_collections.ConfigDict()  # Periodic interactive Dice on held-out cases.
    c.validation.every_steps = 0  # 0 = never.
    c.validation.holdout_fraction = 0.0  # Cases held out of training (split by case identity).
    c.validation.max_batches = 4  # Validation batches (of batch_size) per evaluation.
    c.validation.clicks = 5  # Dice is reported after 1 and after this many clicks.

    c.observe = ml_collections.ConfigDict()
    c.observe.peak_tflops = 0.0  # Peak TFLOP/s per device for MFU; 0 = the table in training/observe.py.
    c.observe.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard.
    c.profile_steps = ()  # (first, last): a profiler trace of these steps into <workdir>/profile.

    c.log_every_steps = 50
    c.plot_every_steps = 1000
    c.progress = True
    c.stop_after_steps = 0  # > 0: leave after this many steps in this invocation, without a final save (tests).
    return c
