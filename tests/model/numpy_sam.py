"""An independent float64 numpy SAM-Med3D forward pass over a PyTorch-layout state dict: the golden maker of the
tests.

Written from the written specification of upstream (channels-first tensors, ``nn.Linear`` weights ``(out, in)``,
``Conv3d`` ``(out, in, k, k, k)``, ``ConvTranspose3d`` ``(in, out, k, k, k)``) and sharing no code with
``sammed3d_jax``: windowed blocks really pad the token grid and attend over every padded token, the decomposed
relative position is added exactly as upstream broadcasts it, and every stage the fixtures name is returned in
the fixtures' layouts. It is checked against the golden file made with the original PyTorch code, and then makes
goldens for geometries that fixture does not cover.
"""

import math

import numpy as np
from scipy.special import erf


def _linear(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _layer_norm(x, sd, name, eps, axis=-1):
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [1] * x.ndim
    shape[axis] = -1
    return y * sd[f"{name}.weight"].reshape(shape) + sd[f"{name}.bias"].reshape(shape)


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _resample_linear(a, length, axis):
    """1-D linear resampling along ``axis`` with half-pixel centres, clamped at the edges (align_corners=False)."""
    n = a.shape[axis]
    src = np.maximum((np.arange(length) + 0.5) * n / length - 0.5, 0.0)
    moved = np.moveaxis(a, axis, -1)
    out = np.stack([np.interp(src, np.arange(n), row) for row in moved.reshape(-1, n)]).reshape(*moved.shape[:-1],
                                                                                               length)
    return np.moveaxis(out, -1, axis)


def _conv_stride(x, weight, bias, k):
    """Conv3d with kernel == stride == k, no padding, on channels-first ``x``."""
    b, c, *size = x.shape
    g = [s // k for s in size]
    patches = x.reshape(b, c, g[0], k, g[1], k, g[2], k)
    y = np.einsum("bcxpyqzr,ocpqr->boxyz", patches, weight)
    return y if bias is None else y + bias[None, :, None, None, None]


def _conv3x3(x, weight):
    """Conv3d kernel 3, padding 1 (zeros), no bias, on channels-first ``x``."""
    b, c, d, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (1, 1)))
    y = np.zeros((b, weight.shape[0], d, h, w))
    for i in range(3):
        for j in range(3):
            for l in range(3):
                y += np.einsum("bcxyz,oc->boxyz", xp[:, :, i:i + d, j:j + h, l:l + w], weight[:, :, i, j, l])
    return y


def _conv_transpose2(x, weight, bias):
    """ConvTranspose3d kernel 2, stride 2: output voxel (2i+a, 2j+b, 2k+c) = bias + Σ_ci x[ci,i,j,k] W[ci,o,a,b,c]."""
    b, _, d, h, w = x.shape
    o = weight.shape[1]
    y = np.zeros((b, o, 2 * d, 2 * h, 2 * w))
    for a in range(2):
        for bb in range(2):
            for c in range(2):
                y[:, :, a::2, bb::2, c::2] = np.einsum("bixyz,io->boxyz", x, weight[:, :, a, bb, c])
    return y + bias[None, :, None, None, None]


def _rel_table(table, size):
    """``(size, size, c)``: entry [i, j] = table row i − j + size − 1 (table resampled to 2·size − 1 rows)."""
    if table.shape[0] != 2 * size - 1:
        table = _resample_linear(table, 2 * size - 1, axis=0)
    return np.stack([np.stack([table[i - j + size - 1] for j in range(size)]) for i in range(size)])


