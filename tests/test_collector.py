"""The cyclic garbage collector is paused while a step is traced and compiled, and runs again after."""

import gc
import weakref

import pytest

from autorad_jax.train import collector


class _Node:
    pass


def test_a_cycle_made_inside_waits_for_the_collector_to_run_again():
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
        node = _Node()
        node.self = node  # a cycle: reference counting alone never frees it
        alive = weakref.ref(node)
        del node
        kept = [[] for _ in range(100_000)]  # far more new containers than the collector's threshold
        assert alive() is not None
    del kept
    assert gc.isenabled()
    gc.collect()
    assert alive() is None


def test_the_collector_runs_again_after_an_error_and_stays_off_if_it_was_off():
    with pytest.raises(RuntimeError):
        with collector.paused():
            raise RuntimeError("in the block")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
