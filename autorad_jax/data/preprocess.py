"""HU views -> AIMv2 image inputs, as jax operations on a batch: the one definition of preprocessing.

    view (int16 HU, [B, S, S, 3])  -> lung window to [0, 1]
                                   -> training augmentation (flips, 90-degree rotations, a small shift filled with
                                      air, contrast and brightness jitter), one key per sample
                                   -> bilinear resize to the model's image size (half-pixel centres, edges clamped,
                                      no antialiasing: jax.image.resize 'linear' and torch's interpolate 'bilinear'
                                      with align_corners=False)
                                   -> AIMv2 normalisation

The host ships the stored int16 slices (a few KB per nodule) and the train and eval steps run this on the devices.
Augmentation keys come from the config's seed, the optimiser step and each sample's position in the global batch, so a
resumed run draws what an uninterrupted one would and a sharded run what a one-device run would. Prediction and the
exported PyTorch model (`AutoRadLungTorch.preprocess`) take the same steps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from autorad_jax.data import pipeline

AIMV2_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
AIMV2_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
SHIFT_FRACTION = 0.0625  # largest augmentation shift, as a fraction of the view's size
CONTRAST_JITTER = 0.1
BRIGHTNESS_JITTER = 0.05


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a view into model inputs (hashable: the jitted steps close over it)."""
    window_hu: tuple[float, float]
    image_size: int
    augment: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict, *, train: bool = False,
                    seed: int = 0) -> Preprocessing:
        """Eval (and predict) preprocessing of config.data; with `train`, its augmentation setting and `seed`."""
        lo, hi = (float(v) for v in data_config.window_hu)
        return cls((lo, hi), int(data_config.image_size), bool(train and data_config.augment), int(seed))


def description(data_config: ml_collections.ConfigDict) -> dict:
    """What turns a CT and a nodule mask into the model's inputs: the crop (builder config), the view, and the steps
    of this module with their constants (what `AutoRadLungTorch.preprocess` does); saved in exports."""
    builder = pipeline.builder_config(data_config.builder_config)
    return {"builder_config": builder.name, "crop_size": builder.crop_size, "spacing_mm": builder.spacing_mm,
            "consensus_level": builder.consensus_level, "view": data_config.view,
            "window_hu": [float(v) for v in data_config.window_hu], "image_size": int(data_config.image_size),
            "image_mean": AIMV2_MEAN.tolist(), "image_std": AIMV2_STD.tolist(),
            "steps": ["view: int16 HU [S, S, 3] (pipeline.extract_view of the crop)",
                      "window: clip((hu - window_hu[0]) / (window_hu[1] - window_hu[0]), 0, 1)",
                      "resize to image_size: bilinear, half-pixel centres, edges clamped, no antialiasing "
                      "(torch.nn.functional.interpolate(mode='bilinear', align_corners=False, antialias=False))",
                      "normalise: (x - image_mean) / image_std per channel"],
            "pixel_layout": "NCHW (PyTorch) / NHWC (JAX)"}


@functools.lru_cache(maxsize=16)
def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of linear interpolation with half-pixel centres and clamped edges, no antialiasing."""
    x = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - (x - lo))
    np.add.at(m, (np.arange(n_out), hi), x - lo)
    return m.astype(np.float32)


def window(hu: jax.Array, window_hu: Sequence[float]) -> jax.Array:
    """Linear CT window: HU in [lo, hi] -> [0, 1], clipped outside."""
    lo, hi = window_hu
    return jnp.clip((hu.astype(jnp.float32) - lo) / (hi - lo), 0.0, 1.0)


def resize(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, H, W, C] images to [B, size, size, C] (see `linear_resize_matrix`)."""
    _, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images
    rows, cols = linear_resize_matrix(h, size), linear_resize_matrix(w, size)
    return jnp.einsum("yh,bhwc,xw->byxc", rows, images, cols, precision=jax.lax.Precision.HIGHEST)


def augment(image: jax.Array, key: jax.Array) -> jax.Array:
    """Training augmentation of one windowed [S, S, C] image in [0, 1]: a random left-right flip, up-down flip, k
    counter-clockwise quarter turns (`jnp.rot90`) and shift filled with air, in that order, then contrast and
    brightness jitter. The geometric steps are composed into one source pixel per output pixel and read with one
    gather (cheaper than transforming the image four times)."""
    flip_x, flip_y, turn, shift, jitter = jax.random.split(key, 5)
    n, last = image.shape[0], image.shape[0] - 1
    m = int(round(SHIFT_FRACTION * n))
    dy, dx = jax.random.randint(shift, (2,), -m, m + 1)
    y, x = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
    y, x = y - dy, x - dx  # out[y, x] = turned[y - dy, x - dx], air outside
    inside = (y >= 0) & (y <= last) & (x >= 0) & (x <= last)
    k = jax.random.randint(turn, (), 0, 4)  # turned = rot90(flipped, k): one turn reads flipped[x, last - y]
    y, x = (jnp.select([k == 0, k == 1, k == 2], [y, x, last - y], last - x),
            jnp.select([k == 0, k == 1, k == 2], [x, last - y, last - x], y))
    y = jnp.where(jax.random.bernoulli(flip_y), last - y, y)
    x = jnp.where(jax.random.bernoulli(flip_x), last - x, x)
    source = jnp.clip(y, 0, last) * n + jnp.clip(x, 0, last)
    image = jnp.where(inside[..., None], image.reshape(n * n, -1)[source], 0.0)  # 0 = air after windowing
    contrast, brightness = jax.random.uniform(jitter, (2,), minval=-1.0, maxval=1.0)
    return jnp.clip(image * (1.0 + CONTRAST_JITTER * contrast) + BRIGHTNESS_JITTER * brightness, 0.0, 1.0)


def augmentation_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
    """One key per sample of a global batch: from the seed, the step and the sample's position."""
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(batch_size))


def images(views: jax.Array, prep: Preprocessing, step: jax.Array | None = None) -> jax.Array:
    """[B, S, S, 3] HU views -> [B, size, size, 3] normalised float32 images; augmented at `step` when `prep.augment`."""
    x = window(views, prep.window_hu)
    if prep.augment:
        if step is None:
            raise ValueError("augmentation needs the step its keys derive from")
        x = jax.vmap(augment)(x, augmentation_keys(prep.seed, step, x.shape[0]))
    return (resize(x, prep.image_size) - AIMV2_MEAN) / AIMV2_STD
