r"""What scanned layers cost in the steady train step: the step with the towers' blocks scanned over stacked parameters
(config.model.scan_layers) against the same step with the blocks unrolled, both compiled in one process and timed in
alternation (`--calls` calls each per round, the fastest kept), so both see the same machine state; the figure is the
median over `--rounds` rounds of the ratio scanned / unrolled. Random-init towers, one device.

  python benchmarks/layout_step_cost.py --config configs/autorad_lung.py:large --config.data.batch_size=2 \
      --modes full,prompt --rounds 10 --calls 1
"""

from absl import app

import common

_CONFIG, _MODES, _ROUNDS, _CALLS = common.define_paired_flags("configs/autorad_lung.py:large", rounds=10, calls=1)


def _step_runner(config, scanned: bool):
    """A call running one train step of a fresh experiment of `config` in the given layout, compiled."""
    config = config.copy_and_resolve_references()
    config.model.scan_layers = scanned
    config.mesh.data = 1
    exp, state = common.jax_experiment(config)
    run = common.train_step_runner(exp, state, common.random_batch(config, len(exp.spec.class_names)))
    run()  # traces and compiles
    return run


def main(argv):
    del argv
    common.print_paired_steps(_CONFIG.value, _MODES.value, _step_runner, ("scanned step", "unrolled step"),
                              rounds=_ROUNDS.value, calls=_CALLS.value, unit="s")


if __name__ == "__main__":
    app.run(main)
