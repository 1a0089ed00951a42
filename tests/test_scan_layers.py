"""Scanned layers in training: 'last_k' on 8 sharded devices trains exactly the last block, as the unrolled layout does
on one device; checkpoints say when the layouts are mixed."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from autorad_jax import modeling, models
from autorad_jax.data import pipeline
from autorad_jax.data.preprocess import Preprocessing
from autorad_jax.models import trainable_filter
from autorad_jax.train import checkpointing, experiment, steps
from autorad_jax.weights import pretrained
from configs import autorad_lung

BATCH, NUM_RADIOMICS = 8, 5


def _config(scan: bool, mesh: dict):
    config = autorad_lung.get_config("tiny")
    config.model.vision.image_size = 28
    config.model.update(trainable="last_k", trainable_last_k=1, scan_layers=scan)
    config.data.batch_size = config.data.eval_batch_size = BATCH
    config.mesh.update(mesh)
    return config


def _spec(config):
    return modeling.model_spec(config.model, autorad_lung.CLASS_NAMES, tuple(f"f{i}" for i in range(NUM_RADIOMICS)))


def test_scanned_last_k_on_eight_devices_trains_what_unrolled_trains():
    """Two sharded steps of the scanned model against two one-device steps of the unrolled one."""
    assert jax.device_count() == 8, "tests/conftest.py provides 8 CPU devices"
    rng = np.random.default_rng(0)
    batches = [{"view": rng.integers(-1000, 400, (BATCH, 32, 32, 3)).astype(np.int16),
                "radiomics": rng.standard_normal((BATCH, NUM_RADIOMICS), np.float32),
                "label": rng.integers(0, 3, BATCH).astype(np.int32)} for _ in range(2)]

    unrolled = _config(False, {})
    spec = _spec(unrolled)
    model_u, optimizer_u = steps.build(unrolled, spec)
    before = pretrained.nnx_to_hf_state(model_u.aimv2)
    graphdef_u, state_u = nnx.split((model_u, optimizer_u))
    prep = Preprocessing.from_config(unrolled.data, train=True, seed=unrolled.seed)
    step_u = jax.jit(steps.make_train_step(graphdef_u, trainable_filter(unrolled.model, spec), prep))

    # The scanned model, on a data x fsdp x tensor mesh, starting from the same weights.
    scanned = _config(True, dict(data=2, fsdp=2, tensor=2))
    exp = experiment.make_experiment(scanned, spec)
    model_s, optimizer_s = steps.build(scanned, spec)
    pretrained.hf_state_to_nnx(model_s.aimv2, before)
    nnx.update(model_s.prompt_learner, nnx.state(model_u.prompt_learner))
    state_s = jax.device_put(nnx.state((model_s, optimizer_s)), exp.shardings)

    groups = exp.shardings[0]["aimv2"]["vision_model"]["encoder"]["layers"]
    assert groups["1"]["ffn"]["gate_proj"]["kernel"].get_value().spec == P(None, "fsdp", "tensor")
    opt_paths = {p for p, _ in nnx.to_flat_state(nnx.state(optimizer_s, nnx.OptState))}
    assert not any(("layers", "0") == tuple(p[i:i + 2]) for p in opt_paths for i in range(len(p)))  # frozen group
    assert any(("layers", "1") == tuple(p[i:i + 2]) for p in opt_paths for i in range(len(p)))

    for batch in batches:
        state_u, metrics_u = step_u(state_u, batch)
        state_s, metrics_s = exp.train_step(state_s, pipeline.to_global(batch, exp.batch_sharding))
    after_u = pretrained.nnx_to_hf_state(nnx.merge(graphdef_u, state_u)[0].aimv2)
    after_s = pretrained.nnx_to_hf_state(nnx.merge(exp.graphdef, state_s)[0].aimv2)
    assert abs(float(metrics_s["loss"]) - float(metrics_u["loss"])) <= 1e-5 * abs(float(metrics_u["loss"]))
    for key, value in after_s.items():
        trains = key.startswith(("vision_model.encoder.layers.1.", "vision_model.head.", "vision_model.rms_norm.",
                                 "visual_projection."))
        if trains:
            assert not np.array_equal(value, before[key]), key
            # Adam divides by the gradients' scale, so float-order noise of sharded sums shows in tiny updates:
            # allow 1% of this parameter's largest update.
            tol = 1e-5 * np.abs(after_u[key]).max() + 1e-2 * np.abs(after_u[key] - before[key]).max()
            np.testing.assert_allclose(value, after_u[key], rtol=0, atol=tol, err_msg=key)
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_checkpoint_of_the_other_layout_names_it(tmp_path):
    saved = autorad_lung.get_config("tiny")
    saved.model.scan_layers = False
    config = autorad_lung.get_config("tiny")
    config.model.scan_layers = True
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="model.scan_layers is False in the checkpoint"):
        checkpointing.check_compatible(saved.to_dict(), config, str(tmp_path))


@pytest.mark.parametrize("name, part", [("autorad_lung", "prompt_learner"), ("cocoop", "prompt_learner"),
                                        ("linear_probe", "classifier"), ("late_fusion", "classifier")])
def test_the_layout_does_not_change_what_a_seed_draws_outside_the_towers(name, part):
    """Unrolled and scanned blocks draw their weights in another order; what is not a tower (the prompt learner with
    its contexts drawn, ctx_init='', the probes' classifiers) starts from the same values in both layouts."""
    drawn = []
    for scan in (False, True):
        config = autorad_lung.get_config("tiny")
        config.model.update(name=name, scan_layers=scan, ctx_init="")
        model = models.Model(config.model, _spec(config), rngs=nnx.Rngs(3))
        drawn.append(nnx.to_flat_state(nnx.state(getattr(model, part), nnx.Param)))
    assert [path for path, _ in drawn[0]] == [path for path, _ in drawn[1]]
    for (path, unrolled), (_, scanned) in zip(*drawn):
        np.testing.assert_array_equal(scanned.get_value(), unrolled.get_value(), err_msg=str(path))
