"""The chat JSONL files the script trains and evaluates on: checked first, read into ``messages`` rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft_args import FinetuneScriptArguments, UsageError


def check_data_files(script_args: FinetuneScriptArguments) -> None:
    if not script_args.train_file:
        raise UsageError("--train_file is required: a chat JSONL file from the data preparation step")
    for what in ("train_file", "eval_file"):
        value = getattr(script_args, what)
        if value and not Path(value).is_file():
            raise UsageError(f"{what} {value} does not exist; run the data preparation step or fix --{what}")
        if value and not _has_a_line(Path(value)):
            raise UsageError(f"{what} {value} holds no conversations; check the data preparation report")


def _has_a_line(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(line.strip() for line in handle)


def read_chats(path: Path, what: str, system_message: str | None) -> list[dict[str, Any]]:
    """Rows of a chat JSONL file as ``{"messages": [...]}`` only (a `prompt` column would make TRL see
    prompt-completion rows); ``system_message`` is inserted where a conversation has no system turn."""
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist; run the data preparation step or fix --{what}")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"{what} {path} line {number} is not a chat row ({{'messages': [{{'role', 'content'}}, ...]}}); "
                    "prepare the data with `finetune-phi prepare-data`"
                ) from None
            if system_message is not None and (not messages or messages[0]["role"] != "system"):
                messages.insert(0, {"role": "system", "content": system_message})
            rows.append({"messages": messages})
    if not rows:
        raise UsageError(f"{what} {path} holds no conversations; check the data preparation report")
    return rows


__all__ = [
    "check_data_files",
    "read_chats",
]
