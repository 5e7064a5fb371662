"""ModelConfig: every architecture number of SAM-Med3D, as a frozen (hashable) dataclass, plus named variants.

Field names follow the upstream builder's vocabulary (the fixture ``config.json`` uses it too), so a config file
written by the reference tooling can be read with :func:`ModelConfig.from_json`. Besides the architecture it holds
execution fields (EXECUTION_FIELDS: compute dtype, attention implementation, remat policy, block scan) that change
how, never what, the model computes. Owns ``ModelConfig``, ``VARIANTS`` (the released ``vit_b_ori``, upstream's
unreleased ``vit_b``/``vit_l``/``vit_h``, and the CPU-sized ``small``/``tiny``) and ``resolve_attention_impl``.
Imports etils (config files) only; must not import jax, data/training code or ml_collections.
"""

import dataclasses
import json
import os
from typing import Any

from etils import epath

# Keys of the fixture/upstream config vocabulary that describe the run or derived numbers, not the architecture.
# They are accepted by `from_dict` and checked for consistency where they are derived.
_DERIVED_KEYS = ("image_embedding_size", "input_image_size", "pe_num_pos_feats", "out_chans", "low_res_mask_size")
_IGNORED_KEYS = (
    "pixel_mean", "pixel_std", "builder", "batch_size", "num_points", "seed", "num_parameters",
    "num_state_dict_entries", "weight_init", "notes", "upsample", "model_type",
)
_FIXED_STRINGS = {
    "decoder_transformer_mlp_activation": "relu",
    "output_upscaling_activation": "gelu",
    "prompt_mask_activation": "gelu",
}
_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# Names of the encoder-block rematerialisation policies (see ``remat_policy``); the values worth saving are tagged
# with ``jax.ad_checkpoint.checkpoint_name`` in the blocks ("qkv", "attention_out", "mlp_hidden").
REMAT_POLICIES = (
    "none", "full", "dots_saveable", "dots_no_batch_dims", "save_qkv", "save_attention_out",
    "save_qkv_attention_out", "save_mlp_hidden",
)
# Fields that change how the model is computed, not what it computes: two configs that differ only here describe the
# same architecture and load the same weights.
EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "remat_encoder_blocks",
                    "scan_encoder_blocks")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a SAM-Med3D model.

    Defaults are the released ``vit_b_ori`` model (all released checkpoints). ``dtype`` is the compute dtype;
    parameters are always ``param_dtype`` (float32). LayerNorm statistics, softmax, the Fourier PE and the mask
    logits are float32 whatever ``dtype`` is.
    """

    image_size: int = 128
    vit_patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decoder_transformer_depth: int = 2
    decoder_transformer_mlp_dim: int = 2048
    decoder_transformer_num_heads: int = 8
    decoder_attention_downsample_rate: int = 2
    encoder_layernorm_eps: float = 1e-6
    layernorm3d_eps: float = 1e-6
    decoder_layernorm_eps: float = 1e-5
    gelu_approximate: bool = False
    # 2: negative/positive click embeddings (the released turbo layout); 4: plus the two box-corner embeddings of
    # upstream's challenge branch (``sam_med3d_turbo_bbox_*.pth``), which enables box prompts.
    num_point_embeddings: int = 2
    # Numerics and execution (not part of upstream's vocabulary; see EXECUTION_FIELDS).
    dtype: str = "float32"
    param_dtype: str = "float32"
    # "xla" (portable einsum/softmax) or "cudnn" (fused attention, bf16/fp16 on NVIDIA GPUs). "auto" is a request
    # for the platform default: entry points turn it into one of the two with `resolve_attention_impl`; the model
    # itself never looks at the platform and computes an unresolved "auto" with the portable XLA path.
    attention_impl: str = "auto"
    # Rematerialisation of each encoder block in the backward pass, by name (REMAT_POLICIES): "none" keeps every
    # activation, "full" recomputes the block, "dots_saveable"/"dots_no_batch_dims" keep matmul outputs (JAX's
    # policies), "save_*" keep only the tagged values.
    remat_policy: str = "none"
    remat_encoder_blocks: bool = False  # Legacy spelling of remat_policy="full"; normalised to False on creation.
    # Run repeated groups of identical encoder blocks (e.g. window, window, global) as a lax.scan: the compiled
    # program holds one group instead of every block (much shorter compilation). Parameters keep the per-block
    # layout (``blocks_<i>``); the scan stacks them on the fly.
    scan_encoder_blocks: bool = False

    def __post_init__(self):
        problems = []
        if self.image_size % self.vit_patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of vit_patch_size {self.vit_patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append(f"encoder_embed_dim {self.encoder_embed_dim} not divisible by heads {self.encoder_num_heads}")
        if self.prompt_embed_dim % 3 or (self.prompt_embed_dim // self.decoder_attention_downsample_rate) % (
                self.decoder_transformer_num_heads):
            problems.append(
                f"prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 3 and its /"
                f"{self.decoder_attention_downsample_rate} part divisible by {self.decoder_transformer_num_heads} heads")
        if self.prompt_embed_dim % 8:
            problems.append(f"prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 8 (upscaling to C/8)")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            problems.append(f"encoder_global_attn_indexes {bad} outside 0..{self.encoder_depth - 1}")
        if self.window_size < 0:
            problems.append(f"window_size {self.window_size} < 0")
        if self.dtype not in _DTYPES or self.param_dtype not in _DTYPES:
            problems.append(f"dtype/param_dtype must be one of {_DTYPES}, got {self.dtype}/{self.param_dtype}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.remat_encoder_blocks and self.remat_policy not in ("none", "full"):
            problems.append(f"remat_encoder_blocks=True contradicts remat_policy={self.remat_policy!r}")
        if self.num_point_embeddings not in (2, 4):
            problems.append(f"num_point_embeddings must be 2 (clicks) or 4 (clicks + box corners), "
                            f"got {self.num_point_embeddings}")
        if self.num_multimask_outputs < 1 or self.iou_head_depth < 1:
            problems.append("num_multimask_outputs and iou_head_depth must be >= 1")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(int(i) for i in self.encoder_global_attn_indexes))
        if self.remat_encoder_blocks:  # One spelling from here on: the legacy bool becomes the named policy.
            object.__setattr__(self, "remat_policy", "full")
            object.__setattr__(self, "remat_encoder_blocks", False)

    # Derived numbers -------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Token grid per axis (image_size / patch)."""
        return self.image_size // self.vit_patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (4x the embedding grid)."""
        return 4 * self.grid_size

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @property
    def pe_num_pos_feats(self) -> int:
        return self.prompt_embed_dim // 3

    @property
    def encoder_mlp_dim(self) -> int:
        return int(self.encoder_embed_dim * self.mlp_ratio)

    @property
    def supports_boxes(self) -> bool:
        """True when the prompt encoder has the two box-corner embeddings (``num_point_embeddings == 4``)."""
        return self.num_point_embeddings == 4

    def block_window_size(self, index: int) -> int:
        """Window of encoder block ``index``: 0 (global attention) for a global block, else ``window_size``."""
        return 0 if index in self.encoder_global_attn_indexes else self.window_size

    def architecture(self) -> dict[str, Any]:
        """``to_dict`` without the EXECUTION_FIELDS: equal for two configs that load the same weights."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # Construction from the upstream/fixture vocabulary --------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a dict in the fixture ``config.json`` vocabulary (extra run keys are ignored).

        Raises ValueError naming any unknown key, any fixed choice we do not implement (e.g. a non-ReLU decoder
        MLP) and any derived number that disagrees with the architecture numbers.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _DERIVED_KEYS and k not in _IGNORED_KEYS
                         and k not in _FIXED_STRINGS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        for key, want in _FIXED_STRINGS.items():
            if key in d and str(d[key]).lower() != want:
                raise ValueError(f"config key {key}={d[key]!r} is not supported (upstream uses {want!r})")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        cfg = cls(**kwargs)
        g, s = cfg.grid_size, cfg.image_size
        expected = {
            "image_embedding_size": [g, g, g], "input_image_size": [s, s, s], "pe_num_pos_feats": cfg.pe_num_pos_feats,
            "out_chans": cfg.prompt_embed_dim, "low_res_mask_size": [4 * g] * 3,
        }
        for key, want in expected.items():
            got = d.get(key, want)
            if (list(got) if isinstance(want, list) else got) != want:
                raise ValueError(f"config key {key}={got!r} disagrees with the architecture (expected {want})")
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            d = json.loads(epath.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named variant (see VARIANTS), optionally with field overrides."""
        if name not in VARIANTS:
            raise ValueError(f"unknown model variant {name!r}; known: {sorted(VARIANTS)}")
        return VARIANTS[name].replace(**overrides)


