"""The engine process's HTTP side loads transformers' own tokenizer without importing torch.

``from transformers import AutoTokenizer`` imports torch (``AutoTokenizer`` reads the model's configuration
classes, whose module imports torch), which cost a deployment process with an engine process a second torch
runtime: about 5 s and 220 MB at each start, for a process that only renders prompts. The tokenizer class
itself does not need torch: :func:`load_chat_tokenizer` takes the class that ``tokenizer_config.json`` names
(``tokenizer_class``) from transformers' top-level lazy module, which imports only that class's own module, and
loads the folder with it. Its ``apply_chat_template`` is transformers' own, so prompts render exactly as
``AutoTokenizer`` renders them wherever it resolves the same class.

The engine process holds ``AutoTokenizer``'s tokenizer; at start it sends the ids of :data:`PROBE_CONVERSATIONS`,
and the HTTP side keeps this tokenizer only where its ids are the same (:func:`tokenizer_agreeing_with`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.engine import render_chat

log = logging.getLogger(__name__)

# What the two sides render and compare at start: roles, a system turn, multi-byte text, a control token typed by
# a user, leading and trailing whitespace; the second for templates that refuse a system turn or the first's order.
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  Héllo, wörld! 你好 🙂 <|end|> tab\there"},
        {"role": "assistant", "content": "Hi.\n\n- one\n- two "},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [{"role": "user", "content": "Héllo 🙂 <|end|> 2+2?\n"}],
]


def load_chat_tokenizer(tokenizer_dir: str | Path) -> Any | None:
    """The folder's tokenizer, loaded by the class its ``tokenizer_config.json`` names; None where it names none
    that transformers exports or the class cannot load the folder (``AutoTokenizer`` must then resolve it)."""
    config_file = Path(tokenizer_dir) / "tokenizer_config.json"
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if not isinstance(name, str) or not name.isidentifier():
        return None
    import transformers

    try:
        tokenizer_class = getattr(transformers, name)
        return tokenizer_class.from_pretrained(tokenizer_dir)
    except Exception as exc:  # a class of another backend, remote code, a file it cannot read: the engine's way
        log.info("tokenizer class %s did not load %s without AutoTokenizer: %s", name, tokenizer_dir, exc)
        return None


def probe_chat(encode_chat: Callable[[list[dict[str, str]]], list[int]]) -> list[list[int] | None]:
    """The ids of each probe conversation (None where the template refuses it): what the two sides compare."""
    probe_ids: list[list[int] | None] = []
    for messages in PROBE_CONVERSATIONS:
        try:
            probe_ids.append(encode_chat(messages))
        except Exception:  # a template that raises for this shape (strict role alternation, say)
            probe_ids.append(None)
    return probe_ids


def tokenizer_agreeing_with(engine_probe_ids: list[list[int] | None], chat_tokenizer: Any, tokenizer_dir: Path) -> Any:
    """The HTTP side's tokenizer: the one loaded without torch where it renders the probes as the engine's
    ``AutoTokenizer`` does; else ``AutoTokenizer``'s (which imports torch on this side too)."""
    if chat_tokenizer is not None:
        probe_ids = probe_chat(functools.partial(render_chat, chat_tokenizer))
        if probe_ids == engine_probe_ids and any(ids is not None for ids in probe_ids):
            return chat_tokenizer
        log.warning("the tokenizer loaded without AutoTokenizer renders the probes differently; loading AutoTokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
