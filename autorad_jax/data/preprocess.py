"""HU views -> AIMv2 image inputs, as jax operations on a batch: the one definition of preprocessing.

    view (int16 HU, [B, S, S, 3])  -> lung window to [0, 1]
                                   -> training augmentation (flips, 90-degree rotations, a small shift filled with
                                      air, contrast and brightness jitter), random words per sample
                                   -> bilinear resize to the model's image size (half-pixel centres, edges clamped,
                                      no antialiasing: jax.image.resize 'linear' and torch's interpolate 'bilinear'
                                      with align_corners=False)
                                   -> AIMv2 normalisation

The host ships the stored int16 slices (a few KB per nodule) and the train and eval steps run this on the devices:
`model_inputs` the steps up to the resize, and the vision tower the resize (`models.resize`), folded into its patch
convolution where the sizes allow (32 -> 56 and 64 -> 224 with 14-pixel patches): the resized image is never made.
`images` is the whole chain, resize included.
The augmentation's random words come from the config's seed and the optimiser step, one row per position in the global
batch, so a resumed run draws what an uninterrupted one would and a sharded run what a one-device run would. Here the
normalisation runs before the resize, which is the same map (the interpolation weights sum to one) on fewer pixels.
Prediction and the exported PyTorch model (`AutoRadLungTorch.preprocess`) take the same steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from autorad_jax.data import pipeline
from autorad_jax.models import families, resize

AIMV2_MEAN = np.array(families.PIPELINE_MEAN, np.float32)  # CLIP's too; other families re-normalise in their towers
AIMV2_STD = np.array(families.PIPELINE_STD, np.float32)
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


def window(hu: jax.Array, window_hu: Sequence[float]) -> jax.Array:
    """Linear CT window: HU in [lo, hi] -> [0, 1], clipped outside."""
    lo, hi = window_hu
    return jnp.clip((hu.astype(jnp.float32) - lo) / (hi - lo), 0.0, 1.0)


def augment(image: jax.Array, draws: jax.Array) -> jax.Array:
    """Training augmentation of one windowed [S, S, C] image in [0, 1] by its row of `augmentation_draws`: a random
    left-right flip, up-down flip, k counter-clockwise quarter turns (`jnp.rot90`) and shift filled with air, in that
    order, then contrast and brightness jitter. The geometric steps are composed into one source pixel per output pixel
    and read with one gather (cheaper than transforming the image four times)."""
    flip_x, flip_y, k, dy, dx, contrast, brightness = augmentation_parameters(draws, image.shape[0])
    n, last = image.shape[0], image.shape[0] - 1
    y, x = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
    y, x = y - dy, x - dx  # out[y, x] = turned[y - dy, x - dx], air outside
    inside = (y >= 0) & (y <= last) & (x >= 0) & (x <= last)
    # turned = rot90(flipped, k): one turn reads flipped[x, last - y]
    y, x = (jnp.select([k == 0, k == 1, k == 2], [y, x, last - y], last - x),
            jnp.select([k == 0, k == 1, k == 2], [x, last - y, last - x], y))
    y = jnp.where(flip_y, last - y, y)
    x = jnp.where(flip_x, last - x, x)
    source = jnp.clip(y, 0, last) * n + jnp.clip(x, 0, last)
    image = jnp.where(inside[..., None], image.reshape(n * n, -1)[source], 0.0)  # 0 = air after windowing
    return jnp.clip(image * (1.0 + CONTRAST_JITTER * contrast) + BRIGHTNESS_JITTER * brightness, 0.0, 1.0)


DRAWS_PER_SAMPLE = 7


def augmentation_draws(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
    """[batch_size, DRAWS_PER_SAMPLE] random uint32 words of a global batch from the seed and the step; row i is
    sample i's. One threefry call for the whole batch: on the CPU each call is a loop of many small operations."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.bits(key, (batch_size, DRAWS_PER_SAMPLE), jnp.uint32)


def augmentation_parameters(draws: jax.Array, size: int) -> tuple[jax.Array, ...]:
    """One sample's augmentation from its words: left-right and up-down flips (booleans), quarter turns k in 0..3,
    shifts dy and dx in -m..m pixels (m = SHIFT_FRACTION of `size`), contrast and brightness in [-1, 1)."""
    m = int(round(SHIFT_FRACTION * size))
    flip_x, flip_y = (draws[0] & 1) == 1, (draws[1] & 1) == 1
    k = (draws[2] % 4).astype(jnp.int32)
    dy, dx = ((draws[3:5] % (2 * m + 1)).astype(jnp.int32) - m)  # modulo bias below 2**-29
    contrast, brightness = (draws[5:7] >> 8).astype(jnp.float32) * 2.0 ** -23 - 1.0  # 24 random bits each
    return flip_x, flip_y, k, dy, dx, contrast, brightness


def model_inputs(views: jax.Array, prep: Preprocessing, step: jax.Array | None = None) -> jax.Array:
    """[B, S, S, 3] HU views -> [B, S, S, 3] windowed, normalised float32 images at the views' resolution, augmented at
    `step` when `prep.augment`: what the train and eval steps feed the models, with `image_size=prep.image_size` (the
    vision tower resizes, folded into its patch convolution where it can)."""
    x = window(views, prep.window_hu)
    if prep.augment:
        if step is None:
            raise ValueError("augmentation needs the step its random draws derive from")
        x = jax.vmap(augment)(x, augmentation_draws(prep.seed, step, x.shape[0]))
    return (x - AIMV2_MEAN) / AIMV2_STD  # normalising before the resize: see the module docstring


def images(views: jax.Array, prep: Preprocessing, step: jax.Array | None = None) -> jax.Array:
    """[B, S, S, 3] HU views -> [B, size, size, 3] normalised float32 images; augmented at `step` when `prep.augment`."""
    return resize.resize(model_inputs(views, prep, step), prep.image_size)
