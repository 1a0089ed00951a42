r"""Train-step throughput of AutoRad-Lung: JAX against PyTorch (transformers' AIMv2 + our prompt learner) eager and
`torch.compile` (inductor), same process, same dtype, same work.

Fixed random inputs. Each implementation's first (compiling) call is timed alone; then the implementations' steps are
called in alternation for --rounds rounds (see common.compare), so that all see the same machine state. Prints the
median step with its quartiles, the compile time apart, images/s, TFLOP/s (analytic model FLOPs, see
common.model_flops, the same for every implementation), MFU against the device's bf16 dense peak, peak device memory,
and JAX's speed-up over each PyTorch variant (median of the per-round ratios, quartiles), with the load average.
Modes: full (vision tower + prompt learner train) and prompt (frozen towers).

  python benchmarks/train_throughput.py --config configs/autorad_lung.py:large --batch_sizes 64,128,256 \
      --config.model.dtype=bfloat16 --config.model.attention_implementation=cudnn
  python benchmarks/train_throughput.py --config configs/autorad_lung.py:large --batch_sizes 2,4 --rounds 5  # CPU
"""

import copy

import jax
import torch
from absl import app, flags

import common
from autorad_jax.data import pipeline

_CONFIG, _BATCH_SIZES, _TORCH, _ROUNDS, _CALLS, _WARMUP, _JSON = common.define_comparison_flags(["128"])
_MODES = flags.DEFINE_list("modes", ["full", "prompt"], "full: vision tower trains too; prompt: prompt learner only.")
_LAYOUTS = flags.DEFINE_list("jax_layouts", [], "JAX block layouts to time (scanned, unrolled; the first is the "
                             "reference); empty: the config's config.model.scan_layers alone.")


def torch_train_runners(config, exp, state, mode: str, variants) -> list[common.Runner]:
    """PyTorch train steps (AdamW, gradient clipping as the JAX optimiser) of the model with `state`'s weights, one
    per variant ('eager', 'compile'); the variants share the model and the optimiser."""
    device = common.torch_device()
    model = common.torch_model_like(exp, state, device).train()
    params = common.trainable_torch_parameters(model, mode)
    optimizer = torch.optim.AdamW(params, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    batch = common.random_batch(config, len(exp.spec.class_names))
    images = common.torch_images(config, batch, device)
    radiomics = torch.from_numpy(batch["radiomics"]).to(device)
    labels = torch.from_numpy(batch["label"]).long().to(device)
    autocast_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    flops = common.model_flops(common.shapes(exp, state), train=True, vision_trains=mode == "full")

    def step(forward):
        def call():
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                loss = torch.nn.functional.cross_entropy(forward(images, radiomics).float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    forwards = {"eager": model, "compile": torch.compile(model)}
    return [common.Runner(f"torch {v}", step(forwards[v]), flops, lambda: common.torch_peak_memory_gib(device))
            for v in variants]


def runners(config, mode: str, variants, layouts) -> list[common.Runner]:
    """The JAX train steps (the trainer's jitted step, state donated from call to call), one per layout, and the
    PyTorch ones."""
    jax_runners = []
    for layout in layouts or [None]:
        layout_config = copy.deepcopy(config)
        if layout:
            layout_config.model.scan_layers = {"scanned": True, "unrolled": False}[layout]
        exp, state = common.jax_experiment(layout_config)
        if not jax_runners:
            torch_runners = torch_train_runners(config, exp, state, mode, variants)  # before the step donates `state`
            flops = common.model_flops(common.shapes(exp, state), train=True, vision_trains=mode == "full")
        batch = common.random_batch(config, len(exp.spec.class_names))
        jax_runners.append(common.Runner(f"jax {layout}" if layout else "jax",
                                         common.train_step_runner(exp, state, batch), flops,
                                         common.jax_peak_memory_gib))
    return jax_runners + torch_runners


def main(argv):
    del argv
    rows = []
    for mode in _MODES.value:
        for batch_size in map(int, _BATCH_SIZES.value):
            config = copy.deepcopy(_CONFIG.value)
            config.model.trainable = mode
            config.data.batch_size = config.data.eval_batch_size = batch_size
            rows += common.compare(runners(config, mode, _TORCH.value, _LAYOUTS.value), mode, batch_size, rounds=_ROUNDS.value,
                                   calls=_CALLS.value, warmup=_WARMUP.value)
            jax.clear_caches()
    common.report(rows, _JSON.value)


if __name__ == "__main__":
    app.run(main)
