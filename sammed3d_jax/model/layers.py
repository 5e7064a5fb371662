"""Shared building blocks: LayerNorm with float32 statistics, Dense/MLP, GELU, and the strided 3-D convolutions.

Every layer is defined once here (upstream defines LayerNorm3d three times and MLPBlock twice). Channels-last.
Imports jax/flax/numpy only.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any  # a numpy/jax dtype or scalar type (jnp.float32, jnp.bfloat16, ...)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    # Parity: torch nn.GELU() is the exact erf form; flax/jax default to the tanh approximation.
    return jax.nn.gelu(x, approximate=approximate)


class LayerNorm(nn.Module):
    """LayerNorm over the last (channel) axis; statistics and affine in float32, output in ``dtype``.

    Serves both torch ``nn.LayerNorm`` and upstream's ``LayerNorm3d`` (a per-voxel channel LayerNorm on
    channels-first tensors, which is this on channels-last ones). Variance is the biased mean of squared
    deviations, as torch computes it (no E[x²]−E[x]² shortcut).
    """

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Linear/Conv init for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / float(max(fan_in, 1)) ** 0.5
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Dense(nn.Module):
    """``y = x @ kernel + bias`` with kernel ``(in, out)`` (torch Linear weight transposed) and torch's init.

    The output is tagged with the module's name (``jax.ad_checkpoint.checkpoint_name``, e.g. "qkv"), so a
    rematerialisation policy can keep it by name; outside ``jax.checkpoint`` the tag does nothing.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", torch_uniform(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return checkpoint_name(y, self.name) if self.name else y


class MLP(nn.Module):
    """Stack of Dense layers (``layers_0`` ... ``layers_{n-1}``) with an activation between them, none at the end.

    Upstream's ``MLP`` (hypernetworks, IoU head) with ReLU; also used as upstream's two-layer ``MLPBlock`` when
    ``names=("lin1", "lin2")``. ``hidden_name`` tags the activations between layers for rematerialisation
    policies (``checkpoint_name``).
    """

    hidden_dim: int
    output_dim: int
    num_layers: int = 2
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    names: tuple[str, ...] | None = None
    hidden_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        names = self.names or tuple(f"layers_{i}" for i in range(self.num_layers))
        for i, name in enumerate(names):
            last = i == len(names) - 1
            x = Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)(x)
            if not last:
                x = self.activation(x)
                if self.hidden_name:
                    x = checkpoint_name(x, self.hidden_name)
        return x


def _patchify(x: jax.Array, k: int) -> jax.Array:
    """[b, h, w, d, c] -> [b, h/k, w/k, d/k, k*k*k*c], each patch flattened in (k0, k1, k2, c) order."""
    b, h, w, d, c = x.shape
    x = x.reshape(b, h // k, k, w // k, k, d // k, k, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, h // k, w // k, d // k, k * k * k * c)


class StridedConv(nn.Module):
    """Conv3d with kernel == stride and no padding, as a patchify + matmul (exact, and fast on every backend).

    Kernel layout ``(k, k, k, in, out)`` (torch ``(out, in, k0, k1, k2)`` transposed (2, 3, 4, 1, 0)). Serves the
    patch embedding (k=16), the mask-prompt downscaler (k=2) and the 1x1x1 convolutions.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        fan_in = k * k * k * cin
        kernel = self.param("kernel", torch_uniform(fan_in), (k, k, k, cin, self.features), self.param_dtype)
        patches = _patchify(x.astype(self.dtype), k) if k > 1 else x.astype(self.dtype)
        y = jnp.dot(patches, kernel.reshape(fan_in, self.features).astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", torch_uniform(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Conv3x3(nn.Module):
    """Conv3d, kernel 3, stride 1, zero padding 1, no bias (the second neck convolution)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(27 * cin), (3, 3, 3, cin, self.features), self.param_dtype)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1, 1, 1),
            padding=((1, 1), (1, 1), (1, 1)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


class DepthToSpaceConvTranspose(nn.Module):
    """ConvTranspose3d with kernel == stride == 2, no padding, as one matmul and a depth-to-space reshape.

    Each output voxel ``(2i+a, 2j+b, 2k+c)`` receives exactly one tap: ``y = bias + x[i,j,k] @ kernel[a,b,c]``.
    Kernel layout ``(2, 2, 2, in, out)`` = torch's ``(in, out, k0, k1, k2)`` transposed (2, 3, 4, 0, 1), with no
    spatial flip (a flip is only needed when feeding flax's ``nn.ConvTranspose`` with ``transpose_kernel=False``).
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, d, cin = x.shape
        # Parity: torch takes a ConvTranspose3d's fan_in from weight dim 1 (out_channels * k^3).
        kernel = self.param("kernel", torch_uniform(8 * self.features), (2, 2, 2, cin, self.features),
                            self.param_dtype)
        bias = self.param("bias", torch_uniform(self.features * 8), (self.features,), self.param_dtype)
        y = jnp.einsum("nhwdi,abcio->nhawbdco", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, 2 * d, self.features) + bias.astype(self.dtype)


class Embedding(nn.Module):
    """A learned table ``embedding`` of shape ``(num, features)`` (torch ``nn.Embedding.weight``), N(0, 1) init."""

    num: int
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.initializers.normal(1.0), (self.num, self.features), self.param_dtype)
