"""A profiler trace of chosen training steps (`config.train.profile_start_step`, `profile_steps`), for TensorBoard's
profile plugin or XProf, and the device's idle time between steps read back from it.

The trace goes to `<workdir>/profile/plugins/profile/<run>/<host>.xplane.pb` (every process writes its own host's
file). Each step runs inside a `jax.profiler.StepTraceAnnotation`, so the viewers split the trace by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os

import jax
from absl import logging

from autorad_jax.errors import ConfigError


def profile_dir(workdir: str) -> str:
    return os.path.join(workdir, "profile")


class StepProfiler:
    """Traces steps start .. start + count - 1 of a run (1-based, as the trainer counts them); start 0 traces none."""

    def __init__(self, workdir: str, start: int, count: int):
        if start < 0 or (start and count < 1):
            raise ConfigError(f"config.train.profile_start_step={start}, profile_steps={count}: the start must be "
                              "0 (no profile) or a step >= 1, and the count >= 1.")
        self._dir, self._first, self._last = profile_dir(workdir), start, start + count - 1
        self._tracing = False

    def step(self, step: int):
        """Context of the step numbered `step`: starts the trace before the first traced step and annotates it."""
        if self._first and step == self._first:
            jax.profiler.start_trace(self._dir)
            self._tracing = True
        # Outside a trace an annotation records nothing: the untraced steps skip it.
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self._tracing else contextlib.nullcontext()

    def finished(self, step: int, outputs) -> None:
        """After `step` was dispatched: at the last traced step, waits for `outputs` and writes the trace."""
        if self._tracing and step >= self._last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """Writes the trace if one is running (a run that ends early still keeps what it traced)."""
        if not self._tracing:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self._tracing = False
        logging.info("Profile of steps %d-%d written to %s", self._first, self._last, self._dir)


@dataclasses.dataclass(frozen=True)
class IdleTime:
    """The device's busy and idle time over a traced span of steps."""
    span_ms: float  # first operation's start to last operation's end
    busy_ms: float  # union of the operations' intervals
    gaps_ms: tuple[float, ...]  # idle intervals between operations, longest first

    @property
    def idle_fraction(self) -> float:
        return 1.0 - self.busy_ms / self.span_ms if self.span_ms else 0.0


def _is_operation(name: str) -> bool:
    """An XLA operation's event (not the CPU thread pool's or executor's bookkeeping markers)."""
    return not name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor"))


def device_operations(xplane_path: str) -> list[tuple[int, int]]:
    """(start_ns, end_ns) of every XLA operation in a trace: the device planes' events on accelerators; on the CPU
    backend, the events of the threads that run XLA's programs."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    if planes:
        lines = [line for p in planes for line in p.lines if "XLA Ops" in line.name or "Stream" in line.name]
    else:
        lines = [line for p in data.planes if p.name == "/host:CPU" for line in p.lines
                 if line.name.startswith(("tf_XLAPjRtCpuClient", "tf_XLAEigen"))]
    return sorted((e.start_ns, e.start_ns + e.duration_ns) for line in lines for e in line.events
                  if e.duration_ns > 0 and _is_operation(e.name))


def idle_time(operations: list[tuple[int, int]]) -> IdleTime:
    """Busy time and the gaps of the union of `operations` (sorted (start, end) pairs), in milliseconds."""
    if not operations:
        raise ValueError("the trace holds no XLA operations")
    gaps, busy = [], 0
    start, end = operations[0]
    for s, e in operations[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end) / 1e6)
            start = s
        end = max(end, e)
    busy += end - start
    return IdleTime((end - operations[0][0]) / 1e6, busy / 1e6, tuple(sorted(gaps, reverse=True)))


def latest_trace(workdir: str) -> str:
    """The newest `.xplane.pb` under the workdir's profile directory."""
    paths = sorted(glob.glob(os.path.join(profile_dir(workdir), "plugins", "profile", "*", "*.xplane.pb")),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"{profile_dir(workdir)}: no profile trace (set config.train.profile_start_step)")
    return paths[-1]
