"""Shared pieces of the throughput benchmarks: random inputs, the JAX and PyTorch models of one config, timing,
analytic model FLOPs and the printed table."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import torch
import transformers
from absl import flags
from flax import nnx
from ml_collections import config_flags

import machine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from autorad_jax import modeling
from autorad_jax.data import pipeline, preprocess
from autorad_jax.models.aimv2 import Aimv2TextConfig, Aimv2VisionConfig
from autorad_jax.train import experiment, perf
from autorad_jax.weights import pretrained, torch_model
from autorad_jax.weights.prompt_learner import prompt_learner_state

# Radiomic features of the lidc_idri builder's default parameters (configs/radiomics.yaml).
NUM_RADIOMICS = 107


def random_batch(config: ml_collections.ConfigDict, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed batch of config.data.batch_size int16 HU views (what the host ships), standardised radiomics and
    labels."""
    rng = np.random.default_rng(seed)
    b, size = config.data.batch_size, pipeline.crop_size(config.data)
    return {"view": rng.integers(-1000, 400, (b, size, size, 3)).astype(np.int16),
            "radiomics": rng.standard_normal((b, NUM_RADIOMICS), np.float32),
            "label": rng.integers(0, num_classes, b).astype(np.int32), "index": np.arange(b, dtype=np.int32)}


def torch_images(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray], device: str) -> torch.Tensor:
    """The batch's views preprocessed once (no augmentation) as NCHW images for the PyTorch model."""
    images = preprocess.images(batch["view"], preprocess.Preprocessing.from_config(config.data))
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


@dataclasses.dataclass(frozen=True)
class Paired:
    """Two calls timed in alternation: median seconds of each, and the median and quartiles of their per-round ratio."""
    first_s: float
    second_s: float
    ratio: float
    ratio_quartiles: tuple[float, float]

    def ratio_text(self) -> str:
        return f"{self.ratio:.3f} (quartiles {self.ratio_quartiles[0]:.3f}-{self.ratio_quartiles[1]:.3f})"


def alternated_times(calls: Sequence[Callable[[], None]], rounds: int, calls_per_round: int) -> list[list[float]]:
    """Times calls (each blocking until its work is done) in one process, so that all see the same machine state: per
    round the fastest of `calls_per_round` calls of each, the order rotating from round to round. One list of seconds
    per call, one entry per round."""
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for i in (r + k for k in range(len(calls))):
            i %= len(calls)
            times[i].append(min(_seconds(calls[i]) for _ in range(calls_per_round)))
    return times


def median_and_quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return median, q1, q3


def paired_times(first: Callable[[], None], second: Callable[[], None], rounds: int, calls: int) -> Paired:
    """`alternated_times` of two calls: the median seconds of each and the median and quartiles of their ratio."""
    times = alternated_times((first, second), rounds, calls)
    ratio, q1, q3 = median_and_quartiles([a / b for a, b in zip(*times)])
    return Paired(statistics.median(times[0]), statistics.median(times[1]), ratio, (q1, q3))


def define_paired_flags(config: str, rounds: int, calls: int) -> tuple:
    """The flags of a paired step benchmark: --config (default `config`), --modes, --rounds and --calls."""
    return (config_flags.DEFINE_config_file("config", config, "Experiment config.", lock_config=True),
            flags.DEFINE_list("modes", ["full", "prompt"],
                              "full: vision tower trains too; prompt: prompt learner only."),
            flags.DEFINE_integer("rounds", rounds, "Rounds of alternation (median ratio reported)."),
            flags.DEFINE_integer("calls", calls, "Calls of each step per round (the fastest is kept)."))


def print_paired_steps(config: ml_collections.ConfigDict, modes: Sequence[str],
                       make_run: Callable[[ml_collections.ConfigDict, bool], Callable[[], None]],
                       names: tuple[str, str], *, rounds: int, calls: int, unit: str = "ms") -> None:
    """For each trainable mode, `make_run(config, True)` (names[0]) timed against `make_run(config, False)` (names[1])
    by `paired_times`, printed as a table row: mode, batch, the median of each, the median ratio and its quartiles."""
    scale = {"ms": 1e3, "s": 1.0}[unit]
    print(f"| mode | batch | {names[0]} ({unit}) | {names[1]} ({unit}) | {names[0]} / {names[1]}, median of rounds |")
    print("| --- | --- | --- | --- | --- |")
    for mode in modes:
        mode_config = config.copy_and_resolve_references()
        mode_config.model.trainable = mode
        t = paired_times(make_run(mode_config, True), make_run(mode_config, False), rounds, calls)
        print(f"| {mode} | {mode_config.data.batch_size} | {t.first_s * scale:.4g} | {t.second_s * scale:.4g} | "
              f"{t.ratio_text()} |", flush=True)


