"""The PyTorch side of the framework comparison: MedIM's SAM-Med3D, its inference and upstream's training step.

MedIM (PyPI ``medim``, the upstream authors' own package) builds the released ``vit_b_ori`` architecture with
``medim.create_model("SAM-Med3D", pretrained=False)``, no download. The training step is written here from the
specification (§4.2-4.4), through the loop shared with the tests (``compare_common.interaction``): encoder once,
decoder once per click with the newest click and the previous low-res logits (not detached), prompt-less passes at a
random step in 2..8 and at the last step, MONAI-style DiceCE summed over the clicks and divided by the 20
accumulation steps, AdamW (weight decay 0.1; prompt encoder and decoder at 0.1 lr), float16 autocast with a
GradScaler as upstream (or bf16 autocast / float32). The click is drawn uniformly from the error region on the
device; upstream draws it with numpy on the host, a device sync per click, so this baseline is if anything faster
than upstream's own loop.

Only ``compare_pytorch.py`` imports this module, and only with the ``compare`` extra (torch, medim) installed.
"""

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import compare_common as cc

ACCUM_STEPS = 20  # upstream's gradient accumulation: the loss is divided by it before backward.
AMP_DTYPES = {"amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}


def setup(device: str, threads: int | None) -> torch.device:
    """Strict float32 arithmetic (no TF32) and the thread count; returns the torch device."""
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch.device("cuda" if device == "gpu" else "cpu")


def create_model(medim_kwargs: Mapping[str, Any], seed: int) -> torch.nn.Module:
    """MedIM's SAM-Med3D with PyTorch's default initialisation drawn from ``seed`` (no weights downloaded)."""
    import medim  # the compare extra

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # medim prints "creating model ..."
        return medim.create_model("SAM-Med3D", pretrained=False, **dict(medim_kwargs))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_numpy(model: torch.nn.Module, state_dict: Mapping[str, np.ndarray]) -> None:
    """Strict load of numpy weights (every key present, no extra key)."""
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, strict=True)


