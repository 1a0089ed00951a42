"""Bilinear resize of image batches: half-pixel centres, edges clamped, no antialiasing (jax.image.resize 'linear' and
torch's interpolate 'bilinear' with align_corners=False), on its own or folded into a patch convolution.

Resizing and then cutting patches with a stride-`patch` convolution is one linear map. Where the resize upsamples and
every output patch starts at the same interpolation phase (`patch * n_in / n_out` a whole number `s` of input pixels),
each output patch reads the same `s + 2` input pixels per axis (one either side, edge-padded) with the same weights, so
the map is a stride-`s` convolution of the small image by the patch kernel folded with those weights: 32 -> 56 with
14-pixel patches is a 10 x 10 kernel at stride 8, 64 -> 224 a 6 x 6 kernel at stride 4. The resized image is never
made, and the convolution reads fewer pixels than the patch convolution of the resized image would.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_PHASES = 32  # beyond, the strided slices below compile slowly (33 -> 224: 224 phases, 7.7 s) and a matmul is used


def source_positions(count: int, n_in: int, n_out: int) -> np.ndarray:
    """Input coordinates of output pixels 0 .. count - 1 of an n_in -> n_out resize, with half-pixel centres."""
    return (np.arange(count, dtype=np.float64) + 0.5) * n_in / n_out - 0.5


@functools.lru_cache(maxsize=16)
def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of linear interpolation with half-pixel centres and clamped edges, no antialiasing."""
    x = np.clip(source_positions(n_out, n_in, n_out), 0.0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - (x - lo))
    np.add.at(m, (np.arange(n_out), hi), x - lo)
    return m.astype(np.float32)


def resize(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, H, W, C] images to [B, size, size, C] (the weights of `linear_resize_matrix`): as
    strided slices (element-wise work, about 3x faster on a CPU than the matmul by those weights), or past
    MAX_PHASES as that matmul."""
    _, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images
    if max(_phases(h, size), _phases(w, size)) > MAX_PHASES:
        rows, cols = linear_resize_matrix(h, size), linear_resize_matrix(w, size)
        return jnp.einsum("yh,bhwc,xw->byxc", rows, images, cols, precision=jax.lax.Precision.HIGHEST)
    return _resize_axis(_resize_axis(images, 2, size), 1, size)


def _phases(n_in: int, n_out: int) -> int:
    return n_out // math.gcd(n_in, n_out)


def _resize_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
    """Linear interpolation along `axis` as p phases of strided slices, where n_out / n_in = p / q in lowest terms:
    output p*k + r reads inputs q*k + lo_r and q*k + lo_r + 1 with the same weights for every k."""
    n_in = x.shape[axis]
    groups = math.gcd(n_in, n_out)
    p, q = n_out // groups, n_in // groups
    padding = [(0, 0)] * x.ndim
    padding[axis] = (1, 1)
    padded = jnp.pad(x, padding, mode="edge")  # the clamped edges: index -1 reads pixel 0, index n_in pixel n_in - 1
    phases = []
    for source in source_positions(p, q, p):
        lo = math.floor(source)
        frac = float(source - lo)
        below, above = (jax.lax.slice_in_dim(padded, lo + 1 + d, lo + 2 + d + q * (groups - 1), q, axis)
                        for d in (0, 1))
        phases.append(below + frac * (above - below))
    shape = list(x.shape)
    shape[axis] = n_out
    return jnp.stack(phases, axis + 1).reshape(shape)


def folds_into_patches(n_in: int, n_out: int, patch: int) -> bool:
    """Whether resizing n_in -> n_out pixels and cutting `patch`-pixel patches is one convolution of the n_in pixels:
    the resize upsamples, and patches of the output start every whole number of input pixels."""
    return n_in < n_out and n_out % patch == 0 and (patch * n_in) % n_out == 0


@functools.lru_cache(maxsize=16)
def patch_resize_weights(n_in: int, n_out: int, patch: int) -> np.ndarray:
    """[patch, s + 2] weights by which output pixel o of any patch k reads input pixels k*s - 1 ... k*s + s (s =
    patch * n_in / n_out) of the input edge-padded by one pixel, for a resize that `folds_into_patches`."""
    stride = patch * n_in // n_out
    source = source_positions(patch, n_in, n_out)
    lo = np.floor(source).astype(int)  # -1 at most once, at the first pixel: the padding holds the clamped edge
    frac = source - lo
    weights = np.zeros((patch, stride + 2))
    weights[np.arange(patch), lo + 1] += 1.0 - frac
    weights[np.arange(patch), lo + 2] += frac
    return weights.astype(np.float32)


def resized_patch_conv(images: jax.Array, kernel: jax.Array, bias: jax.Array | None, size: int, dtype) -> jax.Array:
    """Patch convolution (`kernel` [p, p, C, D], stride p, plus `bias` unless None) of `images` [B, H, W, C] resized to
    size x size, computed as one convolution of `images` (see the module docstring; both axes must
    `folds_into_patches`). The kernel is folded in float32; the convolution runs in `dtype`."""
    (_, h, w, _), patch = images.shape, kernel.shape[0]
    rows, cols = patch_resize_weights(h, size, patch), patch_resize_weights(w, size, patch)
    folded = jnp.einsum("ia,jb,ijcd->abcd", rows, cols, kernel.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    strides = (patch * h // size, patch * w // size)
    out = jax.lax.conv_general_dilated(padded.astype(dtype), folded.astype(dtype), strides, "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out if bias is None else out + bias.astype(dtype)