def _seconds(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def train_step_runner(exp: experiment.Experiment, state: nnx.State, batch: dict) -> Callable[[], None]:
    """A call running one train step of `exp` on the fixed `batch` (placed on the devices once), carrying the state
    from call to call (the step donates it)."""
    batch = pipeline.to_global(batch, exp.batch_sharding)
    holder = {"state": state}

    def run():
        holder["state"], metrics = exp.train_step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
    return run


def jax_experiment(config: ml_collections.ConfigDict) -> tuple[experiment.Experiment, nnx.State]:
    """The training experiment (mesh, shardings, jitted steps) for `config` and its freshly initialised state."""
    spec = modeling.resolve_spec(config, tuple(f"feature_{i}" for i in range(NUM_RADIOMICS)))
    exp = experiment.make_experiment(config, spec)
    return exp, exp.init_state()


def torch_model_like(exp: experiment.Experiment, state: nnx.State, device: str) -> torch_model.AutoRadLungTorch:
    """The PyTorch AutoRad-Lung (transformers' AIMv2 + our prompt learner) with the JAX model's weights."""
    model, _ = nnx.merge(exp.graphdef, state)
    aimv2 = transformers.Aimv2Model(transformers.Aimv2Config(**model.aimv2.config.to_hf_dict()))
    aimv2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in pretrained.nnx_to_hf_state(model.aimv2).items()})
    learner = model.prompt_learner
    meta_net = learner.meta_net
    torch_learner = torch_model.PromptLearner(
        n_ctx=learner.n_ctx, width=learner.ctx.shape[-1], num_classes=learner.num_classes,
        length=learner.tokenized_prompts.shape[1], cond_dim=NUM_RADIOMICS,
        meta_hidden_dim=None if meta_net is None else meta_net.linear1.out_features, conditioning=learner.conditioning)
    torch_learner.load_state_dict({k: torch.from_numpy(v) for k, v in prompt_learner_state(learner).items()})
    return torch_model.AutoRadLungTorch(
        aimv2, torch_learner, pooling=model.pooling,
        radiomics=torch_model.RadiomicsStandardizer(torch.zeros(NUM_RADIOMICS), torch.ones(NUM_RADIOMICS))).to(device)


