"""A test engine whose generation hangs: the model loads and renders prompts like the real one, but its worker
sleeps forever on the first request and never finishes one.

Selected per deployment with ``FINETUNE_PHI_TEST_ENGINE=<deployment>=tests.deployments.hanging_engine:HangingRunner``
in the router's environment (deployments.model_server accepts modules under ``tests.`` only).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from deployments.engine import ModelRunner


class HangingRunner:
    """The real runner's prompt handling, with a generation step that never returns."""

    def __init__(self, model_path: str, **options: Any) -> None:
        self._real = ModelRunner(model_path, **options)
        self.context_length = self._real.context_length
        self._hung = threading.Event()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._real.encode_chat(messages)

    def check_fits(self, prompt_ids: list[int]) -> int:
        return self._real.check_fits(prompt_ids)

    def decode(self, ids: list[int]) -> str:
        return self._real.decode(ids)

    def submit(self, sequence: Any) -> None:
        if not self._hung.is_set():
            self._hung.set()
            threading.Thread(target=time.sleep, args=(3600,), name="hung-generation", daemon=True).start()

    def close(self) -> None:
        self._real.close()
