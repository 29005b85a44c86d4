"""Load from the tests: client threads that send requests until the ``with`` block ends."""

from __future__ import annotations

import threading
from typing import Self


class ClientThreads:
    """``clients`` daemon threads, each running ``run(index)`` from ``__enter__`` until ``stopping`` is set on exit."""

    def __init__(self, clients: int, join_timeout_s: float = 90.0) -> None:
        self.stopping = threading.Event()
        self._join_timeout_s = join_timeout_s
        self._threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=self._join_timeout_s)