def trainable_torch_parameters(model: torch_model.AutoRadLungTorch, mode: str) -> list[torch.nn.Parameter]:
    """The parameters that train in `mode` ('full': vision tower, its projection and the prompt learner; 'prompt':
    the prompt learner), as the JAX trainer's `trainable_filter`; the others get requires_grad False."""
    trains = list(model.prompt_learner.parameters())
    if mode == "full":
        trains += list(model.towers.vision_model.parameters()) + list(model.towers.visual_projection.parameters())
    chosen = {id(p) for p in trains}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return trains


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the analytic FLOP count needs of a model and a batch."""
    vision: Aimv2VisionConfig
    text: Aimv2TextConfig
    projection_dim: int
    batch: int
    image_size: int
    classes: int
    prompt_tokens: int
    per_sample_prompts: bool  # False for CoOp: one set of class prompts for the whole batch


def shapes(exp: experiment.Experiment, state: nnx.State) -> Shapes:
    model, _ = nnx.merge(exp.graphdef, state)
    c = model.aimv2.config
    return Shapes(c.vision_config, c.text_config, c.projection_dim, exp.config.data.batch_size,
                  exp.config.data.image_size, len(exp.spec.class_names), model.prompt_learner.tokenized_prompts.shape[1],
                  model.prompt_learner.meta_net is not None)


def _tower_forward_flops(hidden: int, mlp: int, layers: int, tokens: int, sequences: int) -> float:
    """2 x matmul parameters x tokens (q, k, v, o projections and the SwiGLU MLP) + attention scores and values."""
    matmul_params = layers * (4 * hidden * hidden + 3 * hidden * mlp)
    attention = layers * 2 * 2 * tokens * tokens * hidden  # QK^T and AV, full (not causal-halved) square
    return sequences * (2 * matmul_params * tokens + attention)


def model_flops(s: Shapes, *, train: bool, vision_trains: bool) -> float:
    """Analytic FLOPs of one step: forward, plus backward x2 where weights train, x1 where only activation gradients
    flow (the frozen text tower, through which the prompt learner's gradient passes)."""
    v, t = s.vision, s.text
    patches = (s.image_size // v.patch_size) ** 2
    vision = _tower_forward_flops(v.hidden_size, v.intermediate_size, v.num_hidden_layers, patches, s.batch)
    vision += s.batch * 2 * patches * (v.patch_size ** 2 * v.num_channels * v.hidden_size)  # patch embedding
    if v.use_head:
        vision += s.batch * 2 * (2 * patches * v.hidden_size ** 2 + v.hidden_size ** 2)
    vision += s.batch * 2 * v.hidden_size * s.projection_dim
    sequences = s.classes * (s.batch if s.per_sample_prompts else 1)
    text = _tower_forward_flops(t.hidden_size, t.intermediate_size, t.num_hidden_layers, s.prompt_tokens, sequences)
    text += sequences * 2 * t.hidden_size * s.projection_dim
    if not train:
        return vision + text
    return vision * (3 if vision_trains else 1) + text * 2


def peak_flops() -> float | None:
    return perf.peak_flops(jax.devices()[0])


def jax_peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2 ** 30 if peak else None


def torch_peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None


def torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Runner:
    """One implementation's step: `call` runs it once and blocks until it is done; `flops` is its analytic work."""
    impl: str
    call: Callable[[], None]
    flops: float
    peak_memory_gib: Callable[[], float | None]


def compare(runners: Sequence[Runner], mode: str, batch: int, *, rounds: int, calls: int, warmup: int) -> list[dict]:
    """Times `runners` (the first is the reference, JAX) on the same work in this process: the first call of each
    (compilation included) alone, then `warmup` untimed calls each, then `alternated_times`. One row per runner: the
    median step and its quartiles, the compile time (first call less the median step), images/s, TFLOP/s, MFU, peak
    memory, the reference's speed-up over it (median and quartiles of the per-round ratio) and the load average."""
    first_call_s = [_seconds(r.call) for r in runners]
    for r in runners:
        for _ in range(warmup):
            r.call()
    times = alternated_times([r.call for r in runners], rounds, calls)
    peak = peak_flops()
    rows = []
    for r, first, seconds in zip(runners, first_call_s, times):
        median, q1, q3 = median_and_quartiles(seconds)
        rows.append({"impl": r.impl, "mode": mode, "batch": batch, "step_ms": 1e3 * median,
                     "step_ms_quartiles": [1e3 * q1, 1e3 * q3], "compile_s": max(first - median, 0.0),
                     "images_per_s": batch / median, "tflops": r.flops / median / 1e12,
                     "mfu": r.flops / median / peak if peak else None, "peak_mem_gib": r.peak_memory_gib(),
                     "jax_speedup": list(median_and_quartiles([b / a for a, b in zip(times[0], seconds)])),
                     "rounds": rounds, "load_average": machine.load_average()})
    return rows


def report(rows: Sequence[dict], json_path: str | None) -> None:
    """Prints the rows (see print_table) and writes them to `json_path` when given."""
    print_table(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(list(rows), f, indent=2)


def print_table(rows: Sequence[dict]) -> None:
    """Rows as a Markdown table: the median step (quartiles), compile time, images/s, TFLOP/s, MFU, peak memory and
    JAX's speed-up over each implementation (the median of the per-round ratio, quartiles), measured in one run."""
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; torch: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; load average {machine.load_average()}")
    print("| impl | mode | batch | step ms (quartiles) | compile s | images/s | TFLOP/s | MFU | peak mem GiB | "
          "JAX speed-up (quartiles) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        (q1, q3), speedup = r["step_ms_quartiles"], r["jax_speedup"]
        print(f"| {r['impl']} | {r['mode']} | {r['batch']} | {r['step_ms']:.4g} ({q1:.4g}-{q3:.4g}) | "
              f"{r['compile_s']:.1f} | {r['images_per_s']:.2f} | {r['tflops']:.3f} | {fmt(r['mfu'], '.1%')} | "
              f"{fmt(r['peak_mem_gib'], '.2f')} | {speedup[0]:.2f}x ({speedup[1]:.2f}-{speedup[2]:.2f}) |", flush=True)


def define_comparison_flags(batch_sizes: Sequence[str]) -> tuple:
    """The flags of the train and eval comparisons: --config, --batch_sizes, --torch, --rounds, --calls, --warmup,
    --json_out."""
    return (config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:large", "Experiment config.",
                                            lock_config=True),
            flags.DEFINE_list("batch_sizes", list(batch_sizes), "Global batch sizes to time."),
            flags.DEFINE_list("torch", ["eager", "compile"], "PyTorch variants timed beside JAX (empty: none)."),
            flags.DEFINE_integer("rounds", 10, "Rounds of alternation between the implementations (medians reported)."),
            flags.DEFINE_integer("calls", 1, "Calls of each step per round (the fastest is kept)."),
            flags.DEFINE_integer("warmup", 2, "Untimed calls of each after its first (compiling) call."),
            flags.DEFINE_string("json_out", None, "Also write the rows to this JSON file."))
