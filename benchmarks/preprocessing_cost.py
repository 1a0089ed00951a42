r"""What preprocessing inside the train step costs: the step as it runs (int16 views in; window, augmentation,
normalisation and, in the vision tower, the resize) against the same step fed float32 images preprocessed beforehand
(what a host pipeline would ship; `preprocess.model_inputs` replaced by the identity while that step is traced, so the
images arrive at the model's size and are not resized).

Both steps are compiled in one process and timed in alternation, `--calls` calls each per round (fastest call kept),
so both see the same machine state; the figure is the median over `--rounds` rounds of the ratio of the two.

  python benchmarks/preprocessing_cost.py --config configs/autorad_lung.py:tiny --modes full,prompt
"""

import jax
import numpy as np
from absl import app

import common
from autorad_jax.data import preprocess

_CONFIG, _MODES, _ROUNDS, _CALLS = common.define_paired_flags("configs/autorad_lung.py:tiny", rounds=200, calls=5)


def _step_runner(config, fed_images: bool):
    """A call running one train step of a fresh experiment on a fixed batch (views, or images made from them)."""
    exp, state = common.jax_experiment(config)
    batch = common.random_batch(config, len(exp.spec.class_names))
    prep = preprocess.Preprocessing.from_config(config.data, train=True, seed=config.seed)
    if fed_images:
        batch["view"] = np.asarray(jax.jit(preprocess.images, static_argnums=1)(batch["view"], prep, 0))
    run = common.train_step_runner(exp, state, batch)
    model_inputs = preprocess.model_inputs
    if fed_images:
        preprocess.model_inputs = lambda views, prep, step=None: views
    try:
        run()  # traces and compiles
    finally:
        preprocess.model_inputs = model_inputs
    return run


def main(argv):
    del argv
    common.print_paired_steps(_CONFIG.value, _MODES.value, lambda config, inside: _step_runner(config, not inside),
                              ("step, preprocessing inside", "step fed images"), rounds=_ROUNDS.value,
                              calls=_CALLS.value)


if __name__ == "__main__":
    app.run(main)