def save_checkpoint(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes ``{"model_state_dict": ...}`` with ``torch.save``, the layout of upstream's trainer and released files."""
    torch.save({"model_state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}},
               path)


def precision(device: torch.device, variant: str):
    """The autocast context of a variant (``fp32``: none); ``+compile`` suffixes are ignored here."""
    base = variant.split("+")[0]
    if base in AMP_DTYPES:
        return torch.autocast(device.type, dtype=AMP_DTYPES[base])
    if base != "fp32":
        raise ValueError(f"unknown PyTorch precision {variant!r}")
    return contextlib.nullcontext()


def sync(device: torch.device):
    """A ``sync(result)`` for ``compare_common.time_calls``: waits for the device's queued work."""
    def fn(_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return fn


def decode(model, emb, points, labels, low):
    """Prompt encoder + mask decoder, mask token 0: low-res logits ``[b, 1, g4, g4, g4]`` (points None: no clicks)."""
    sparse, dense = model.prompt_encoder(points=None if points is None else (points, labels), boxes=None, masks=low)
    low, _ = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)
    return low


def decode_with_iou(model, emb, points, labels, low):
    sparse, dense = model.prompt_encoder(points=(points, labels), boxes=None, masks=low)
    return model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)


def upsample(low: torch.Tensor, size: int) -> torch.Tensor:
    """Trilinear, align_corners=False, float32: upstream's post-processing."""
    return F.interpolate(low.float(), size=(size, size, size), mode="trilinear", align_corners=False)


def make_inference(model, size: int):
    """``infer(volume, points, labels, zero_low) -> bool mask``: encode + one decode + upsampling + threshold."""
    def infer(volume, points, labels, low0):
        emb = model.image_encoder(volume)
        return upsample(decode(model, emb, points, labels, low0), size) > 0
    return infer


def dice_ce(full_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` (>= 1.3), float32: mean per-sample Dice + voxel BCE."""
    x = full_logits.float()
    g = gt.float()
    p = torch.sigmoid(x)
    dims = tuple(range(1, x.ndim))
    dice = 1.0 - (2.0 * (p * g).sum(dims) + cc.DICE_SMOOTH) / ((p * p).sum(dims) + (g * g).sum(dims) + cc.DICE_SMOOTH)
    return dice.mean() + F.binary_cross_entropy_with_logits(x, g)


def sample_click(gt: torch.Tensor, full_logits: torch.Tensor | None, generator: torch.Generator):
    """A voxel drawn uniformly from the error of ``full_logits > 0.5`` (logits, quirk 8), label = gt there.

    Without any error voxel the click is a uniform gt voxel labelled positive (upstream inference's rule; upstream
    training would crash). ``gt`` is bool ``[b, 1, S, S, S]``. Returns ``points [b, 1, 3]`` float voxel indices in
    array-axis order and ``labels [b, 1]`` int64, without a host sync.
    """
    g = gt[:, 0]
    b, s = g.shape[0], g.shape[1]
    err = g if full_logits is None else g ^ (full_logits[:, 0] > cc.CLICK_LOGIT_THRESHOLD)
    has_err = err.flatten(1).any(1)
    cand = torch.where(has_err[:, None, None, None], err, g).flatten(1)
    score = torch.rand(cand.shape, generator=generator, device=cand.device)
    idx = torch.where(cand, score, torch.full_like(score, -1.0)).argmax(1)  # iid uniforms: argmax is uniform
    coords = torch.stack([idx // (s * s), (idx // s) % s, idx % s], dim=1).float()
    labels = g.flatten(1).gather(1, idx[:, None]).long()
    return coords.reshape(b, 1, 3), labels


def click_ops(model, size: int, next_click, embedding: torch.Tensor | None = None) -> cc.ClickOps:
    """Torch operations for ``compare_common.interaction``; ``embedding`` skips the encoder (parity of the loop)."""
    g4 = size // 4

    def zero_logits(emb):
        return torch.zeros((emb.shape[0], 1, g4, g4, g4), device=emb.device, dtype=torch.float32)

    return cc.ClickOps(
        encode=(lambda x: embedding) if embedding is not None else model.image_encoder,
        decode=lambda emb, pts, lbl, low: decode(model, emb, pts, lbl, low),
        upsample=lambda low: upsample(low, size),
        loss=dice_ce,
        next_click=next_click,
        zero_logits=zero_logits,
    )


def replay_clicks(points: Sequence[np.ndarray], labels: Sequence[np.ndarray], device: torch.device):
    """A ``next_click`` that returns recorded clicks (step s -> ``points[s]``, ``labels[s]``)."""
    def next_click(step, gt, full):
        return (torch.tensor(np.array(points[step]), dtype=torch.float32, device=device).reshape(-1, 1, 3),
                torch.tensor(np.array(labels[step]), dtype=torch.long, device=device).reshape(-1, 1))
    return next_click


class Trainer:
    """Upstream's training micro-batch on a MedIM model (see the module docstring).

    Attributes:
      model: the model, put in train mode.
      optimizer: AdamW, three parameter groups as upstream.
      scaler: GradScaler, enabled for float16 autocast only (as upstream's AMP).
    """

    def __init__(self, model, device: torch.device, variant: str, size: int, seed: int, lr: float = 8e-4):
        self.model, self.device, self.variant, self.size = model.train(), device, variant, size
        groups = [
            {"params": list(model.image_encoder.parameters()), "lr": lr},
            {"params": list(model.prompt_encoder.parameters()), "lr": 0.1 * lr},
            {"params": list(model.mask_decoder.parameters()), "lr": 0.1 * lr},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        self.scaler = torch.amp.GradScaler(device.type, enabled=variant.startswith("amp-fp16"))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.ops = click_ops(model, size, lambda s, gt, full: sample_click(gt, full, self.generator))

    def prime(self) -> None:
        """Allocates what a running training holds: a gradient per parameter and AdamW's moments (one update with
        zero gradients at learning rate 0, which leaves the weights as they are), so memory and speed are those of
        a step in the middle of training."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def micro_step(self, image: torch.Tensor, gt: torch.Tensor, num_clicks: int) -> torch.Tensor:
        """Forward over the interaction and backward of ``loss / 20`` (gradients accumulate); returns the loss."""
        prompt_less = cc.prompt_less_steps(num_clicks, cc.draw_insert(self.rng))
        with precision(self.device, self.variant):
            total, _, _ = cc.interaction(self.ops, image, gt, prompt_less)
        self.scaler.scale(total / ACCUM_STEPS).backward()
        return total.detach()

    def update(self) -> None:
        """The optimizer step taken every 20 micro-batches."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=False)

    def close(self) -> None:
        """Frees gradients and optimizer state; the model goes back to eval mode."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.model.eval()


def measure(fn, device: torch.device, warmup: int, repeats: int, resident_bytes: int) -> cc.Measurement:
    """Median seconds and peak memory of ``fn()``: on CUDA the caching allocator's peak during the calls (weights,
    inputs, activations, gradients, optimizer state), on CPU the measurement both sides share
    (``compare_common.measure_cpu``; ``resident_bytes`` is what was resident before the calls)."""
    if device.type != "cuda":
        return cc.measure_cpu(fn, sync(device), warmup, repeats, resident_bytes)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    times = cc.time_calls(fn, sync(device), warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return cc.Measurement(seconds=float(np.median(times)), peak_mib=peak, times=times)


def tensor_bytes(*trees) -> int:
    """Bytes of every tensor in the given tensors, modules, optimizers or lists of them."""
    total = 0
    for t in trees:
        if isinstance(t, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in t.parameters())
            total += sum(p.grad.numel() * p.grad.element_size() for p in t.parameters() if p.grad is not None)
        elif isinstance(t, torch.optim.Optimizer):
            total += sum(v.numel() * v.element_size() for st in t.state.values() for v in st.values()
                         if torch.is_tensor(v))
        elif torch.is_tensor(t):
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            total += tensor_bytes(*t)
    return total


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
