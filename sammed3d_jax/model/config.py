"""ModelConfig: every architecture number of SAM-Med3D, as a frozen (hashable) dataclass, plus named variants.

Field names follow the upstream builder's vocabulary (the fixture ``config.json`` uses it too), so a config file
written by the reference tooling can be read with :func:`ModelConfig.from_json`. Must not import data/training code
or ml_collections.
"""

import dataclasses
import json
import os
from typing import Any

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
    # Numerics and execution (not part of upstream's vocabulary).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # "auto": cuDNN fused attention where available, else XLA; "xla"; "cudnn".
    remat_encoder_blocks: bool = False  # rematerialise encoder blocks in the backward pass (saves memory).

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
        if self.num_multimask_outputs < 1 or self.iou_head_depth < 1:
            problems.append("num_multimask_outputs and iou_head_depth must be >= 1")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(int(i) for i in self.encoder_global_attn_indexes))

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

    def block_window_size(self, index: int) -> int:
        """Window of encoder block ``index``: 0 (global attention) for a global block, else ``window_size``."""
        return 0 if index in self.encoder_global_attn_indexes else self.window_size

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
        with open(path) as f:
            try:
                d = json.load(f)
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


VARIANTS: dict[str, ModelConfig] = {
    # The released SAM-Med3D / SAM-Med3D-turbo architecture (upstream `build_sam3D_vit_b_ori`).
    "vit_b_ori": ModelConfig(),
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
