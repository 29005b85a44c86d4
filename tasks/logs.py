"""Log utilities both backends use: Prefect's run logger when there is one, and reading a log by byte offset."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger

_LOG = logging.getLogger("finetune_phi.jobs")


def run_logger(fallback: logging.Logger = _LOG) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (so the lines show in the UI), else ``fallback``."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return fallback


def split_log_chunk(chunk: bytes, offset: int) -> tuple[list[str], int]:
    """The complete lines of ``chunk`` (the log's bytes from ``offset`` on) and the offset after the last of them.

    A partial last line waits for its newline; tqdm-style bars rewrite one line with carriage returns, so a line
    keeps what it finally said."""
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    text = chunk[:end].decode("utf-8", "replace")
    return [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")], offset + end + 1


def read_lines_since(path: Path, offset: int) -> tuple[list[str], int]:
    """:func:`split_log_chunk` of a log file from byte ``offset``; a file not written yet has no lines."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    return split_log_chunk(chunk, offset)


class LogFollower:
    """Reads the lines appended to a log file since the last call (a partial last line waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[str]:
        lines, self.offset = read_lines_since(self.path, self.offset)
        return lines


__all__ = ["LogFollower", "read_lines_since", "run_logger", "split_log_chunk"]
