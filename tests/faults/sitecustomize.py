"""A test-only fault switch for the model server's engine, never reachable from production code or config.

Python imports ``sitecustomize`` at start-up from the path: a test that puts this folder on the server process's
``PYTHONPATH`` (:func:`tests.faults.faulty_engine_env`) makes every :class:`deployments.engine.ModelRunner` read
``test_faults.json`` in the model folder it loads, when there is one:

    {"fail_share": 0.3}   a seeded 30% of sequences fail on their first token (the request answers 500)
    {"slowdown": 5}       every forward pass takes 5x as long (so every generated token does)
    {"never_end": true}   end tokens are ignored: every reply runs into its token budget (finish_reason length)
    {"never_end_after": 2}  the same from the third sequence on: the model passes a 2-prompt smoke test, then
                          stops ending its replies under live traffic

A model folder without the file, or a process without this folder on its path, runs the real engine unchanged.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

FAULTS_FILE = "test_faults.json"


def _install() -> None:
    from deployments import engine

    original_init = engine.ModelRunner.__init__
    original_advance = engine.ModelRunner._advance

    def init(self: Any, model_path: Any, **kwargs: Any) -> None:
        original_init(self, model_path, **kwargs)
        path = Path(model_path) / FAULTS_FILE
        self._test_faults = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self._test_rng = random.Random(0)
        self._test_count = itertools.count()
        if self._test_faults.get("never_end"):
            self.end_ids = set()
        slowdown = float(self._test_faults.get("slowdown", 1))
        if slowdown > 1:
            forward = self.model.forward

            def slow_forward(*args: Any, **kw: Any) -> Any:
                started = time.perf_counter()
                out = forward(*args, **kw)
                time.sleep((slowdown - 1) * (time.perf_counter() - started))
                return out

            self.model.forward = slow_forward

    def advance(self: Any, seq: Any, token: int) -> bool:
        faults = getattr(self, "_test_faults", {})
        if not hasattr(seq, "test_index"):
            seq.test_index = next(self._test_count)
        share = float(faults.get("fail_share", 0))
        if share and not seq.generated and seq.finish_reason is None and self._test_rng.random() < share:
            seq.finish_reason, seq.error = "error", "test fault: fail_share"
            self._finish(seq)
            return False
        after = faults.get("never_end_after")
        if after is not None and seq.test_index >= int(after) and token in self.end_ids:
            token = min(set(range(len(self.end_ids) + 1)) - self.end_ids)  # any token that is not an end token
        return original_advance(self, seq, token)

    engine.ModelRunner.__init__ = init
    engine.ModelRunner._advance = advance


_install()
