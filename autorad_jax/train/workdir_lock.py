"""One training run writes a workdir at a time: `hold(workdir)` takes workdir/train.lock (host, pid, start time) for the
run's duration and refuses a second run with a message naming the holder. A lock left by a dead process of this host
is taken over; one from another host is refused, since whether its process is alive cannot be told from here.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator

from autorad_jax.errors import AutoradError

LOCK_NAME = "train.lock"


class WorkdirLockedError(AutoradError, RuntimeError):
    """Another training run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # being written, or not ours to judge: treated as held


def _create(path: str, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def _refuse(path: str, workdir: str, holder: dict) -> WorkdirLockedError:
    host, pid, started = holder.get("host", "?"), holder.get("pid", "?"), holder.get("started", "?")
    other_host = host != socket.gethostname()
    return WorkdirLockedError(
        f"{workdir} is in use by another training run (host {host}, pid {pid}, started {started}, lock {path}): wait "
        f"for it to end or use another --workdir" + (f"; if no run is going on {host}, delete {path}." if other_host
                                                   else "."))


@contextlib.contextmanager
def hold(workdir: str, *, active: bool = True) -> Iterator[None]:
    """Holds workdir/train.lock while the block runs (`active`: process 0 only); WorkdirLockedError if held."""
    if not active:
        yield
        return
    path = os.path.join(workdir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    if not _create(path, me):
        holder = _read(path)
        stale = (holder is not None and holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                 and holder["pid"] != me["pid"] and not _alive(holder["pid"]))
        if stale and _read(path) == holder:
            os.remove(path)  # the lock of a dead run of this library on this host
        if not _create(path, me):
            raise _refuse(path, workdir, _read(path) or holder or {})
    try:
        yield
    finally:
        if _read(path) == me:
            os.remove(path)
