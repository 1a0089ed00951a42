r"""Train-step throughput of AutoRad-Lung: JAX against PyTorch (transformers' AIMv2 + our prompt learner), same run.

Fixed random inputs, timed after compilation, each step synchronised, median of --steps steps. Prints images/s,
TFLOP/s (analytic model FLOPs, see common.model_flops), MFU against the device's bf16 dense peak, peak device memory,
and the JAX / PyTorch ratios. Modes: full (vision tower + prompt learner train) and prompt (frozen towers).

  python benchmarks/train_throughput.py --config configs/autorad_lung.py:large --batch_sizes 64,128,256 \
      --config.model.dtype=bfloat16 --config.model.attention_implementation=cudnn
  python benchmarks/train_throughput.py --config configs/autorad_lung.py:tiny --batch_sizes 8 --steps 2 \
      --torch eager   # CPU smoke run
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
_MODES = flags.DEFINE_list("modes", ["full", "prompt"], "full: vision tower trains too; prompt: prompt learner only.")
_TORCH = flags.DEFINE_list("torch", ["eager", "compile"], "PyTorch variants to time beside JAX (empty: none).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file.")


def bench_jax(config, mode: str) -> dict:
    exp, state = common.jax_experiment(config)
    batch = pipeline.to_global(common.random_batch(config, len(exp.spec.class_names)), exp.batch_sharding)
    step = exp.train_step
    holder = {"state": state}

    def call():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    seconds = common.time_calls(call, _STEPS.value, _WARMUP.value + 1)  # +1: the compiling call
    flops = common.model_flops(common.shapes(exp, holder["state"]), train=True, vision_trains=mode == "full")
    return common.row("jax", mode, config.data.batch_size, seconds, flops, common.jax_peak_memory_gib())


def bench_torch(config, mode: str, variant: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    exp, state = common.jax_experiment(config)
    model = common.torch_model_like(exp, state, device).train()
    params = common.trainable_torch_parameters(model, mode)
    optimizer = torch.optim.AdamW(params, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    batch = common.random_batch(config, len(exp.spec.class_names))
    images = common.torch_images(config, batch, device)
    radiomics = torch.from_numpy(batch["radiomics"]).to(device)
    labels = torch.from_numpy(batch["label"]).long().to(device)
    autocast_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    forward = torch.compile(model) if variant == "compile" else model
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def call():
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(forward(images, radiomics).float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = common.time_calls(call, _STEPS.value, _WARMUP.value + 1)
    flops = common.model_flops(common.shapes(exp, state), train=True, vision_trains=mode == "full")
    return common.row(f"torch {variant}", mode, config.data.batch_size, seconds, flops,
                      common.torch_peak_memory_gib(device))


def main(argv):
    del argv
    rows = []
    for mode in _MODES.value:
        for batch_size in map(int, _BATCH_SIZES.value):
            config = copy.deepcopy(flags.FLAGS.config)
            config.model.trainable = mode
            config.data.batch_size = config.data.eval_batch_size = batch_size
            rows.append(bench_jax(config, mode))
            rows.extend(bench_torch(config, mode, variant) for variant in _TORCH.value)
    common.report(rows, _JSON.value)


if __name__ == "__main__":
    app.run(main)
