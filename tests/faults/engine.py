"""Test-only engines with faults, for the model server's test-engine switch (``FINETUNE_PHI_TEST_ENGINE``, see
:mod:`deployments.model_server`), never reachable from production code or config.

:class:`FaultyRunner` is the real :class:`deployments.engine.ModelRunner` reading ``test_faults.json`` in the model
folder it loads:

    {"fail_share": 0.3}     a seeded 30% of sequences fail on their first token (the request answers 500)
    {"slowdown": 5}         every forward pass takes 5x as long (so every generated token does)
    {"never_end": true}     end tokens are ignored: every reply runs into its token budget (finish_reason length)
    {"never_end_after": 2}  the same from the third sequence on: the model passes a 2-prompt smoke test, then
                            stops ending its replies under live traffic
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from deployments.engine import ModelRunner

FAULTS_FILE = "test_faults.json"
ENGINE = "tests.faults.engine:FaultyRunner"


class FaultyRunner(ModelRunner):
    def __init__(self, model_path: Any, **kwargs: Any) -> None:
        super().__init__(model_path, **kwargs)
        path = Path(model_path) / FAULTS_FILE
        self.faults: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self._rng = random.Random(0)
        self._count = itertools.count()
        if self.faults.get("never_end"):
            self.end_ids = set()
        slowdown = float(self.faults.get("slowdown", 1))
        if slowdown > 1:
            forward = self.model.forward

            def slow_forward(*args: Any, **kw: Any) -> Any:
                started = time.perf_counter()
                out = forward(*args, **kw)
                time.sleep((slowdown - 1) * (time.perf_counter() - started))
                return out

            self.model.forward = slow_forward

    def _advance(self, row: Any, token: int) -> bool:
        """The engine's per-token hook (``row.seq`` is the request's :class:`~deployments.engine.Sequence`)."""
        seq = row.seq
        if not hasattr(seq, "test_index"):
            seq.test_index = next(self._count)
        share = float(self.faults.get("fail_share", 0))
        if share and not seq.generated and seq.finish_reason is None and self._rng.random() < share:
            seq.finish_reason, seq.error = "error", "test fault: fail_share"
            self._finish(row)
            return False
        after = self.faults.get("never_end_after")
        if after is not None and seq.test_index >= int(after) and token in self.end_ids:
            token = min(set(range(len(self.end_ids) + 1)) - self.end_ids)  # any token that is not an end token
        return super()._advance(row, token)
