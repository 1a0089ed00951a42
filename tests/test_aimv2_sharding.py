"""AIMv2 vision tower sharded over an 8-device CPU mesh (fsdp and tensor axes) computes the unsharded function."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from autorad_jax.models import aimv2
from autorad_jax.train import sharding
from compiled import forward

CONFIG = aimv2.Aimv2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=56, patch_size=14, use_head=True)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}])
def test_sharded_vision_forward_equals_unsharded(mesh_shape):
    assert jax.device_count() == 8, "tests/conftest.py provides 8 CPU devices"
    model = aimv2.Aimv2VisionModel(CONFIG, rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (8, 56, 56, 3))
    expected = forward(model, pixels)

    mesh = sharding.make_mesh(mesh_shape)
    state = nnx.state(model)
    specs = sharding.logical_shardings(state, mesh)
    assert specs["encoder"]["layers"][0]["ffn"]["gate_proj"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert specs["encoder"]["layers"][0]["attention"]["out_proj"]["kernel"].get_value().spec == P("tensor", "fsdp")
    assert specs["embeddings"]["patch_embed"]["kernel"].get_value().spec == P(None, None, None, "fsdp")

    sharding.shard_module(model, mesh)
    kernel = model.encoder.layers[0].ffn.gate_proj.kernel[...]
    assert kernel.addressable_shards[0].data.shape == (64 // mesh.shape["fsdp"], 128 // mesh.shape["tensor"])
    batch = jax.device_put(pixels, sharding.logical_sharding(("batch", None, None, None), mesh))
    out = nnx.jit(lambda m, x: m(x))(model, batch)
    for name in ("last_hidden_state", "pooler_output"):
        ours, ref = np.asarray(out[name]), np.asarray(expected[name])
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_make_mesh_fills_one_axis():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 4, "fsdp": 4})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
