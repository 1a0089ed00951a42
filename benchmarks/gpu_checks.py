r"""Numerical checks before the GPU timings: the AIMv2 port against transformers on the device (float32 within 1e-5
relative, bfloat16 stated), and the cuDNN fused attention against XLA's (agreement and forward time).

Same random-init model on both sides (common.torch_model_like: transformers' AIMv2 + our PyTorch prompt learner with
the JAX model's weights), the same preprocessed images. Float32 runs with full-precision matmuls on both sides (no
TF32). Writes one JSON object.

  python benchmarks/gpu_checks.py --config configs/autorad_lung.py:large --batch 32 --json_out checks.json
"""

import copy
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:large", "Experiment config.",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 32, "Images per check.")
_JSON = flags.DEFINE_string("json_out", None, "Write the results to this JSON file.")

FLOAT32_TOLERANCE = 1e-5


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _unit(features: torch.Tensor) -> np.ndarray:
    """L2-normalised, as the JAX model returns its image features."""
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _jax_outputs(config, images_nhwc, radiomics) -> dict[str, np.ndarray]:
    exp, state = common.jax_experiment(config)
    model, _ = nnx.merge(exp.graphdef, state)
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, images, radiomics):
        logits, out = nnx.merge(graphdef, params)(images, radiomics)
        return {"logits": logits.astype(jnp.float32), "image_features": out["image_features"].astype(jnp.float32)}
    return jax.tree.map(np.asarray, forward(params, images_nhwc, radiomics))


def _forward_ms(config, images_nhwc, radiomics, calls: int = 10) -> float:
    """Median milliseconds of the jitted forward pass of `config`'s model (compiled first)."""
    exp, state = common.jax_experiment(config)
    model, _ = nnx.merge(exp.graphdef, state)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x, r: nnx.merge(graphdef, p)(x, r)[0])
    jax.block_until_ready(forward(params, images_nhwc, radiomics))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, images_nhwc, radiomics))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def checks(config, batch_size: int) -> dict:
    """Port (float32, bfloat16) and attention checks of `config`'s model on `batch_size` random views."""
    config = copy.deepcopy(config)
    config.data.batch_size = config.data.eval_batch_size = batch_size
    config.model.dtype, config.model.attention_implementation = "float32", ""
    device = common.torch_device()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    exp, state = common.jax_experiment(config)
    batch = common.random_batch(config, len(exp.spec.class_names))
    images = common.torch_images(config, batch, device)
    radiomics = torch.from_numpy(batch["radiomics"]).to(device)
    model = common.torch_model_like(exp, state, device).eval()
    with torch.no_grad():
        reference = {"logits": model(images, radiomics).float().cpu().numpy(),
                     "image_features": _unit(model.image_features(images))}
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            torch_bf16 = {"logits": model(images, radiomics).float().cpu().numpy(),
                          "image_features": _unit(model.image_features(images))}
    images_nhwc = jnp.asarray(images.permute(0, 2, 3, 1).cpu().numpy())
    with jax.default_matmul_precision("highest"):
        ours = _jax_outputs(config, images_nhwc, batch["radiomics"])
    bf16 = copy.deepcopy(config)
    bf16.model.dtype = "bfloat16"
    ours_bf16 = _jax_outputs(bf16, images_nhwc, batch["radiomics"])
    result = {"device": jax.devices()[0].device_kind, "batch": batch_size,
              "float32": {k: rel_err(ours[k], reference[k]) for k in reference},
              "bfloat16_jax": {k: rel_err(ours_bf16[k], reference[k]) for k in reference},
              "bfloat16_torch_autocast": {k: rel_err(torch_bf16[k], reference[k]) for k in reference}}
    result["float32_within_tolerance"] = max(result["float32"].values()) <= FLOAT32_TOLERANCE
    if jax.devices()[0].platform != "gpu":
        result["cudnn_attention"] = "skipped: cuDNN fused attention needs an NVIDIA GPU"
        return result
    cudnn = copy.deepcopy(bf16)
    cudnn.model.attention_implementation = "cudnn"
    ours_cudnn = _jax_outputs(cudnn, images_nhwc, batch["radiomics"])
    result["cudnn_attention"] = {
        "bfloat16_vs_xla_bfloat16": {k: rel_err(ours_cudnn[k], ours_bf16[k]) for k in reference},
        "forward_ms_cudnn": _forward_ms(cudnn, images_nhwc.astype(jnp.bfloat16), batch["radiomics"]),
        "forward_ms_xla": _forward_ms(bf16, images_nhwc.astype(jnp.bfloat16), batch["radiomics"])}
    return result


def main(argv):
    del argv
    result = checks(_CONFIG.value, _BATCH.value)
    print(json.dumps(result, indent=2))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
