"""bfloat16 error budget of the encoder attention, measured against float32 on any machine (CPU is enough).

    python benchmarks/bf16_error.py                 # the released geometry: 8³ tokens in one 14³ window, 12x64
    python benchmarks/bf16_error.py --json out.json

For one windowed attention block with the released geometry and weights at realistic scales, prints the relative
error (max and RMS of |y − y32|, over max and RMS of |y32|) of each reduced-precision computation:

- ``block:`` the whole attention block (qkv, attention, proj) against the float32 naive padded formulation.
  ``naive bf16`` / ``naive fp16`` is upstream's padded formulation under autocast rules (projections, logits and
  rel-pos terms in half precision, softmax in float32), i.e. upstream's own mixed-precision path: the budget.
  ``ours xla`` keeps logits, bias and softmax in float32; ``ours cudnn construction`` runs what the fused cuDNN
  kernel gets (bias in bf16, padded keys as two split log-mass columns) through XLA's implementation of that call.
- ``core:`` the attention alone, on the bf16 block's own q/k/v and float32 bias, against float32 math on the same
  values: this isolates what each backend does to the softmax terms. ``cast log-mass (before)`` is the earlier
  cuDNN construction that cast the whole padded-key logit (≈ log 2232 + s·q·b_k) to bf16; ``rounding`` is the
  floor set by a bf16 output.

Each row is the worst over ``--seeds`` draws. Not a test: the figures go to README/BENCHMARKS.md with the machine.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.model import attention
from sammed3d_jax.model.attention import EncoderAttention
from sammed3d_jax.model.reference import NaiveEncoderAttention


def _params(key, dim, heads, window, rel_scale, qk_gain):
    c = dim // heads
    ks = jax.random.split(key, 7)
    n = lambda k, s, sc: sc * jax.random.normal(k, s, jnp.float32)  # noqa: E731
    kernel = n(ks[0], (dim, 3 * dim), dim ** -0.5)
    kernel = kernel.at[:, :2 * dim].multiply(qk_gain)  # sharper attention, as trained models have
    return {
        "qkv": {"kernel": kernel, "bias": n(ks[1], (3 * dim,), 0.5)},
        "proj": {"kernel": n(ks[2], (dim, dim), dim ** -0.5), "bias": n(ks[3], (dim,), 0.1)},
        **{f"rel_pos_{a}": n(k, (2 * window - 1, c), rel_scale) for a, k in zip("dhw", ks[4:])},
    }


def _cast_log_mass_attention(q, k, v, bias, pad, scale, implementation="xla"):
    """The earlier cuDNN construction: one extra key column whose whole logit (s·q·b_k + log-mass) is cast to the
    compute dtype, plus one masked column."""
    b, _, h, c = k.shape
    log_mass, pad_key, pad_value = pad
    extra = jnp.einsum("bqhc,hc->bhq", q, pad_key.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    extra = extra + log_mass
    k = jnp.concatenate([k, jnp.zeros((b, 2, h, c), k.dtype)], axis=1)
    v = jnp.concatenate([v, jnp.broadcast_to(jnp.stack([pad_value.astype(v.dtype), jnp.zeros((h, c), v.dtype)]),
                                             (b, 2, h, c))], axis=1)
    bias = jnp.concatenate([bias, extra[..., None], jnp.full(extra.shape, -1e30)[..., None]], axis=-1)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=scale, implementation=implementation)
    return out.astype(jnp.float32)


def _errors(y, ref) -> tuple[float, float]:
    err = np.asarray(y, np.float64) - ref
    return float(np.max(np.abs(err)) / np.max(np.abs(ref))), float(np.sqrt(np.mean(err ** 2) / np.mean(ref ** 2)))


def _attention_inputs(module, params, x):
    """The (q, k, v, bias, pad, scale) that ``module`` hands to the attention backend (one eager call)."""
    captured = {}
    original = attention.attend

    def spy(q, k, v, bias, pad, scale, impl):
        captured.update(args=(q, k, v, bias, pad, scale))
        return original(q, k, v, bias, pad, scale, impl)

    attention.attend = spy
    try:
        module.apply({"params": params}, x)
    finally:
        attention.attend = original
    return captured["args"]


def measure(heads: int, head_dim: int, grid: int, window: int, rel_scale: float, qk_gain: float, seeds: int):
    """Worst over seeds of (rel. max, rel. RMS) error per computation, for the block and for the attention core."""
    dim = heads * head_dim
    kw = dict(num_heads=heads, window_size=window, rel_size=window)
    variants = {
        "block: naive bf16 (upstream autocast)": NaiveEncoderAttention(**kw, dtype=jnp.bfloat16),
        "block: naive fp16 (upstream autocast)": NaiveEncoderAttention(**kw, dtype=jnp.float16),
        "block: ours xla bf16": EncoderAttention(**kw, impl="xla", dtype=jnp.bfloat16),
        "block: ours cudnn construction bf16": EncoderAttention(**kw, impl="fused_xla", dtype=jnp.bfloat16),
    }
    reference = NaiveEncoderAttention(**kw)
    rows: dict[str, list[float]] = {}
    for seed in range(seeds):
        kp, kx = jax.random.split(jax.random.key(seed))
        params = _params(kp, dim, heads, window, rel_scale, qk_gain)
        x = jax.random.normal(kx, (1, grid, grid, grid, dim), jnp.float32)  # a LayerNorm output
        y32 = np.asarray(jax.jit(lambda p, x: reference.apply({"params": p}, x))(params, x), np.float64)
        errors = {name: _errors(jax.jit(lambda p, x, m=m: m.apply({"params": p}, x))(params, x), y32)
                  for name, m in variants.items()}
        # The attention core alone, on the bf16 block's own inputs, against float32 math on the same values.
        q, k, v, bias, pad, scale = _attention_inputs(variants["block: ours xla bf16"], params, x)
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        pad32 = (pad[0], f32(pad[1].astype(q.dtype)), f32(pad[2].astype(q.dtype)))
        core32 = np.asarray(attention.attend(f32(q), f32(k), f32(v), bias, pad32, scale, "xla"), np.float64)
        errors["core: rounding the exact result to bf16"] = _errors(core32.astype(jnp.bfloat16), core32)
        errors["core: ours xla bf16"] = _errors(attention.attend(q, k, v, bias, pad, scale, "xla"), core32)
        errors["core: ours cudnn construction bf16"] = _errors(
            attention.fused_attention(q, k, v, bias, pad, scale, "xla"), core32)
        errors["core: cast log-mass bf16 (before)"] = _errors(_cast_log_mass_attention(q, k, v, bias, pad, scale),
                                                             core32)
        for name, (rel_max, rel_rms) in errors.items():
            old = rows.get(name, [0.0, 0.0])
            rows[name] = [max(old[0], rel_max), max(old[1], rel_rms)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--window", type=int, default=14)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "float32")  # the float32 reference must be float32
    results = {}
    for rel_scale, qk_gain in ((0.2, 1.0), (1.0, 2.0)):
        label = f"rel-pos tables N(0, {rel_scale}²), q/k gain {qk_gain}"
        rows = measure(args.heads, args.head_dim, args.grid, args.window, rel_scale, qk_gain, args.seeds)
        results[label] = rows
        print(f"\n{label}; {args.grid}³ tokens, window {args.window}, {args.heads} heads x {args.head_dim}, "
              f"worst of {args.seeds} seeds, on {jax.devices()[0].device_kind}")
        print(f"{'computation':44s} {'rel. max err':>13s} {'rel. RMS err':>13s}")
        for name, (rel_max, rel_rms) in rows.items():
            print(f"{name:44s} {rel_max:13.2e} {rel_rms:13.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
