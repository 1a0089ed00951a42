r"""Train and eval throughput of AutoRad-Lung on each tower family (AIMv2, CLIP, SigLIP), same batch, same sizes.

Random-init towers of each family (config.model.towers) at the config variant's sizes, or at ViT-B/16-like sizes
(--size base: 768 wide, 12 blocks, 224 pixels, patch 16, with a 512-wide 12-block text tower); fixed random inputs,
timed after compilation, each call synchronised, median of --steps calls. Prints a Markdown table of images/s and
the peak device memory where the backend reports it.

  python benchmarks/family_throughput.py --config configs/autorad_lung.py:tiny --batch_size 8 --steps 5
  python benchmarks/family_throughput.py --config configs/autorad_lung.py:tiny --size base --batch_size 8 --steps 3
"""

import jax
from absl import app, flags
from ml_collections import config_flags

import common
from autorad_jax.data import pipeline
from autorad_jax.models import families

_CONFIG = config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:tiny", "Experiment config.",
                                          lock_config=True)
_FAMILIES = flags.DEFINE_list("families", list(families.FAMILIES), "Tower families to time.")
_SIZE = flags.DEFINE_enum("size", "config", ["config", "base"], "config: the variant's tower sizes; base: ViT-B/16.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_MODE = flags.DEFINE_enum("mode", "prompt", ["prompt", "full"], "What trains: the prompt learner, or + vision.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")

BASE = dict(image_size=224, vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, patch_size=16),
            text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                      max_position_embeddings=64), projection_dim=512)


def family_config(config, family: str):
    """config with random-init towers of `family` (at ViT-B/16 sizes with --size base) and the benchmark's batch."""
    config = config.copy_and_resolve_references()
    config.model.update(towers=family, pretrained_dir="", trainable=_MODE.value, scan_layers=True)
    config.data.batch_size = config.data.eval_batch_size = _BATCH_SIZE.value
    config.mesh.data = 1
    if _SIZE.value == "base":
        config.data.image_size = config.model.vision.image_size = BASE["image_size"]
        config.model.vision.update(BASE["vision"])
        config.model.text.update(BASE["text"])
        config.model.projection_dim = BASE["projection_dim"]
    return config


def main(argv):
    del argv
    print(f"| family | size | batch | train images/s ({_MODE.value}) | eval images/s | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for family in _FAMILIES.value:
        config = family_config(_CONFIG.value, family)
        exp, state = common.jax_experiment(config)
        batch = common.random_batch(config, len(exp.spec.class_names))
        eval_batch = pipeline.to_global(batch, exp.batch_sharding)
        eval_s = common.time_calls(lambda: jax.block_until_ready(exp.eval_step(state, eval_batch)), _STEPS.value,
                                   _WARMUP.value)
        train_s = common.time_calls(common.train_step_runner(exp, state, batch), _STEPS.value, _WARMUP.value)
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        memory = f"{peak / 2**30:.2f}" if peak else "n/a"
        b = config.data.batch_size
        print(f"| {family} | {_SIZE.value} | {b} | {b / train_s:.1f} | {b / eval_s:.1f} | {memory} |", flush=True)


if __name__ == "__main__":
    app.run(main)
