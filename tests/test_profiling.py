"""Idle time read from a profiler trace: the interval arithmetic by hand, and a trace of real jitted calls."""

import time

import jax
import jax.numpy as jnp
import pytest

from autorad_jax.errors import ConfigError
from autorad_jax.train import profiling

MS = 1_000_000  # ns


def test_idle_time_is_the_complement_of_the_union_of_operations():
    ops = [(0, 10 * MS), (5 * MS, 20 * MS), (30 * MS, 40 * MS), (32 * MS, 35 * MS), (41 * MS, 50 * MS)]
    idle = profiling.idle_time(ops)
    assert idle.span_ms == 50 and idle.busy_ms == 20 + 10 + 9
    assert idle.gaps_ms == (10, 1)
    assert idle.idle_fraction == pytest.approx(11 / 50)


def test_a_trace_of_jitted_calls_holds_their_operations_and_the_pause_between_them(tmp_path):
    """Two calls 0.3 s apart: the trace's operations show one idle gap of about that length."""
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    profiler = profiling.StepProfiler(str(tmp_path), start=1, count=2)
    with profiler.step(1):
        y = f(x).block_until_ready()
    time.sleep(0.3)
    with profiler.step(2):
        y = f(y)
    profiler.finished(2, y)
    idle = profiling.idle_time(profiling.device_operations(profiling.latest_trace(str(tmp_path))))
    assert 290 <= idle.gaps_ms[0] <= 400


@pytest.mark.parametrize("start,count", [(-1, 5), (3, 0)])
def test_a_bad_profile_range_is_a_config_error(tmp_path, start, count):
    with pytest.raises(ConfigError, match="profile_start_step"):
        profiling.StepProfiler(str(tmp_path), start, count)
