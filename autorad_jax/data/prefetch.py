"""Overlapped input: the next batches are converted to global arrays and placed on the devices while a step runs.

`jax.make_array_from_process_local_data` starts the host-to-device copy and returns at once, and the step itself is
dispatched asynchronously; each call tops the queue up to `size` placed batches, then hands out the oldest, so the
reading and copying of the batches behind it run under the step in flight, in the order of flax's
`jax_utils.prefetch_to_device`, but for any sharding.

`DevicePrefetcher` also keeps a checkpointable iterator's position right: `get_state()` is the state of the underlying
iterator after the batches already handed out (not after those read ahead), so a checkpoint resumes exactly.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from autorad_jax.data.pipeline import to_global

Batch = dict[str, np.ndarray]


class DevicePrefetcher:
    """Iterator of global-array batches of `batches` (this process's parts), `size` of them placed ahead.

    For an iterator with `get_state`/`set_state` (grain's), those give and set the position after the batches this
    prefetcher has yielded; `set_state` drops what was read ahead.
    """

    def __init__(self, batches: Iterable[Batch], sharding: jax.sharding.Sharding, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._it = iter(batches)
        self._sharding = sharding
        self._size = size
        self._queue: collections.deque[tuple[Any, dict[str, jax.Array]]] = collections.deque()
        self._done = False

    def _state(self) -> Any:
        get_state = getattr(self._it, "get_state", None)
        return get_state() if get_state is not None else None

    def _fill(self) -> None:
        while not self._done and len(self._queue) < self._size:
            state = self._state()  # the position before this batch: where a resume must start to get it again
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                return
            self._queue.append((state, to_global(batch, self._sharding)))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        # Topping up happens here, before handing out the oldest batch, and not after it: reading ahead after it would
        # hold that batch back until the host had read the next one, with the devices idle if they were waiting.
        self._fill()
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()[1]

    def get_state(self) -> Any:
        """The underlying iterator's state after the batches yielded so far."""
        return self._queue[0][0] if self._queue else self._state()

    def set_state(self, state: Any) -> None:
        """Moves the underlying iterator to `state`, dropping the batches read ahead."""
        self._queue.clear()
        self._done = False
        self._it.set_state(state)

    def start_prefetch(self) -> None:
        """Lets the underlying iterator start reading again after `set_state` (grain's checkpoint handler calls it)."""
        start = getattr(self._it, "start_prefetch", None)
        if start is not None:
            start()


def prefetch_to_device(batches: Iterable[Batch], sharding: jax.sharding.Sharding, size: int = 2) -> DevicePrefetcher:
    """`DevicePrefetcher` of `batches`: global arrays on `sharding`, `size` batches placed ahead of the caller."""
    return DevicePrefetcher(batches, sharding, size)
