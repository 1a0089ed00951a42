"""One training run writes a workdir at a time: `hold(workdir)` takes workdir/train.lock (host, pid, start time) for the
run's duration and refuses a second run with a message naming the holder (tfds_lidc/file_lock.py: a lock left by a
dead process of this host is taken over, one from another host refused).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

from autorad_jax.errors import AutoradError
from tfds_lidc import file_lock

LOCK_NAME = "train.lock"


class WorkdirLockedError(AutoradError, RuntimeError):
    """Another training run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str, *, active: bool = True) -> Iterator[None]:
    """Holds workdir/train.lock while the block runs (`active`: process 0 only); WorkdirLockedError if held."""
    if not active:
        yield
        return
    path = os.path.join(workdir, LOCK_NAME)
    with file_lock.hold(path, functools.partial(_refusal, workdir, path)):
        yield


def _refusal(workdir: str, path: str, holder: dict) -> WorkdirLockedError:
    return WorkdirLockedError(f"{workdir} is in use by another training run ({file_lock.describe(holder, path)}): "
                              f"wait for it to end or use another --workdir"
                              + file_lock.end_of_advice(holder, path, "run"))
