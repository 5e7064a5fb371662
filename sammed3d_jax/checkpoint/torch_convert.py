"""Strict, declarative mapping between upstream SAM-Med3D state dicts and our Flax variables.

The table is generated from a :class:`ModelConfig`: one :class:`Entry` per upstream tensor, in upstream state-dict
order, giving its PyTorch shape and a transform kind. The Flax path follows mechanically from the upstream name
(``blocks.3.attn.qkv.weight`` -> ``blocks_3/attn/qkv/kernel``: Linen list index ``_i``), so the table is all shapes and
transforms, no renames. Conversion in either direction checks every entry and raises one :class:`ConversionError`
that lists every missing, unexpected, wrongly shaped or wrongly typed tensor by name.

Owns: ``conversion_table``, ``torch_to_flax``, ``flax_to_torch``, ``check_variables``, ``abstract_variables``,
``count_parameters``, ``point_embeddings_in``. Imports only numpy, ml_dtypes and ``model.config``; must not import
torch, jax, flax or the model modules (the tests check the table against the model's ``jax.eval_shape``).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from sammed3d_jax.model.config import ModelConfig

# Transform kinds: how a PyTorch tensor becomes the Flax leaf (axes of the torch array, in Flax order).
_PERMUTATION = {
    "copy": None,                     # LayerNorm weight/bias, embeddings, pos_embed, rel_pos tables, biases
    "linear": (1, 0),                 # nn.Linear (out, in) -> kernel (in, out)
    "conv": (2, 3, 4, 1, 0),          # Conv3d (out, in, k0, k1, k2) -> (k0, k1, k2, in, out), no spatial flip
    "conv_transpose": (2, 3, 4, 0, 1),  # ConvTranspose3d (in, out, k0, k1, k2) -> (k0, k1, k2, in, out), no flip
}
# Float types that convert to float32 exactly; anything else (float64, integers) is reported, never cast.
_EXACT_TO_F32 = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


class ConversionError(ValueError):
    """A state dict or variable tree does not match the model layout. ``problems`` lists each one."""

    def __init__(self, header: str, problems: list[str]):
        super().__init__(header + "\n  - " + "\n  - ".join(problems))
        self.header, self.problems = header, problems

    def summary(self, limit: int = 25) -> str:
        """The message with at most ``limit`` problems listed (for command lines)."""
        more = len(self.problems) - limit
        lines = self.problems[:limit] + ([f"... and {more} more"] if more > 0 else [])
        return self.header + "\n  - " + "\n  - ".join(lines)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One upstream tensor: its name, PyTorch shape, transform kind and (derived) Flax path and shape."""

    torch_key: str
    torch_shape: tuple[int, ...]
    kind: str

    @property
    def collection(self) -> str:
        return "buffers" if self.torch_key.endswith("positional_encoding_gaussian_matrix") else "params"

    @property
    def flax_path(self) -> tuple[str, ...]:
        """("params"|"buffers", module..., leaf): numeric parts join their parent (Linen list index -> ``_i``)."""
        parts: list[str] = []
        for part in self.torch_key.split("."):
            if part.isdigit():
                parts[-1] = f"{parts[-1]}_{part}"
            else:
                parts.append(part)
        leaf = parts[-1]
        if leaf == "weight":
            if self.kind != "copy":
                leaf = "kernel"
            elif len(self.torch_shape) == 2:
                leaf = "embedding"   # nn.Embedding (n, C)
            else:
                leaf = "scale"       # LayerNorm / LayerNorm3d
        return (self.collection, *parts[:-1], leaf)

    @property
    def flax_shape(self) -> tuple[int, ...]:
        perm = _PERMUTATION[self.kind]
        return self.torch_shape if perm is None else tuple(self.torch_shape[p] for p in perm)

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        perm = _PERMUTATION[self.kind]
        return np.ascontiguousarray(array if perm is None else np.transpose(array, perm))

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        perm = _PERMUTATION[self.kind]
        return np.ascontiguousarray(array if perm is None else np.transpose(array, np.argsort(perm)))


