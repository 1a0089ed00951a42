"""A lock file held by one process at a time: `hold(path, refuse)` creates `path` (host, pid, start time) for the
duration of a block and raises `refuse(holder)` when another process holds it. A lock left by a dead process of this
host is taken over; one from another host is refused, since whether its process is alive cannot be told from here.
The dataset build locks a builder config in its data_dir with it, and training its workdir (autorad_jax).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Callable, Iterator


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
    with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
    return True


def describe(holder: dict, path: str) -> str:
    """'host H, pid P, started S, lock PATH' of a lock's holder."""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}, "
            f'lock {path}')


def end_of_advice(holder: dict, path: str, activity: str) -> str:
    """The end of a refusal's advice: for a holder on another host (whose lock is never taken over, since whether its
    process is alive cannot be told from here), when to delete the lock by hand."""
    host = holder.get('host', '?')
    return f'; if no {activity} is going on {host}, delete {path}.' if host != socket.gethostname() else '.'


@contextlib.contextmanager
def hold(path: str, refuse: Callable[[dict], Exception]) -> Iterator[None]:
    """Holds the lock file `path` while the block runs; raises `refuse(holder)` (the holder's host, pid and start
    time, as far as they can be read) when another live process holds it."""
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}
    if not _create(path, me):
        holder = _read(path)
        stale = (holder is not None and holder.get('host') == me['host'] and isinstance(holder.get('pid'), int)
                 and holder['pid'] != me['pid'] and not _alive(holder['pid']))
        if stale and _read(path) == holder:
            os.remove(path)  # the lock of a dead process of this host
        if not _create(path, me):
            raise refuse(_read(path) or holder or {})
    try:
        yield
    finally:
        if _read(path) == me:
            os.remove(path)
