r"""Inference throughput of AutoRad-Lung: the JAX eval step against the same model in PyTorch (eager, compiled).

Fixed random inputs, timed after compilation, each call synchronised, median of --steps calls. Prints images/s,
TFLOP/s (analytic forward FLOPs), MFU against the device's bf16 dense peak, peak device memory and JAX / PyTorch ratios.

  python benchmarks/eval_throughput.py --config configs/autorad_lung.py:large --batch_sizes 128,256 \
      --config.model.dtype=bfloat16 --config.model.attention_implementation=cudnn
  python benchmarks/eval_throughput.py --config configs/autorad_lung.py:tiny --batch_sizes 8 --steps 2 --torch eager
"""

import copy

import jax
import torch
from absl import app, flags
from ml_collections import config_flags

import common
from autorad_jax.data import pipeline

config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:large", "Experiment config.", lock_config=True)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["128"], "Global batch sizes to time.")
_TORCH = flags.DEFINE_list("torch", ["eager", "compile"], "PyTorch variants to time beside JAX (empty: none).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def bench_jax(config) -> dict:
    exp, state = common.jax_experiment(config)
    batch = pipeline.to_global(common.random_batch(config, len(exp.spec.class_names)), exp.batch_sharding)
    seconds = common.time_calls(lambda: jax.block_until_ready(exp.eval_step(state, batch)), _STEPS.value,
                                _WARMUP.value + 1)
    flops = common.model_flops(common.shapes(exp, state), train=False, vision_trains=False)
    return common.row("jax", "eval", config.data.eval_batch_size, seconds, flops, common.jax_peak_memory_gib())


def bench_torch(config, variant: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    exp, state = common.jax_experiment(config)
    model = common.torch_model_like(exp, state, device).eval()
    batch = common.random_batch(config, len(exp.spec.class_names))
    images = common.torch_images(config, batch, device)
    radiomics = torch.from_numpy(batch["radiomics"]).to(device)
    autocast_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    forward = torch.compile(model) if variant == "compile" else model
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    @torch.inference_mode()
    def call():
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            forward(images, radiomics).float().softmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = common.time_calls(call, _STEPS.value, _WARMUP.value + 1)
    flops = common.model_flops(common.shapes(exp, state), train=False, vision_trains=False)
    return common.row(f"torch {variant}", "eval", config.data.eval_batch_size, seconds, flops,
                      common.torch_peak_memory_gib(device))


def main(argv):
    del argv
    rows = []
    for batch_size in map(int, _BATCH_SIZES.value):
        config = copy.deepcopy(flags.FLAGS.config)
        config.data.batch_size = config.data.eval_batch_size = batch_size
        rows.append(bench_jax(config))
        rows.extend(bench_torch(config, variant) for variant in _TORCH.value)
    common.report(rows, _JSON.value)


if __name__ == "__main__":
    app.run(main)
