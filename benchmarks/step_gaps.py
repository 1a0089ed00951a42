r"""Idle time of the device between training steps, from a profiler trace of a real training run.

Trains `--config` on `--config.data.data_dir` with the trainer itself (input pipeline, prefetching to the devices,
metrics fetched one step behind), traces steps `--start` .. `--start + --steps - 1` and reports, over that span, how
much of the time some XLA operation was running and the longest idle gaps.

  python benchmarks/step_gaps.py --config configs/autorad_lung.py:tiny --config.data.data_dir=DATA_DIR
"""

import os
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from autorad_jax.train import profiling, trainer

config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:tiny", "Experiment config.", lock_config=True)
_START = flags.DEFINE_integer("start", 10, "First traced step (the ones before compile and warm up).")
_STEPS = flags.DEFINE_integer("steps", 20, "Traced steps.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to train (default: a temporary directory).")


def main(argv):
    del argv
    config = flags.FLAGS.config
    last = _START.value + _STEPS.value - 1
    with config.unlocked():
        config.train.num_steps = last + 1  # the final step evaluates and saves, outside the traced span
        config.train.eval_every = config.train.checkpoint_every = config.train.log_every = last + 1
        config.train.profile_start_step, config.train.profile_steps = _START.value, _STEPS.value
    with tempfile.TemporaryDirectory() as tmp:
        workdir = _WORKDIR.value or tmp
        trainer.train_and_evaluate(config, workdir)
        idle = profiling.idle_time(profiling.device_operations(profiling.latest_trace(workdir)))
    longest = ", ".join(f"{g:.2f}" for g in idle.gaps_ms[:5]) or "none"
    print("| traced steps | span ms | ms per step | busy ms | idle | gaps | gaps >= 1 ms | longest gaps ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {_START.value}-{last} | {idle.span_ms:.1f} | {idle.span_ms / _STEPS.value:.2f} | {idle.busy_ms:.1f} | "
          f"{idle.idle_fraction:.1%} | {len(idle.gaps_ms)} | {sum(g >= 1 for g in idle.gaps_ms)} | {longest} |")


if __name__ == "__main__":
    app.run(main)
