"""A clock and a metrics source scripted in request rates, for bake tests without a server."""

from __future__ import annotations

from typing import Any

from tasks.guardrails.metrics import Counters, bucket_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class ScriptedSource:
    """Cumulative counters that grow with the clock: ``rate`` requests per second per deployment."""

    name = "scripted"

    def __init__(self, clock: Clock, rates: dict[str, tuple[float, float, float, float]]) -> None:
        # deployment -> (requests/s, error share, seconds per token, ended share)
        self.clock, self.rates = clock, rates
        self.fail_reads = 0

    def _reading(self) -> dict[str, Counters]:
        out = {}
        for name, (rps, errors, spt, ended) in self.rates.items():
            n = int(rps * self.clock.now)
            bad = int(n * errors)
            counts = [0] * 30
            counts[bucket_of(spt)] = n - bad
            stop = int((n - bad) * ended)
            out[name] = Counters({200: n - bad, 500: bad}, {"stop": stop, "length": n - bad - stop}, counts)
        return out

    def mark(self) -> Any:
        return self._reading()

    def since(self, mark: Any) -> dict[str, Counters]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise ConnectionError("admin route down")
        return {k: v.minus(mark.get(k, Counters())) for k, v in self._reading().items()}


HEALTHY = (20.0, 0.0, 0.01, 0.95)  # requests/s, error share, seconds per token, ended share
