"""Scanned layers in training: 'last_k' on 8 sharded devices trains exactly the last block, as the unrolled layout does
on one device; checkpoints say when the layouts are mixed."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from autorad_jax import modeling
from autorad_jax.train import checkpointing, trainer
from autorad_jax.data import pipeline
from autorad_jax.weights import hf_aimv2
from configs import autorad_lung as experiment

BATCH, NUM_RADIOMICS = 8, 5


def _config(scan: bool, mesh: dict):
    config = experiment.get_config("tiny")
    config.model.vision.image_size = 28
    config.model.update(trainable="last_k", trainable_last_k=1, scan_layers=scan)
    config.data.batch_size = config.data.eval_batch_size = BATCH
    config.mesh.update(mesh)
    return config


def _spec(config):
    return modeling.model_spec(config.model, experiment.CLASS_NAMES, tuple(f"f{i}" for i in range(NUM_RADIOMICS)))


def _train(exp, state, batches):
    for batch in batches:
        state, metrics = exp.train_step(state, pipeline.to_global(batch, exp.batch_sharding))
    return state, float(metrics["loss"])


def test_scanned_last_k_on_eight_devices_trains_what_unrolled_trains():
    assert jax.device_count() == 8, "tests/conftest.py provides 8 CPU devices"
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((BATCH, 28, 28, 3), np.float32),
                "radiomics": rng.standard_normal((BATCH, NUM_RADIOMICS), np.float32),
                "label": rng.integers(0, 3, BATCH).astype(np.int32)} for _ in range(2)]

    unrolled = _config(False, dict(data=1, fsdp=1, tensor=1))
    exp_u = trainer.make_experiment(unrolled, _spec(unrolled))
    state_u = exp_u.init_state()
    model_u, _ = nnx.merge(exp_u.graphdef, state_u)
    before = hf_aimv2.nnx_to_hf_state(model_u.aimv2)

    # The scanned model, on a data x fsdp x tensor mesh, starting from the same weights.
    scanned = _config(True, dict(data=2, fsdp=2, tensor=2))
    exp_s = trainer.make_experiment(scanned, _spec(scanned))
    model_s, optimizer_s = nnx.merge(exp_s.graphdef, exp_s.init_state())
    hf_aimv2.hf_state_to_nnx(model_s.aimv2, before)
    nnx.update(model_s.prompt_learner, jax.device_get(nnx.state(model_u.prompt_learner)))  # a copy: state_u is donated
    state_s = jax.device_put(nnx.state((model_s, optimizer_s)), exp_s.shardings)

    groups = exp_s.shardings[0]["aimv2"]["vision_model"]["encoder"]["layers"]
    assert groups["1"]["ffn"]["gate_proj"]["kernel"].get_value().spec == P(None, "fsdp", "tensor")
    opt_paths = {p for p, _ in nnx.to_flat_state(nnx.state(optimizer_s, nnx.OptState))}
    assert not any(("layers", "0") == tuple(p[i:i + 2]) for p in opt_paths for i in range(len(p)))  # frozen group
    assert any(("layers", "1") == tuple(p[i:i + 2]) for p in opt_paths for i in range(len(p)))

    state_u, loss_u = _train(exp_u, state_u, batches)
    state_s, loss_s = _train(exp_s, state_s, batches)
    after_u = hf_aimv2.nnx_to_hf_state(nnx.merge(exp_u.graphdef, state_u)[0].aimv2)
    after_s = hf_aimv2.nnx_to_hf_state(nnx.merge(exp_s.graphdef, state_s)[0].aimv2)
    assert abs(loss_s - loss_u) <= 1e-5 * abs(loss_u)
    for key, value in after_s.items():
        trains = key.startswith(("vision_model.encoder.layers.1.", "vision_model.head.", "vision_model.rms_norm.",
                                 "visual_projection."))
        if trains:
            assert not np.array_equal(value, before[key]), key
            np.testing.assert_allclose(value, after_u[key], rtol=0, atol=1e-5 * np.abs(after_u[key]).max(),
                                       err_msg=key)
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_checkpoint_of_the_other_layout_names_it(tmp_path):
    saved = experiment.get_config("tiny")
    saved.model.scan_layers = False
    config = experiment.get_config("tiny")
    config.model.scan_layers = True
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="model.scan_layers is False in the checkpoint"):
        checkpointing.check_compatible(saved.to_dict(), config, str(tmp_path))
