"""``SizedLRU``: the latest distinct entries of a pure function's results, within a byte budget.

The actor's per-turn work repeats itself across a group's chains (one prompt, and often the same
tool results): ``actors.rollout.encode`` keeps the ids of the latest texts and ``ChatAgent`` its
latest renders in one of these. The budget bounds memory whatever the texts' lengths (a count
alone would not: a conversation of long tool outputs is megabytes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class SizedLRU:
    """A dict of at most ``max_bytes`` of entries (each ``put`` says its size), least recently used
    dropped first; an entry larger than the whole budget is not kept. Safe to share between threads
    (a tool's long output is counted in a worker thread through the encode cache): ``put`` and
    ``clear`` hold a lock, ``get`` needs none (each ``OrderedDict`` call is atomic; an entry another
    thread drops meanwhile is still returned)."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"SizedLRU: max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value kept for ``key`` (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        try:
            self._items.move_to_end(key)
        except KeyError:  # another thread's put dropped it just now
            pass
        return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, (_, n) = self._items.popitem(last=False)
                self.nbytes -= n

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)