def _encoder_attention(x, sd, name, heads):
    """Upstream attention over ``x`` ``(n, s, s, s, E)`` (a cubic window or grid), rel-pos always on."""
    n, s0, s1, s2, dim = x.shape
    c = dim // heads
    tokens = s0 * s1 * s2
    qkv = _linear(x.reshape(n, tokens, dim), sd, f"{name}.qkv").reshape(n, tokens, 3, heads, c)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [n, heads, N, c]
    attn = (q * c ** -0.5) @ k.transpose(0, 1, 3, 2)
    r_d, r_h, r_w = (_rel_table(sd[f"{name}.rel_pos_{a}"], s) for a, s in zip("dhw", (s0, s1, s2)))
    r_q = q.reshape(n, heads, s0, s1, s2, c)
    rel_d = np.einsum("nkdhwc,dtc->nkdhwt", r_q, r_d)
    rel_h = np.einsum("nkdhwc,htc->nkdhwt", r_q, r_h)
    rel_w = np.einsum("nkdhwc,wtc->nkdhwt", r_q, r_w)
    attn = attn.reshape(n, heads, s0, s1, s2, s0, s1, s2)
    # Upstream's broadcast of the three terms against the (q_d, q_h, q_w, k_d, k_h, k_w) logits.
    attn = (attn + rel_d[:, :, :, :, :, None, None] + rel_h[:, :, :, :, None, :, None]
            + rel_w[:, :, :, :, None, None, :]).reshape(n, heads, tokens, tokens)
    y = (_softmax(attn) @ v).transpose(0, 2, 1, 3).reshape(n, s0, s1, s2, dim)
    return _linear(y, sd, f"{name}.proj")


