"""A bounded amount of something (bytes, tokens) that threads take from and give back."""
from __future__ import annotations

import threading


class Budget:
    """Taking fails once the amount taken would pass the limit.

    When nothing is taken, any amount may be: one piece of work larger than the limit
    still goes through, alone, instead of being refused for ever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._taken = 0
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        return self._taken

    @property
    def is_full(self) -> bool:
        """True when no amount at all can be taken now."""
        return self._taken >= self.limit

    def try_take(self, amount: int) -> bool:
        with self._lock:
            if self._taken and self._taken + amount > self.limit:
                return False
            self._taken += amount
            return True

    def give_back(self, amount: int) -> None:
        with self._lock:
            self._taken -= amount