def _linear(prefix, n_in, n_out, bias=True):
    out = [Entry(f"{prefix}.weight", (n_out, n_in), "linear")]
    return out + [Entry(f"{prefix}.bias", (n_out,), "copy")] if bias else out


def _norm(prefix, n):
    return [Entry(f"{prefix}.weight", (n,), "copy"), Entry(f"{prefix}.bias", (n,), "copy")]


def _conv(prefix, n_in, n_out, k, bias=True, kind="conv"):
    shape = (n_out, n_in, k, k, k) if kind == "conv" else (n_in, n_out, k, k, k)
    out = [Entry(f"{prefix}.weight", shape, kind)]
    return out + [Entry(f"{prefix}.bias", (n_out,), "copy")] if bias else out


def _embedding(prefix, n, dim):
    return [Entry(f"{prefix}.weight", (n, dim), "copy")]


def _mlp(prefix, dims):
    return [e for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])) for e in _linear(f"{prefix}.layers.{i}", a, b)]


def _image_encoder(cfg):
    e, g, p = cfg.encoder_embed_dim, cfg.grid_size, cfg.vit_patch_size
    head_dim, c = e // cfg.encoder_num_heads, cfg.prompt_embed_dim
    out = [Entry("image_encoder.pos_embed", (1, g, g, g, e), "copy")] if cfg.use_abs_pos else []
    out += _conv("image_encoder.patch_embed.proj", cfg.in_chans, e, p)
    for i in range(cfg.encoder_depth):
        b = f"image_encoder.blocks.{i}"
        out += _norm(f"{b}.norm1", e)
        if cfg.use_rel_pos:
            # Windowed blocks attend over window_size^3 (the padded window), global ones over the token grid.
            size = cfg.block_window_size(i) or g
            out += [Entry(f"{b}.attn.rel_pos_{a}", (2 * size - 1, head_dim), "copy") for a in "dhw"]
        out += _linear(f"{b}.attn.qkv", e, 3 * e, bias=cfg.qkv_bias) + _linear(f"{b}.attn.proj", e, e)
        out += _norm(f"{b}.norm2", e)
        out += _linear(f"{b}.mlp.lin1", e, cfg.encoder_mlp_dim) + _linear(f"{b}.mlp.lin2", cfg.encoder_mlp_dim, e)
    out += _conv("image_encoder.neck.0", e, c, 1, bias=False) + _norm("image_encoder.neck.1", c)
    out += _conv("image_encoder.neck.2", c, c, 3, bias=False) + _norm("image_encoder.neck.3", c)
    return out


