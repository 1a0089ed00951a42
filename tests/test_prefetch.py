"""Overlapped input: batches placed ahead on the devices, in order, and a checkpointable position that ignores them."""

import grain.python as grain
import numpy as np

from autorad_jax.data.prefetch import prefetch_to_device
from autorad_jax.train import sharding


def _loader():
    source = [{"x": np.array([2 * i, 2 * i + 1], np.float32)} for i in range(20)]
    sampler = grain.IndexSampler(20, grain.NoSharding(), shuffle=True, num_epochs=None, seed=3)
    return grain.DataLoader(data_source=source, sampler=sampler, operations=[grain.Batch(8, drop_remainder=True)])


def test_prefetched_batches_are_the_loaders_and_resume_where_consumed():
    mesh = sharding.make_mesh({"data": -1})
    batch_sharding = sharding.logical_sharding(("batch",), mesh)
    expected = [b for _, b in zip(range(6), iter(_loader()))]

    it = prefetch_to_device(iter(_loader()), batch_sharding, size=3)
    got = [next(it)["x"] for _ in range(2)]
    assert got[0].sharding == batch_sharding and len(got[0].addressable_shards) == 8
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), e["x"])

    loader_it = iter(_loader())
    it = prefetch_to_device(loader_it, batch_sharding, size=3)
    for _ in range(2):
        next(it)
    state = it.get_state()  # more batches were read ahead; the position is after the two consumed
    resumed = prefetch_to_device(iter(_loader()), batch_sharding, size=2)
    resumed.set_state(state)
    for e in expected[2:5]:
        np.testing.assert_array_equal(np.asarray(next(resumed)["x"]), e["x"])
