"""Encoder self-attention with decomposed 3-D relative position, windowed attention computed exactly without padding.

Upstream pads the token grid (8³ for the released model) at the end of every axis up to a multiple of the window
(14), attends over whole 14³ windows and crops. Padding happens after the block's LayerNorm, so a padded token is a
zero vector: its key is the k-part of the qkv bias and its value the v-part, and it is not masked. We never build
the padded tokens. Each window is attended over its real tokens only, plus one extra key column per query that
carries the exact total contribution of the window's padded keys:

    logit_pad(q) = log Σ_{padded t} exp(s q·b_k + r_0[t_0] + r_1[t_1] + r_2[t_2])
                 = s q·b_k + log( Π_a F_a − Π_a A_a ),   F_a = Σ_{t<w} e^{r_a[t]},  A_a = Σ_{t<real_a} e^{r_a[t]}

(the relative-position logit factorises over the three axes), with value b_v. ``Π F − Π A`` is evaluated as the
telescoping sum ``Σ_a (Π_{i<a} A_i) P_a (Π_{i>a} F_i)`` with ``P = F − A`` summed directly, so it has no
cancellation, and every exponential is taken relative to the per-axis maximum: it is stable in bfloat16 compute
with float32 accumulation. Windows are grouped by their real extent per axis (full, or the ragged last one), so any
grid/window ratio is exact: grid smaller than the window, several windows, partial padding.

Backends: ``impl="xla"`` is a plain einsum/softmax formulation with float32 logits, bias and softmax whatever the
compute dtype. ``impl="cudnn"`` (bf16/fp16 only) feeds the same terms to
``jax.nn.dot_product_attention(implementation="cudnn")``, whose bias is in the compute dtype: the padded keys
become two key columns holding ``b_k``/``b_v`` whose log-mass biases are split so that bfloat16 rounding does not
move the padded mass (see :func:`split_log_mass`; casting the log-mass ≈ log 2232 itself would cost 1.6 % of it).
The real keys' relative-position bias is still rounded to bf16 there, as upstream's autocast rounds it: on the
released geometry that makes the attention itself ~8x less accurate than the XLA path in bf16
(``benchmarks/bf16_error.py``), so XLA is the accurate choice for bf16 and cuDNN is opt-in. The naive padded
formulation lives in ``model/reference.py`` and is used by tests and benchmarks only.
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sammed3d_jax.model.layers import Dense, Dtype

def resize_rel_pos(table: jax.Array, length: int) -> jax.Array:
    """Linear interpolation of a ``(L, c)`` table to ``length`` rows (torch ``interpolate(mode="linear")``, no
    align_corners). Identity when the length already matches (always the case at the trained resolution)."""
    src_len = table.shape[0]
    if src_len == length:
        return table
    # Parity: image_encoder3D.py get_rel_pos resizes with F.interpolate(mode="linear", align_corners=False).
    src = (jnp.arange(length, dtype=jnp.float32) + 0.5) * (src_len / length) - 0.5
    src = jnp.maximum(src, 0.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, src_len - 1)
    lam = (src - i0)[:, None]
    return table[i0] * (1.0 - lam) + table[i1] * lam


def rel_pos_matrix(table: jax.Array, size: int) -> jax.Array:
    """``R[i, j] = table[i − j + size − 1]``: ``(size, size, c)`` relative embeddings for query i and key j."""
    table = resize_rel_pos(table, 2 * size - 1)
    idx = jnp.arange(size)[:, None] - jnp.arange(size)[None, :] + (size - 1)
    return table[idx]


def window_groups(grid: tuple[int, ...], window: int) -> list[tuple[tuple[int, int, int], ...]]:
    """Groups of windows with equal real extent. Each group is, per axis, ``(start, num_windows, real_size)``.

    ``window == 0`` (global attention) gives a single group covering the grid.
    """
    per_axis = []
    for g in grid:
        if window == 0:
            per_axis.append([(0, 1, g)])
            continue
        full, rem = divmod(g, window)
        parts = [(0, full, window)] if full else []
        if rem:
            parts.append((full * window, 1, rem))
        per_axis.append(parts)
    return [tuple(p) for p in itertools.product(*per_axis)]


def _to_windows(x: jax.Array, group) -> jax.Array:
    """Slices a group's windows out of ``[b, g0, g1, g2, c]`` -> ``[b * nwin, z0, z1, z2, c]``."""
    (s0, n0, z0), (s1, n1, z1), (s2, n2, z2) = group
    b, c = x.shape[0], x.shape[-1]
    x = x[:, s0:s0 + n0 * z0, s1:s1 + n1 * z1, s2:s2 + n2 * z2]
    x = x.reshape(b, n0, z0, n1, z1, n2, z2, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b * n0 * n1 * n2, z0, z1, z2, c)