def _prompt_encoder(cfg):
    c, m = cfg.prompt_embed_dim, cfg.mask_in_chans
    out = [Entry("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", (3, cfg.pe_num_pos_feats), "copy")]
    # Released checkpoints: two point embeddings (negative, positive). The challenge branch's box-capable layout
    # adds the two box corners as point_embeddings.2 and .3.
    for i in range(cfg.num_point_embeddings):
        out += _embedding(f"prompt_encoder.point_embeddings.{i}", 1, c)
    out += _embedding("prompt_encoder.not_a_point_embed", 1, c)
    out += _conv("prompt_encoder.mask_downscaling.0", 1, m // 4, 2) + _norm("prompt_encoder.mask_downscaling.1", m // 4)
    out += _conv("prompt_encoder.mask_downscaling.3", m // 4, m, 2) + _norm("prompt_encoder.mask_downscaling.4", m)
    out += _conv("prompt_encoder.mask_downscaling.6", m, c, 1)
    return out + _embedding("prompt_encoder.no_mask_embed", 1, c)


def _attention(prefix, c, downsample):
    inner = c // downsample
    return (_linear(f"{prefix}.q_proj", c, inner) + _linear(f"{prefix}.k_proj", c, inner)
            + _linear(f"{prefix}.v_proj", c, inner) + _linear(f"{prefix}.out_proj", inner, c))


def _mask_decoder(cfg):
    c, r, t = cfg.prompt_embed_dim, cfg.decoder_attention_downsample_rate, "mask_decoder.transformer"
    out = []
    for i in range(cfg.decoder_transformer_depth):
        b = f"{t}.layers.{i}"
        out += _attention(f"{b}.self_attn", c, 1) + _norm(f"{b}.norm1", c)
        out += _attention(f"{b}.cross_attn_token_to_image", c, r) + _norm(f"{b}.norm2", c)
        out += _linear(f"{b}.mlp.lin1", c, cfg.decoder_transformer_mlp_dim)
        out += _linear(f"{b}.mlp.lin2", cfg.decoder_transformer_mlp_dim, c)
        out += _norm(f"{b}.norm3", c) + _norm(f"{b}.norm4", c) + _attention(f"{b}.cross_attn_image_to_token", c, r)
    out += _attention(f"{t}.final_attn_token_to_image", c, r) + _norm(f"{t}.norm_final_attn", c)
    out += _embedding("mask_decoder.iou_token", 1, c) + _embedding("mask_decoder.mask_tokens", cfg.num_mask_tokens, c)
    out += _conv("mask_decoder.output_upscaling.0", c, c // 4, 2, kind="conv_transpose")
    out += _norm("mask_decoder.output_upscaling.1", c // 4)
    out += _conv("mask_decoder.output_upscaling.3", c // 4, c // 8, 2, kind="conv_transpose")
    for i in range(cfg.num_mask_tokens):
        out += _mlp(f"mask_decoder.output_hypernetworks_mlps.{i}", (c, c, c, c // 8))
    iou_dims = (c, *[cfg.iou_head_hidden_dim] * (cfg.iou_head_depth - 1), cfg.num_mask_tokens)
    return out + _mlp("mask_decoder.iou_prediction_head", iou_dims)


def conversion_table(cfg: ModelConfig) -> tuple[Entry, ...]:
    """Every upstream state-dict entry of the model described by ``cfg``, in upstream state-dict order.

    Args:
        cfg: the architecture (depth, global-attention indexes, widths, IoU head depth, mask tokens...).

    Returns:
        One :class:`Entry` per tensor (parameters and the PE buffer).
    """
    return tuple(_image_encoder(cfg) + _prompt_encoder(cfg) + _mask_decoder(cfg))


def point_embeddings_in(state_dict: Mapping[str, Any]) -> int | None:
    """How many ``prompt_encoder.point_embeddings.<i>`` tensors a state dict holds (2 released, 4 box-capable),
    or None when it holds none (not a SAM-Med3D state dict; the strict conversion then names what is missing)."""
    prefix, suffix = "prompt_encoder.point_embeddings.", ".weight"
    found = {k[len(prefix):-len(suffix)] for k in state_dict if k.startswith(prefix) and k.endswith(suffix)}
    return len(found) or None


def _check_dtype(name, array, problems):
    if np.dtype(array.dtype) not in _EXACT_TO_F32:
        problems.append(f"wrong dtype: {name}: {array.dtype} (expected float32; float16/bfloat16 are upcast exactly)")
        return False
    return True


def _raise(problems, what, cfg):
    if problems:
        head = (f"{what} does not match the model layout (image_size={cfg.image_size}, "
                f"encoder {cfg.encoder_embed_dim}x{cfg.encoder_depth}, prompt dim {cfg.prompt_embed_dim}): "
                f"{len(problems)} problem(s)")
        if len(problems) > len(conversion_table(cfg)) // 2:
            head += "; most entries disagree, so check that the model config (--config) is the right one"
        raise ConversionError(head, problems)


def torch_to_flax(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Converts an upstream state dict to our variables, strictly.

    Args:
        state_dict: upstream name -> array in PyTorch layout (e.g. from ``read_state_dict``).
        cfg: the architecture the weights belong to.

    Returns:
        ``{"params": {...}, "buffers": {...}}`` of contiguous float32 numpy arrays (the tree ``init_variables`` makes).

    Raises:
        ConversionError: one error listing every missing key, unexpected key, wrong shape and wrong dtype.
    """
    table = conversion_table(cfg)
    known = {e.torch_key for e in table}
    problems = []
    variables: dict[str, Any] = {"params": {}, "buffers": {}}
    for e in table:
        if e.torch_key not in state_dict:
            problems.append(f"missing: {e.torch_key} {list(e.torch_shape)} (for {'/'.join(e.flax_path)})")
            continue
        array = np.asarray(state_dict[e.torch_key])
        if tuple(array.shape) != e.torch_shape:
            problems.append(f"wrong shape: {e.torch_key}: got {list(array.shape)}, expected {list(e.torch_shape)}")
            continue
        if _check_dtype(e.torch_key, array, problems):
            node = variables
            for part in e.flax_path[:-1]:
                node = node.setdefault(part, {})
            node[e.flax_path[-1]] = e.to_flax(array.astype(np.float32, copy=False))
    problems += [f"unexpected: {k} {list(np.shape(v))}" for k, v in state_dict.items() if k not in known]
    found = point_embeddings_in(state_dict)
    if problems and found is not None and found != cfg.num_point_embeddings:
        problems.append(f"the state dict has {found} point embeddings, the model config {cfg.num_point_embeddings} "
                        "(num_point_embeddings: 2 released clicks-only layout, 4 box-capable)")
    _raise(problems, "state dict", cfg)
    return variables


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        return {p: v for k, sub in tree.items() for p, v in _flatten(sub, (*prefix, str(k))).items()}
    return {prefix: tree}


def _match_variables(variables, cfg):
    """(entry, float32 numpy leaf) for every table entry, or one ConversionError listing every mismatch."""
    flat = _flatten(variables)
    table = conversion_table(cfg)
    known = {e.flax_path for e in table}
    problems, matched = [], []
    for e in table:
        path = "/".join(e.flax_path)
        if e.flax_path not in flat:
            problems.append(f"missing: {path} {list(e.flax_shape)} (for {e.torch_key})")
            continue
        array = np.asarray(flat[e.flax_path])
        if tuple(array.shape) != e.flax_shape:
            problems.append(f"wrong shape: {path}: got {list(array.shape)}, expected {list(e.flax_shape)}")
            continue
        if _check_dtype(path, array, problems):
            matched.append((e, array.astype(np.float32, copy=False)))
    problems += [f"unexpected: {'/'.join(p)} {list(np.shape(v))}" for p, v in flat.items() if p not in known]
    _raise(problems, "variable tree", cfg)
    return matched


def check_variables(variables: Mapping[str, Any], cfg: ModelConfig) -> None:
    """Checks that ``variables`` has exactly the leaves, shapes and (float) dtypes of the model ``cfg`` describes.

    Raises:
        ConversionError: one error listing every missing, unexpected, wrongly shaped or wrongly typed leaf.
    """
    _match_variables(variables, cfg)


def flax_to_torch(variables: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Converts our variables back to an upstream state dict (upstream names, PyTorch layouts), strictly.

    Args:
        variables: ``{"params": ..., "buffers": ...}`` with numpy or jax leaves.
        cfg: the architecture.

    Returns:
        Upstream name -> contiguous float32 numpy array, in upstream state-dict order.

    Raises:
        ConversionError: one error listing every missing, unexpected, wrongly shaped or wrongly typed leaf.
    """
    return {e.torch_key: e.to_torch(array) for e, array in _match_variables(variables, cfg)}


def abstract_variables(cfg: ModelConfig) -> dict[str, Any]:
    """The variable tree of ``cfg`` as ``{path...: (shape, float32)}`` placeholders (``np.empty`` leaves, no copy)."""
    tree: dict[str, Any] = {}
    for e in conversion_table(cfg):
        node = tree
        for part in e.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[e.flax_path[-1]] = np.empty(e.flax_shape, np.float32)
    return tree


def count_parameters(variables: Mapping[str, Any]) -> dict[str, int]:
    """Element counts: ``{"parameters": ..., "buffer_elements": ..., "leaves": ...}`` of a variable tree."""
    flat = _flatten(variables)
    params = sum(int(np.prod(np.shape(v))) for p, v in flat.items() if p[0] == "params")
    buffers = sum(int(np.prod(np.shape(v))) for p, v in flat.items() if p[0] != "params")
    return {"parameters": params, "buffer_elements": buffers, "leaves": len(flat)}
