r"""Inference throughput of AutoRad-Lung: the JAX eval step against the same model in PyTorch (eager, `torch.compile`),
same process, same dtype, same work.

Fixed random inputs; first (compiling) calls timed alone, then the implementations called in alternation (see
common.compare and train_throughput.py). Prints the median call with its quartiles, the compile time apart, images/s,
TFLOP/s (analytic forward FLOPs), MFU against the device's bf16 dense peak, peak device memory and JAX's speed-up over
each PyTorch variant, with the load average.

  python benchmarks/eval_throughput.py --config configs/autorad_lung.py:large --batch_sizes 128,256 \
      --config.model.dtype=bfloat16 --config.model.attention_implementation=cudnn
  python benchmarks/eval_throughput.py --config configs/autorad_lung.py:large --batch_sizes 2,4 --rounds 5  # CPU
"""

import copy

import jax
import torch
from absl import app

import common
from autorad_jax.data import pipeline

_CONFIG, _BATCH_SIZES, _TORCH, _ROUNDS, _CALLS, _WARMUP, _JSON = common.define_comparison_flags(["128"])


def runners(config, variants) -> list[common.Runner]:
    """The JAX eval step and the PyTorch forward pass + softmax under inference mode, one per variant."""
    exp, state = common.jax_experiment(config)
    flops = common.model_flops(common.shapes(exp, state), train=False, vision_trains=False)
    batch = common.random_batch(config, len(exp.spec.class_names))
    device = common.torch_device()
    model = common.torch_model_like(exp, state, device).eval()
    images = common.torch_images(config, batch, device)
    radiomics = torch.from_numpy(batch["radiomics"]).to(device)
    autocast_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    jax_batch = pipeline.to_global(batch, exp.batch_sharding)

    def torch_call(forward):
        @torch.inference_mode()
        def call():
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                forward(images, radiomics).float().softmax(-1)
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    forwards = {"eager": model, "compile": torch.compile(model)}
    return [common.Runner("jax", lambda: jax.block_until_ready(exp.eval_step(state, jax_batch)), flops,
                          common.jax_peak_memory_gib),
            *(common.Runner(f"torch {v}", torch_call(forwards[v]), flops, lambda: common.torch_peak_memory_gib(device))
              for v in variants)]


def main(argv):
    del argv
    rows = []
    for batch_size in map(int, _BATCH_SIZES.value):
        config = copy.deepcopy(_CONFIG.value)
        config.data.batch_size = config.data.eval_batch_size = batch_size
        rows += common.compare(runners(config, _TORCH.value), "eval", batch_size, rounds=_ROUNDS.value,
                               calls=_CALLS.value, warmup=_WARMUP.value)
        jax.clear_caches()
    common.report(rows, _JSON.value)


if __name__ == "__main__":
    app.run(main)
