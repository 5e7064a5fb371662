"""ImageEncoder: the 3-D ViT of SAM-Med3D (patch embedding, absolute PE, windowed/global blocks, neck).

Channels-last: ``[b, S, S, S, 1]`` volume -> ``[b, g, g, g, C]`` embedding (g = S / patch, C = prompt_embed_dim).
Intermediates are sown into the "intermediates" collection for stage-by-stage parity checks.

Execution options (``ModelConfig``), none of which changes the parameters or the values computed:
- ``remat_policy``: rematerialise each block in the backward pass, keeping what the named policy saves. Blocks tag
  "qkv", "attention_out" and "mlp_hidden" with ``checkpoint_name``.
- ``scan_encoder_blocks``: upstream's block sequence is a repeated unit (window, window, global for ``vit_b_ori``;
  seven windowed then one global for ``vit_h``). The unit runs as a ``lax.scan`` over its repeats, and runs of
  identical blocks inside it as inner scans, so the compiled program holds one windowed and one global block
  whatever the depth. Parameters stay per block (``blocks_<i>``, the converter's and the sharding rules' layout);
  the scan stacks them on the fly (its gradient unstacks them).
Imports jax/flax only.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sammed3d_jax.model.attention import EncoderAttention
from sammed3d_jax.model.config import ModelConfig
from sammed3d_jax.model.layers import MLP, Conv3x3, Dtype, LayerNorm, StridedConv, gelu


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def attention_impl(cfg: ModelConfig) -> str:
    """The configured attention implementation. The model never inspects the platform: an unresolved ``"auto"``
    (entry points resolve it with ``config.resolve_attention_impl``) runs the portable XLA path."""
    return "xla" if cfg.attention_impl == "auto" else cfg.attention_impl


def checkpoint_policy(name: str):
    """The ``jax.checkpoint`` policy of a ``ModelConfig.remat_policy`` name (None for "none")."""
    cp = jax.checkpoint_policies
    policies = {
        "none": None,
        "full": cp.nothing_saveable,
        "dots_saveable": cp.dots_saveable,
        "dots_no_batch_dims": cp.dots_with_no_batch_dims_saveable,
        "save_qkv": cp.save_only_these_names("qkv"),
        "save_attention_out": cp.save_only_these_names("attention_out"),
        "save_qkv_attention_out": cp.save_only_these_names("qkv", "attention_out"),
        "save_mlp_hidden": cp.save_only_these_names("mlp_hidden"),
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; known: {sorted(policies)}")
    return policies[name]


def block_schedule(cfg: ModelConfig) -> tuple[tuple[tuple[int, int], ...], int]:
    """The encoder's block sequence as ``(unit, repeats)``: ``unit`` is runs ``((window, count), ...)`` of identical
    blocks (window 0 = global attention), and the sequence is ``unit`` repeated ``repeats`` times (smallest unit).

    ``vit_b_ori`` -> ``(((14, 2), (0, 1)), 4)``; ``vit_h`` -> ``(((14, 7), (0, 1)), 4)``.
    """
    kinds = [cfg.block_window_size(i) for i in range(cfg.encoder_depth)]
    depth = len(kinds)
    period = next(p for p in range(1, depth + 1)
                  if depth % p == 0 and all(kinds[i] == kinds[i % p] for i in range(depth)))
    runs: list[list[int]] = []
    for window in kinds[:period]:
        if runs and runs[-1][0] == window:
            runs[-1][1] += 1
        else:
            runs.append([window, 1])
    return tuple((w, n) for w, n in runs), depth // period


class PatchEmbed(nn.Module):
    """Conv3d(kernel = stride = patch) as a patchify + matmul; params under ``patch_embed/proj`` as upstream."""

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, volume: jax.Array) -> jax.Array:
        return StridedConv(self.features, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="proj")(volume)


class Block(nn.Module):
    """Pre-norm transformer block: ``y = x + attn(norm1(x)); out = y + mlp(norm2(y))`` (exact GELU MLP)."""

    cfg: ModelConfig
    window_size: int
    attention_cls: type = EncoderAttention

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype, pdtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        rel_size = self.window_size or cfg.grid_size
        y = LayerNorm(cfg.encoder_layernorm_eps, dtype=dtype, param_dtype=pdtype, name="norm1")(x)
        y = self.attention_cls(
            num_heads=cfg.encoder_num_heads, window_size=self.window_size, rel_size=rel_size,
            use_rel_pos=cfg.use_rel_pos, qkv_bias=cfg.qkv_bias, impl=attention_impl(cfg),
            dtype=dtype, param_dtype=pdtype, name="attn")(y)
        x = x + checkpoint_name(y, "attention_out")
        y = LayerNorm(cfg.encoder_layernorm_eps, dtype=dtype, param_dtype=pdtype, name="norm2")(x)
        y = MLP(cfg.encoder_mlp_dim, x.shape[-1], activation=lambda t: gelu(t, cfg.gelu_approximate),
                names=("lin1", "lin2"), hidden_name="mlp_hidden", dtype=dtype, param_dtype=pdtype, name="mlp")(y)
        return x + y


def _stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


class ImageEncoder(nn.Module):
    cfg: ModelConfig
    attention_cls: type = EncoderAttention

    @nn.compact
    def __call__(self, volume: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype, pdtype = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)
        if volume.ndim != 5 or volume.shape[-1] != cfg.in_chans:
            raise ValueError(f"volume must be [b, h, w, d, {cfg.in_chans}], got {volume.shape}")
        if any(s % cfg.vit_patch_size for s in volume.shape[1:4]):
            raise ValueError(f"volume spatial shape {volume.shape[1:4]} not a multiple of {cfg.vit_patch_size}")
        x = PatchEmbed(cfg.encoder_embed_dim, cfg.vit_patch_size, dtype=dtype, param_dtype=pdtype,
                       name="patch_embed")(volume)
        if cfg.use_abs_pos:
            g = cfg.grid_size
            pos = self.param("pos_embed", nn.initializers.zeros, (1, g, g, g, cfg.encoder_embed_dim), pdtype)
            if pos.shape[1:4] != x.shape[1:4]:
                raise ValueError(f"token grid {x.shape[1:4]} != pos_embed grid {pos.shape[1:4]}; use a volume of "
                                 f"side {cfg.image_size} (or resample the weights: convert --image-size)")
            x = x + pos.astype(dtype)
        self.sow("intermediates", "enc_patch_embed_pos", x)
        unit, repeats = block_schedule(cfg)
        scan = cfg.scan_encoder_blocks and (repeats > 1 or any(n > 1 for _, n in unit))
        if scan and not self.is_initializing():
            x = self._scanned_blocks(x, unit, repeats)
        else:
            policy = checkpoint_policy(cfg.remat_policy)
            block_cls = Block if policy is None else nn.remat(Block, policy=policy)
            for i in range(cfg.encoder_depth):
                x = block_cls(cfg, cfg.block_window_size(i), self.attention_cls, name=f"blocks_{i}")(x)
                self.sow("intermediates", f"enc_block{i}_out", x)
        x = StridedConv(cfg.prompt_embed_dim, 1, use_bias=False, dtype=dtype, param_dtype=pdtype, name="neck_0")(x)
        x = LayerNorm(cfg.layernorm3d_eps, dtype=dtype, param_dtype=pdtype, name="neck_1")(x)
        x = Conv3x3(cfg.prompt_embed_dim, dtype=dtype, param_dtype=pdtype, name="neck_2")(x)
        x = LayerNorm(cfg.layernorm3d_eps, dtype=dtype, param_dtype=pdtype, name="neck_3")(x)
        return x

    def _scanned_blocks(self, x: jax.Array, unit, repeats: int) -> jax.Array:
        """The blocks as scans over the unit's repeats and over runs of identical blocks (see module docstring)."""
        cfg = self.cfg
        params = self.variables["params"]
        period = sum(n for _, n in unit)
        keep = self.is_mutable_collection("intermediates")
        policy = checkpoint_policy(cfg.remat_policy)

        def block_fn(window):
            block = Block(cfg, window, self.attention_cls, parent=None)  # detached: applied as a pure function
            fn = lambda p, h: block.apply({"params": p}, h)  # noqa: E731
            return fn if policy is None else jax.checkpoint(fn, policy=policy, prevent_cse=False)

        # Per run: its blocks' params stacked as [repeats, count, ...]; block (r, j) of run at offset o is
        # blocks_{r * period + o + j}.
        stacked, offset = [], 0
        for _, count in unit:
            stacked.append(_stack([_stack([params[f"blocks_{r * period + offset + j}"] for j in range(count)])
                                   for r in range(repeats)]))
            offset += count

        def unit_fn(h, unit_params):
            outs = []
            for (window, count), run_params in zip(unit, unit_params):
                fn = block_fn(window)
                if count == 1:
                    h = fn(jax.tree_util.tree_map(lambda a: a[0], run_params), h)
                    outs.append(h[None])
                else:
                    h, ys = jax.lax.scan(lambda c, p, fn=fn: (fn(p, c),) * 2, h, run_params)
                    outs.append(ys)
            return h, (jnp.concatenate(outs) if keep else None)

        if repeats == 1:
            x, ys = unit_fn(x, [jax.tree_util.tree_map(lambda a: a[0], s) for s in stacked])
            ys = None if ys is None else ys[None]
        else:
            x, ys = jax.lax.scan(unit_fn, x, stacked)
        if keep:  # ys: [repeats, period, b, g, g, g, E] block outputs
            for i in range(cfg.encoder_depth):
                self.sow("intermediates", f"enc_block{i}_out", ys[i // period, i % period])
        return x


def scan_summary(cfg: ModelConfig) -> str:
    """A one-line description of how ``scan_encoder_blocks`` runs this config's blocks (for logs and benchmarks)."""
    unit, repeats = block_schedule(cfg)
    runs = " + ".join(f"{n}x{'global' if w == 0 else f'window {w}'}" for w, n in unit)
    return f"{repeats} x ({runs})"