def _upstream_256(embed_dim: int, depth: int, heads: int, global_attn: tuple[int, ...]) -> ModelConfig:
    """Upstream's ``_build_sam3D`` registry entries (never released): 256³ input, patch 16 (16³ tokens, i.e. one
    full 14³ window and a ragged 2-wide one per axis), window 14, prompt dim 384, mask_in_chans 16, IoU head 3x256."""
    return ModelConfig(
        image_size=256, vit_patch_size=16, encoder_embed_dim=embed_dim, encoder_depth=depth, encoder_num_heads=heads,
        encoder_global_attn_indexes=global_attn, window_size=14, prompt_embed_dim=384, mask_in_chans=16,
        iou_head_depth=3, iou_head_hidden_dim=256)


VARIANTS: dict[str, ModelConfig] = {
    # The released SAM-Med3D / SAM-Med3D-turbo architecture (upstream `build_sam3D_vit_b_ori`).
    "vit_b_ori": ModelConfig(),
    # Upstream's build_sam3D_vit_b / _vit_l / _vit_h (its "vit_b" is 384 wide, not ViT-B's 768).
    "vit_b": _upstream_256(384, 12, 12, (2, 5, 8, 11)),
    "vit_l": _upstream_256(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _upstream_256(1280, 32, 16, (7, 15, 23, 31)),
    # Unit tests: 32^3 volumes, 4^3 token grid padded into one 14^3 window (the same quirk as the real model).
    "tiny": ModelConfig(
        image_size=32, vit_patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
        encoder_global_attn_indexes=(1,), prompt_embed_dim=48, iou_head_hidden_dim=32,
        decoder_transformer_mlp_dim=64),
    # CPU training demo: 64^3 volumes, 4^3 grid, small widths; trains in minutes on two cores.
    "small": ModelConfig(
        image_size=64, vit_patch_size=16, encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3), prompt_embed_dim=48, iou_head_hidden_dim=64,
        decoder_transformer_mlp_dim=256),
}


def resolve_attention_impl(cfg: ModelConfig, platform: str) -> ModelConfig:
    """``cfg`` with a concrete ``attention_impl`` for ``platform`` (``jax.default_backend()``: "cpu", "gpu", "tpu").

    Entry points (training, evaluation, prediction, benchmarks) call this once; the model never inspects the
    platform. "auto" becomes "cudnn" for half-precision compute on a GPU (cuDNN's fused attention takes bf16/fp16
    only) and "xla" everywhere else; an explicit "xla"/"cudnn" is kept as given.
    """
    if cfg.attention_impl != "auto":
        return cfg
    half = cfg.dtype in ("bfloat16", "float16")
    return cfg.replace(attention_impl="cudnn" if platform == "gpu" and half else "xla")