def _from_windows(y: jax.Array, group, batch: int) -> jax.Array:
    (_, n0, z0), (_, n1, z1), (_, n2, z2) = group
    c = y.shape[-1]
    y = y.reshape(batch, n0, n1, n2, z0, z1, z2, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(batch, n0 * z0, n1 * z1, n2 * z2, c)


def _softmax_with_extra(logits, extra_logit, v, extra_value):
    """softmax over keys plus one extra key (logit ``extra_logit``, value ``extra_value``), float32 statistics.

    logits [b, h, q, k] f32, extra_logit [b, h, q] f32 or None, v [b, k, h, c], extra_value [h, c] -> [b, q, h, c].
    """
    m = jnp.max(logits, axis=-1)
    if extra_logit is not None:
        m = jnp.maximum(m, extra_logit)
    m = jax.lax.stop_gradient(m)
    p = jnp.exp(logits - m[..., None])
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if extra_logit is not None:
        pe = jnp.exp(extra_logit - m)
        denom = denom + pe
        out = out + jnp.einsum("bhq,hc->bqhc", pe, extra_value.astype(jnp.float32))
    return out / jnp.transpose(denom, (0, 2, 1))[..., None]


def split_log_mass(t: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Two float32 logits ``(hi, lo)`` with ``e^hi + e^lo = e^t`` such that rounding both to ``dtype`` is harmless.

    ``hi`` is ``t`` rounded down to ``dtype`` (exact after the cast); ``lo = log(e^t − e^hi)`` carries the
    remainder, under one ``dtype`` step of ``t`` in relative mass, so its own rounding moves the total mass by at
    most about ``ε² / 2`` (bfloat16 near t ≈ log 2232: 5e-4 at worst) instead of the ``ε / 2`` of rounding ``t``
    itself (1.6 %). Both derivatives w.r.t. ``t`` are 1, so the gradient of the total mass is exact.
    """
    t = t.astype(jnp.float32)
    t0 = jax.lax.stop_gradient(t)
    low = t0.astype(dtype)
    low = jnp.where(low.astype(jnp.float32) > t0, jnp.nextafter(low, jnp.array(-jnp.inf, dtype)), low)
    rest = t0 - low.astype(jnp.float32)  # in [0, one step of dtype at t)
    hi = t - rest
    # log(1 − e^{−rest}) = log(−expm1(−rest)); a zero remainder gets a negligible (not infinite) column.
    lo = t + jnp.maximum(jnp.log(-jnp.expm1(-rest)), -80.0)
    return hi, lo


def _masked_logit(dtype) -> float:
    """A logit that gets exactly zero weight and stays finite in ``dtype`` (cuDNN mishandles differences of huge
    negative biases, so not the dtype's minimum)."""
    return -(2.0 ** 14) if jnp.dtype(dtype) == jnp.float16 else -(2.0 ** 40)


def fused_attention(q, k, v, bias, pad, scale: float, implementation: str = "cudnn"):
    """The same attention through ``jax.nn.dot_product_attention`` (cuDNN on GPU; ``implementation="xla"`` runs
    the identical construction on any backend, which is how the tests check it).

    The fused kernel takes the bias in the compute dtype. The padded keys therefore enter as two real key columns
    carrying the padded key vector and value (so the kernel computes ``q·b_k`` itself, as the padded computation
    does) whose biases :func:`split_log_mass` makes exact in the compute dtype. Query and key counts are padded
    to even lengths (cuDNN needs them for bias gradients) with discarded rows and zero-weight columns.

    Args:
        q: ``[b, nq, h, c]``; k, v: ``[b, nk, h, c]`` in the compute dtype.
        bias: ``[b, h, nq, nk]`` float32 or None.
        pad: None, or ``(log_mass [b, h, nq] f32, pad_key [h, c], pad_value [h, c])``: the padded keys' total
            relative-position log-mass per query, and their key and value.
        scale: the logit scale.
        implementation: ``"cudnn"`` or ``"xla"``.

    Returns:
        ``[b, nq, h, c]`` float32.
    """
    b, nq, h, c = q.shape
    dtype = q.dtype
    nk = k.shape[1]
    if bias is None:
        bias = jnp.zeros((b, h, nq, nk), jnp.float32)
    key_cols, value_cols, bias_cols = [k], [v], [bias.astype(dtype)]
    if pad is not None:
        log_mass, pad_key, pad_value = pad
        hi, lo = split_log_mass(log_mass, dtype)
        key_cols.append(jnp.broadcast_to(pad_key.astype(dtype), (b, 2, h, c)))
        value_cols.append(jnp.broadcast_to(pad_value.astype(dtype), (b, 2, h, c)))
        bias_cols.append(jnp.stack([hi, lo], axis=-1).astype(dtype))
        nk += 2
    if nk % 2:
        key_cols.append(jnp.zeros((b, 1, h, c), dtype))
        value_cols.append(jnp.zeros((b, 1, h, c), dtype))
        bias_cols.append(jnp.full((b, h, nq, 1), _masked_logit(dtype), dtype))
    k, v, bias = (jnp.concatenate(cols, axis=ax) for cols, ax in ((key_cols, 1), (value_cols, 1), (bias_cols, 3)))
    if nq % 2:  # one discarded query row
        q = jnp.concatenate([q, jnp.zeros((b, 1, h, c), dtype)], axis=1)
        bias = jnp.concatenate([bias, jnp.zeros((*bias.shape[:2], 1, bias.shape[3]), dtype)], axis=2)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)
    return out[:, :nq].astype(jnp.float32)


def attend(q, k, v, bias, pad, scale: float, impl: str):
    """Multi-head attention of q [b, q, h, c] over k, v [b, k, h, c] with an additive float32 bias [b, h, q, k]
    and, optionally, the padded keys folded into one extra key column (``pad`` as in :func:`fused_attention`).
    Returns [b, q, h, c] float32.

    ``impl``: ``"xla"``, ``"cudnn"``, or ``"fused_xla"`` (the cuDNN construction run through XLA on any backend, for
    tests and error measurements on machines without a GPU).
    """
    if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl 'cudnn' needs bfloat16 or float16 compute, got {q.dtype}; use 'xla'")
    if impl in ("cudnn", "fused_xla"):
        return fused_attention(q, k, v, bias, pad, scale, "cudnn" if impl == "cudnn" else "xla")
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}")
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    extra_logit = extra_value = None
    if pad is not None:
        log_mass, pad_key, extra_value = pad
        qbk = jnp.einsum("bqhc,hc->bhq", q, pad_key.astype(q.dtype), preferred_element_type=jnp.float32)
        extra_logit = qbk * scale + log_mass
    return _softmax_with_extra(logits, extra_logit, v, extra_value)


def _rel_terms(q, bq, tables, size: int):
    """Upstream's three relative-position terms for windows of real extent ``(z0, z1, z2)`` inside ``size``³.

    q [n, z0, z1, z2, h, c] (real queries), bq [h, c]. Returns float32
    ``d [n, z0, z1, z2, h, size]`` (indexed by the key's axis-2 index l),
    ``hh [n, z0, z1, h, size(i), size(l)]`` and ``ww [n, z0, z1, h, size(j), size(l)]`` such that the logit of
    query (a, b, c) for key (i, j, l) gets ``d[a,b,c,l] + hh[a,b,i,l] + ww[a,b,j,l]``.
    """
    n, z0, z1, z2, h, c = q.shape
    rd, rh, rw = (rel_pos_matrix(t, size).astype(q.dtype) for t in tables)  # [size, size, c] each
    # Row of the window at (a, b, ·): the real queries, then padded tokens (whose q is the q-bias).
    row = q
    if z2 < size:
        pad = jnp.broadcast_to(bq.astype(q.dtype), (n, z0, z1, size - z2, h, c))
        row = jnp.concatenate([q, pad], axis=3)
    f32 = jnp.float32
    d = jnp.einsum("nabzhx,alx->nabzhl", q, rd[:z0], preferred_element_type=f32)
    hh = jnp.einsum("nabihx,blx->nabhil", row, rh[:z1], preferred_element_type=f32)
    ww = jnp.einsum("nabjhx,jlx->nabhjl", row, rw, preferred_element_type=f32)
    return d, hh, ww


def _pad_log_mass(d, hh, ww, z: tuple[int, int, int], size: int):
    """log Σ_{padded keys} exp(rel logit), per real query: [n, z0, z1, z2, h] float32.

    Per key column l the sum over (i, j) factorises into (Σ_i e^hh)(Σ_j e^ww); the padded part is the full product
    minus the real product for l < z2, written as P_H·F_W + A_H·P_W (no cancellation), and the full product for
    l >= z2. Exponentials are taken relative to their maxima; the l-sum is a logsumexp.
    """
    z0, z1, z2 = z

    def parts(t, zr):  # t [..., i, l]
        m = jax.lax.stop_gradient(jnp.max(t, axis=-2))
        e = jnp.exp(t - m[..., None, :])
        a, p = jnp.sum(e[..., :zr, :], axis=-2), jnp.sum(e[..., zr:, :], axis=-2)
        return m, a, p

    mh, ah, ph = parts(hh, z0)
    mw, aw, pw = parts(ww, z1)
    l_real = z2 if (z0 < size or z1 < size) else 0  # columns l < z2 add nothing when rows i, j are all real
    term = jnp.concatenate([(ph * (aw + pw) + ah * pw)[..., :l_real], ((ah + ph) * (aw + pw))[..., z2:]], axis=-1)
    cols = np.concatenate([np.arange(l_real), np.arange(z2, size)])  # the key columns l that hold padded keys
    row_log = mh[..., cols] + mw[..., cols] + jnp.log(term)  # [n, z0, z1, h, L]
    per_query = d[..., cols] + row_log[:, :, :, None]  # [n, z0, z1, z2, h, L]
    return jax.nn.logsumexp(per_query, axis=-1)


def _window_attention(q, k, v, bq, bk, bv, tables, window: int, scale: float, impl: str):
    """Attention inside windows of real extent ``(z0, z1, z2)``, the padded keys of a ``window``³ window folded
    in as one extra key column. q, k, v [n, z0, z1, z2, h, c]; b* [h, c]; tables: (d, h, w) or None.
    Returns [n, z0, z1, z2, h, c] float32.
    """
    n, z0, z1, z2, h, c = q.shape
    z = (z0, z1, z2)
    size = window or z0
    if not window and not z0 == z1 == z2:
        raise ValueError(f"global attention needs a cubic token grid (upstream's rel-pos broadcast), got {z}")
    nq = z0 * z1 * z2
    bias = None
    if tables is not None:
        d, hh, ww = _rel_terms(q, bq, tables, size)
        # Parity: image_encoder3D.py add_decomposed_rel_pos broadcasts rel_d[:, :, :, :, None, None],
        # rel_h[:, :, :, None, :, None] and rel_w[:, :, :, None, None, :] against the (q_d, q_h, q_w, k_d, k_h, k_w)
        # logits. That aligns every term's table column with the key's axis-2 index l, and the query row (a, b) of
        # rel_h / rel_w with the key's axis-0 / axis-1 index: logit += d[a,b,c,l] + hh[a,b,i,l] + ww[a,b,j,l].
        # Shapes only agree because windows (and the global grid) are cubic; the trained weights assume it.
        bias = (d[..., :z2][:, :, :, :, :, None, None, :]
                + hh[..., :z0, :z2][:, :, :, None, :, :, None, :]
                + ww[..., :z1, :z2][:, :, :, None, :, None, :, :])  # [n, z0, z1, z2, h, i, j, l]
        bias = bias.reshape(n, nq, h, nq).transpose(0, 2, 1, 3)

    pad = None
    if window and z != (window,) * 3:
        if tables is not None:
            log_mass = _pad_log_mass(d, hh, ww, z, window)
        else:
            log_mass = jnp.full((n, z0, z1, z2, h), math.log(window ** 3 - nq), jnp.float32)
        pad = (log_mass.reshape(n, nq, h).transpose(0, 2, 1), bk, bv)

    flat = lambda t: t.reshape(n, nq, h, c)  # noqa: E731
    out = attend(flat(q), flat(k), flat(v), bias, pad, scale, impl)
    return out.reshape(n, z0, z1, z2, h, c)


class EncoderAttention(nn.Module):
    """Multi-head self-attention of an encoder block, global (``window_size=0``) or windowed, exact.

    Params: ``qkv`` (kernel (E, 3E), output channels [q | k | v], each head-major), ``proj``, and the
    relative-position tables ``rel_pos_d/h/w`` of shape ``(2 * rel_size − 1, head_dim)`` acting on array axes
    0/1/2 (``rel_size`` = window, or the token grid for global blocks).
    """

    num_heads: int
    window_size: int
    rel_size: int
    use_rel_pos: bool = True
    qkv_bias: bool = True
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, g0, g1, g2, dim = x.shape
        h, c = self.num_heads, dim // self.num_heads
        scale = c ** -0.5
        qkv = Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        rel = None
        if self.use_rel_pos:
            shape = (2 * self.rel_size - 1, c)
            rel = tuple(self.param(f"rel_pos_{a}", nn.initializers.zeros, shape, self.param_dtype) for a in "dhw")
        if self.qkv_bias:
            bq, bk, bv = self.variables["params"]["qkv"]["bias"].reshape(3, h, c)
        else:
            bq = bk = bv = jnp.zeros((h, c), self.param_dtype)

        groups = window_groups((g0, g1, g2), self.window_size)
        out = None
        for group in groups:
            win = _to_windows(qkv, group)  # [n, z0, z1, z2, 3E]
            n, z0, z1, z2 = win.shape[:4]
            win = win.reshape(n, z0, z1, z2, 3, h, c)
            y = _window_attention(win[..., 0, :, :], win[..., 1, :, :], win[..., 2, :, :], bq, bk, bv, rel,
                                  self.window_size, scale, self.impl)
            y = _from_windows(y.reshape(n, z0, z1, z2, dim).astype(self.dtype), group, b)
            if len(groups) == 1:
                out = y
            else:
                if out is None:
                    out = jnp.zeros((b, g0, g1, g2, dim), self.dtype)
                (s0, _, _), (s1, _, _), (s2, _, _) = group
                out = jax.lax.dynamic_update_slice(out, y, (0, s0, s1, s2, 0))
        return Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)
