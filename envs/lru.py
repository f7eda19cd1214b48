"""``SizedLRU``: the latest distinct entries of a pure function's results, within a byte budget.

The actor's per-turn work repeats itself across a group's chains (one prompt, and often the same
tool results): ``actors.rollout.encode`` keeps the ids of the latest texts and ``ChatAgent`` its
latest renders in one of these. The budget bounds memory whatever the texts' lengths (a count
alone would not: a conversation of long tool outputs is megabytes).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


class SizedLRU:
    """A dict of at most ``max_bytes`` of entries (each ``put`` says its size), least recently used
    dropped first; an entry larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"SizedLRU: max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """The value kept for ``key`` (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self.nbytes -= n

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)
