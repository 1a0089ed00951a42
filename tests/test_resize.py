"""Bilinear resize, alone and folded into the patch convolution, against jax.image.resize and torch (interpolate, then
conv2d)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from autorad_jax.models import aimv2, resize
from compiled import forward

resize_jit = jax.jit(resize.resize, static_argnums=1)


@pytest.mark.parametrize("n_in,size", [(32, 56), (32, 224), (64, 224), (32, 32), (32, 20), (33, 56)])
def test_resize_matches_jax_image_resize(n_in, size):
    """Strided-slice phases (7 for 32 -> 56, 64 -> 224; 5 for 32 -> 20) and, past MAX_PHASES (56 for 33 -> 56), the
    matmul: both equal jax.image.resize's linear kernel."""
    images = np.random.default_rng(1).random((2, n_in, n_in, 3)).astype(np.float32)
    expected = jax.image.resize(images, (2, size, size, 3), method="linear", antialias=False)
    np.testing.assert_allclose(resize_jit(images, size), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("h,w,size,patch", [(32, 32, 56, 14), (64, 64, 224, 14), (16, 32, 56, 14), (12, 12, 32, 8)])
def test_folded_patch_conv_equals_torch_interpolate_then_conv(h, w, size, patch):
    """32 -> 56 (10 x 10 kernel, stride 8), 64 -> 224 (6 x 6, stride 4), a non-square input, and 12 -> 32 in 8-pixel
    patches (3 input pixels per patch)."""
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    kernel = rng.standard_normal((patch, patch, 3, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    assert all(resize.folds_into_patches(n, size, patch) for n in (h, w))
    out = jax.jit(resize.resized_patch_conv, static_argnums=(3, 4))(images, kernel, bias, size, jnp.float32)

    resized = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=False)
    expected = F.conv2d(resized.double(), torch.from_numpy(kernel).permute(3, 2, 0, 1).double(),
                        torch.from_numpy(bias).double(), stride=patch).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, expected, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("n_in,folded", [(32, True), (16, True), (33, False), (56, False), (112, False)])
def test_vision_embeddings_resize_as_the_resized_image(n_in, folded):
    """The patch tokens of images given with image_size=56 equal those of the images resized to 56 beforehand: folded
    (32, 16), resized first (33: patches at varying phases; 112: a downscale), or unchanged (56). Folded, the patch sums
    run over other terms in another order: tokens of unit RMS differ by ~1e-5."""
    config = aimv2.Aimv2VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     image_size=56, patch_size=14)
    embeddings = aimv2.Aimv2VisionEmbeddings(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    images = np.random.default_rng(3).standard_normal((2, n_in, n_in, 3)).astype(np.float32)
    assert resize.folds_into_patches(n_in, 56, 14) == folded
    resized = np.asarray(jax.image.resize(images, (2, 56, 56, 3), method="linear", antialias=False))
    resized_in_embeddings = nnx.jit(lambda module, x: module(x, image_size=56))(embeddings, images)
    np.testing.assert_allclose(resized_in_embeddings, forward(embeddings, resized), atol=3e-5)