def _block(x, sd, name, heads, window, eps):
    b, g0, g1, g2, dim = x.shape
    y = _layer_norm(x, sd, f"{name}.norm1", eps)
    if window:
        p = [-(-g // window) * window for g in (g0, g1, g2)]
        y = np.pad(y, ((0, 0), (0, p[0] - g0), (0, p[1] - g1), (0, p[2] - g2), (0, 0)))
        nw = [s // window for s in p]
        y = y.reshape(b, nw[0], window, nw[1], window, nw[2], window, dim).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        y = _encoder_attention(y.reshape(-1, window, window, window, dim), sd, f"{name}.attn", heads)
        y = y.reshape(b, *nw, window, window, window, dim).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        y = y.reshape(b, *p, dim)[:, :g0, :g1, :g2]
    else:
        y = _encoder_attention(y, sd, f"{name}.attn", heads)
    x = x + y
    h = _gelu(_linear(_layer_norm(x, sd, f"{name}.norm2", eps), sd, f"{name}.mlp.lin1"))
    return x + _linear(h, sd, f"{name}.mlp.lin2")


def image_encoder(image, sd, cfg):
    """``image`` (B, 1, S, S, S) -> (embeddings (B, C, g, g, g), {"enc_patch_embed_pos", "enc_block{i}_out"})."""
    p = "image_encoder"
    patch = sd[f"{p}.patch_embed.proj.weight"].shape[-1]
    x = _conv_stride(image, sd[f"{p}.patch_embed.proj.weight"], sd[f"{p}.patch_embed.proj.bias"], patch)
    x = x.transpose(0, 2, 3, 4, 1) + sd[f"{p}.pos_embed"]
    stages = {"enc_patch_embed_pos": x}
    for i in range(cfg["encoder_depth"]):
        window = 0 if i in cfg["encoder_global_attn_indexes"] else cfg["window_size"]
        x = _block(x, sd, f"{p}.blocks.{i}", cfg["encoder_num_heads"], window, cfg.get("encoder_layernorm_eps", 1e-6))
        stages[f"enc_block{i}_out"] = x
    eps = cfg.get("layernorm3d_eps", 1e-6)
    y = _conv_stride(x.transpose(0, 4, 1, 2, 3), sd[f"{p}.neck.0.weight"], None, 1)
    y = _layer_norm(y, sd, f"{p}.neck.1", eps, axis=1)
    y = _layer_norm(_conv3x3(y, sd[f"{p}.neck.2.weight"]), sd, f"{p}.neck.3", eps, axis=1)
    return y, stages


def _fourier(u, gauss):
    """Random-Fourier PE of coordinates u in [0, 1] (last axis 3): [sin, cos, sin] of 2π (2u − 1) @ G."""
    proj = 2 * np.pi * ((2 * u - 1) @ gauss)
    return np.concatenate([np.sin(proj), np.cos(proj), np.sin(proj)], axis=-1)


def dense_pe(sd, grid):
    """(1, C, g, g, g); cell (i, j, k) encodes ((j+.5)/g, (i+.5)/g, (k+.5)/g), upstream's x/y order."""
    gauss = sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    c = (np.arange(grid) + 0.5) / grid
    i, j, k = np.meshgrid(c, c, c, indexing="ij")
    return _fourier(np.stack([j, i, k], axis=-1), gauss).transpose(3, 0, 1, 2)[None]


def sparse_embeddings(points, labels, sd, image_size):
    """Point tokens (B, N+1, C): one padding point (label −1) appended, as upstream does without a box."""
    p = "prompt_encoder"
    b = points.shape[0]
    coords = np.concatenate([points + 0.5, np.zeros((b, 1, 3))], axis=1)
    labels = np.concatenate([labels, -np.ones((b, 1), labels.dtype)], axis=1)
    emb = _fourier(coords / image_size, sd[f"{p}.pe_layer.positional_encoding_gaussian_matrix"])
    emb = np.where((labels == -1)[..., None], 0.0, emb)
    emb = emb + (labels == -1)[..., None] * sd[f"{p}.not_a_point_embed.weight"][0]
    emb = emb + (labels == 0)[..., None] * sd[f"{p}.point_embeddings.0.weight"][0]
    return emb + (labels == 1)[..., None] * sd[f"{p}.point_embeddings.1.weight"][0]


def dense_embeddings(mask_input, sd, batch, grid, eps=1e-6):
    """Mask prompt (B, 1, 4g, 4g, 4g) -> (B, C, g, g, g); None -> the no-mask embedding broadcast."""
    p = "prompt_encoder.mask_downscaling"
    if mask_input is None:
        w = sd["prompt_encoder.no_mask_embed.weight"][0]
        return np.broadcast_to(w[None, :, None, None, None], (batch, w.shape[0], grid, grid, grid))
    y = _gelu(_layer_norm(_conv_stride(mask_input, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], 2), sd, f"{p}.1", eps, 1))
    y = _gelu(_layer_norm(_conv_stride(y, sd[f"{p}.3.weight"], sd[f"{p}.3.bias"], 2), sd, f"{p}.4", eps, 1))
    return _conv_stride(y, sd[f"{p}.6.weight"], sd[f"{p}.6.bias"], 1)


def _dec_attention(q, k, v, sd, name, heads):
    q, k, v = (_linear(t, sd, f"{name}.{n}_proj") for t, n in ((q, "q"), (k, "k"), (v, "v")))
    b, nq, d = q.shape
    c = d // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, c).transpose(0, 2, 1, 3)  # noqa: E731
    attn = _softmax(split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(c))
    return _linear((attn @ split(v)).transpose(0, 2, 1, 3).reshape(b, nq, d), sd, f"{name}.out_proj")


def _mlp(x, sd, name, final_relu=False):
    layers = sorted({int(k.split(".")[-2]) for k in sd if k.startswith(f"{name}.layers.")})
    for i in layers:
        x = _linear(x, sd, f"{name}.layers.{i}")
        if i != layers[-1] or final_relu:
            x = np.maximum(x, 0.0)
    return x


def two_way_transformer(src, pos, tokens, sd, heads=8, eps=1e-5):
    """(queries (B, T, C), keys (B, g³, C)) after the two-way transformer."""
    t = "mask_decoder.transformer"
    keys = src.reshape(*src.shape[:2], -1).transpose(0, 2, 1)
    key_pe = pos.reshape(*pos.shape[:2], -1).transpose(0, 2, 1)
    queries = tokens
    depth = len({k.split(".")[3] for k in sd if k.startswith(f"{t}.layers.")})
    for i in range(depth):
        n = f"{t}.layers.{i}"
        if i == 0:
            queries = _dec_attention(queries, queries, queries, sd, f"{n}.self_attn", heads)
        else:
            q = queries + tokens
            queries = queries + _dec_attention(q, q, queries, sd, f"{n}.self_attn", heads)
        queries = _layer_norm(queries, sd, f"{n}.norm1", eps)
        queries = queries + _dec_attention(queries + tokens, keys + key_pe, keys, sd,
                                           f"{n}.cross_attn_token_to_image", heads)
        queries = _layer_norm(queries, sd, f"{n}.norm2", eps)
        h = np.maximum(_linear(queries, sd, f"{n}.mlp.lin1"), 0.0)
        queries = _layer_norm(queries + _linear(h, sd, f"{n}.mlp.lin2"), sd, f"{n}.norm3", eps)
        keys = keys + _dec_attention(keys + key_pe, queries + tokens, queries, sd,
                                     f"{n}.cross_attn_image_to_token", heads)
        keys = _layer_norm(keys, sd, f"{n}.norm4", eps)
    queries = queries + _dec_attention(queries + tokens, keys + key_pe, keys, sd, f"{t}.final_attn_token_to_image",
                                       heads)
    return _layer_norm(queries, sd, f"{t}.norm_final_attn", eps), keys


def mask_decoder(embeddings, pe, sparse, dense, sd, eps3d=1e-6):
    """All mask tokens: (masks (B, M, 4g, 4g, 4g), iou (B, M), queries, keys, upscaled embedding)."""
    m = "mask_decoder"
    b, c, g = embeddings.shape[0], embeddings.shape[1], embeddings.shape[2]
    out_tokens = np.concatenate([sd[f"{m}.iou_token.weight"], sd[f"{m}.mask_tokens.weight"]], axis=0)
    tokens = np.concatenate([np.broadcast_to(out_tokens, (b, *out_tokens.shape)), sparse], axis=1)
    queries, keys = two_way_transformer(embeddings + dense, np.broadcast_to(pe, embeddings.shape), tokens, sd)
    num_masks = sd[f"{m}.mask_tokens.weight"].shape[0]
    src = keys.transpose(0, 2, 1).reshape(b, c, g, g, g)
    up = _conv_transpose2(src, sd[f"{m}.output_upscaling.0.weight"], sd[f"{m}.output_upscaling.0.bias"])
    up = _gelu(_layer_norm(up, sd, f"{m}.output_upscaling.1", eps3d, axis=1))
    up = _gelu(_conv_transpose2(up, sd[f"{m}.output_upscaling.3.weight"], sd[f"{m}.output_upscaling.3.bias"]))
    hyper = np.stack([_mlp(queries[:, 1 + i], sd, f"{m}.output_hypernetworks_mlps.{i}") for i in range(num_masks)],
                     axis=1)
    masks = (hyper @ up.reshape(b, up.shape[1], -1)).reshape(b, num_masks, *up.shape[2:])
    iou = _mlp(queries[:, 0], sd, f"{m}.iou_prediction_head")
    return masks, iou, queries, keys, up


def run(cfg: dict, sd: dict, golden_inputs: dict) -> dict[str, np.ndarray]:
    """Every stage of the fixture format (``parity.STAGES`` names), float32, from the golden inputs."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    image = np.asarray(golden_inputs["image"], np.float64)
    points = np.asarray(golden_inputs["point_coords"], np.float64)
    labels = np.asarray(golden_inputs["point_labels"])
    mask = np.asarray(golden_inputs["mask_input"], np.float64)
    size = cfg["image_size"]
    emb, stages = image_encoder(image, sd, cfg)
    grid = emb.shape[2]
    out = {"image_embeddings": emb, **stages}
    first_global = min(cfg["encoder_global_attn_indexes"], default=None)
    if first_global is not None:
        out["enc_first_global_block_out"] = stages[f"enc_block{first_global}_out"]
    pe = dense_pe(sd, grid)
    out["dense_pe"] = pe
    sparse = sparse_embeddings(points, labels, sd, size)
    out["sparse_embeddings"] = sparse
    for prompt, suffix in ((mask, ""), (None, "_nomask")):
        dense = dense_embeddings(prompt, sd, points.shape[0], grid)
        out["dense_embeddings" + ("_mask" if prompt is not None else "_nomask")] = dense
        masks, iou, queries, keys, up = mask_decoder(emb, pe, sparse, dense, sd)
        out[f"low_res_masks_single{suffix}"], out[f"iou_predictions_single{suffix}"] = masks[:, :1], iou[:, :1]
        out[f"low_res_masks_multi{suffix}"], out[f"iou_predictions_multi{suffix}"] = masks[:, 1:], iou[:, 1:]
        if prompt is not None:
            out["dec_transformer_queries"], out["dec_transformer_keys"], out["dec_upscaled_embedding"] = (
                queries, keys, up)
            full = masks[:, :1]
            for axis in (2, 3, 4):
                full = _resample_linear(full, size, axis)
            out["masks_upsampled_single"] = full
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
