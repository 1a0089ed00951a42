r"""What preprocessing inside the train step costs: the step as it runs (int16 views in; window, augmentation,
normalisation and, in the vision tower, the resize) against the same step fed float32 images preprocessed beforehand
(what a host pipeline would ship; `preprocess.model_inputs` replaced by the identity while that step is traced, so the
images arrive at the model's size and are not resized).

Both steps are compiled in one process and timed in alternation, `--calls` calls each per round (fastest call kept),
so both see the same machine state; the figure is the median over `--rounds` rounds of the ratio of the two.

  python benchmarks/preprocessing_cost.py --config configs/autorad_lung.py:tiny --modes full,prompt
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common
from autorad_jax.data import pipeline, preprocess

_CONFIG = config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:tiny", "Experiment config.",
                                          lock_config=True)
_MODES = flags.DEFINE_list("modes", ["full", "prompt"], "full: vision tower trains too; prompt: prompt learner only.")
_ROUNDS = flags.DEFINE_integer("rounds", 200, "Rounds of alternation (median ratio reported).")
_CALLS = flags.DEFINE_integer("calls", 5, "Calls of each step per round (the fastest is kept).")


def _step_runner(config, fed_images: bool):
    """A closure running one train step of a fresh experiment on a fixed batch (views, or images made from them)."""
    exp, state = common.jax_experiment(config)
    batch = common.random_batch(config, len(exp.spec.class_names))
    prep = preprocess.Preprocessing.from_config(config.data, train=True, seed=config.seed)
    if fed_images:
        batch["view"] = np.asarray(jax.jit(preprocess.images, static_argnums=1)(batch["view"], prep, 0))
    batch = pipeline.to_global(batch, exp.batch_sharding)
    holder = {"state": state}

    def run():
        holder["state"], metrics = exp.train_step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    model_inputs = preprocess.model_inputs
    if fed_images:
        preprocess.model_inputs = lambda views, prep, step=None: views
    try:
        run()  # traces and compiles
    finally:
        preprocess.model_inputs = model_inputs
    return run


def _fastest_call(run, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    del argv
    print("| mode | batch | step, preprocessing inside (ms) | step fed images (ms) | inside / fed, median of rounds |")
    print("| --- | --- | --- | --- | --- |")
    for mode in _MODES.value:
        config = _CONFIG.value.copy_and_resolve_references()
        config.model.trainable = mode
        inside, fed = _step_runner(config, False), _step_runner(config, True)
        t_inside, t_fed, ratios = [], [], []
        for r in range(_ROUNDS.value):
            pairs = ((inside, t_inside), (fed, t_fed))
            for run, times in pairs if r % 2 else pairs[::-1]:  # which step runs first alternates
                times.append(_fastest_call(run, _CALLS.value))
            ratios.append(t_inside[-1] / t_fed[-1])
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        print(f"| {mode} | {config.data.batch_size} | {statistics.median(t_inside) * 1e3:.2f} | "
              f"{statistics.median(t_fed) * 1e3:.2f} | {statistics.median(ratios):.3f} "
              f"(quartiles {q1:.3f}-{q3:.3f}) |", flush=True)


if __name__ == "__main__":
    app.run(main)
