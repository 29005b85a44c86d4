"""The decoding loop in a process of its own, beside the deployment's HTTP server (vLLM's engine-core split).

In one process the decoding thread and the HTTP event loop share one GIL: every torch op releases and takes it
back, so each request the event loop parses, renders and answers delays the running batch's next step (measured on
a 2-core machine with the tiny model: a thread busy 9 % of the time in short bursts cut the engine's tokens/s at 16
rows by 17-22 %). Here the deployment process keeps the HTTP side, the tokenizer and the chat template; a child
process (``python -m deployments.engine_process``) holds the model and runs :class:`deployments.engine.ModelRunner`,
with a GIL of its own.

The two talk over a socket pair with pickled messages (:class:`multiprocessing.connection.Connection`):

- to the engine: ``("submit", id, prompt_ids, SamplingParams)``, ``("cancel", id)``, ``("close",)``;
- from the engine: ``("ready", {"context_length", "probe_ids"})`` or ``("failed", error)`` once, then after each
  decoding step one ``("step", [Update, ...])`` with what every changed request gained: tokens, their times, text,
  finish.

The child ends when its socket closes (its parent is gone, killed -9 too: the kernel closes the parent's end) and
sits in the parent's process group, so a stop of the deployment takes it as well. The parent exits when the child
dies (its memory, a crash): the router then sees the deployment process go, answers its requests in flight with
``ModelContainerCrashed`` and restarts it, as when a single process crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from deployments.chat_tokenizer import load_chat_tokenizer, probe_chat, tokenizer_agreeing_with
from deployments.engine import Sequence, find_hf_folders, render_chat, room_after_prompt

log = logging.getLogger(__name__)
DEFAULT_RUNNER = "deployments.engine:ModelRunner"
EXIT_ENGINE_LOST = 70  # the deployment process's exit status when its engine process died


class EngineProcessError(RuntimeError):
    """The engine process could not load the model (its own error message)."""


@dataclass
class Update:
    """What one request gained in one step: new tokens (with their ``time.monotonic()``, system-wide on Linux),
    the text they added, and the finish once there is one."""

    request: int
    tokens: list[int]
    token_times: list[float]
    text: str
    finish_reason: str | None = None
    error: str | None = None


def runner_class(spec: str) -> Any:
    """``module:Class`` of the runner to host (the real one, or a test engine under ``tests.``)."""
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ---------------------------------------------------------------------------------------------- the HTTP side
class EngineProcess:
    """The runner's interface (``encode_chat``, ``check_fits``, ``submit``, ``close``) over an engine process.

    Prompts are rendered and measured here, on the HTTP side; the child generates. ``submit`` returns at once;
    a reader thread applies each step's updates to the submitted :class:`Sequence` objects and calls their
    ``on_token``/``on_done`` callbacks, as the in-process runner's worker thread does.
    """

    def __init__(self, model_path: str | Path, *, runner: str = DEFAULT_RUNNER, **options: Any) -> None:
        _, tokenizer_dir = find_hf_folders(model_path)
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        argv = [sys.executable, "-m", "deployments.engine_process", "--fd", str(theirs.fileno())]
        argv += ["--model-path", str(model_path), "--runner", runner, "--options", json.dumps(options)]
        self.process = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
        theirs.close()
        self._send_lock = threading.Lock()
        self._sequences: dict[int, Sequence] = {}
        self._next_id = 0
        self._closing = False
        chat_tokenizer = load_chat_tokenizer(tokenizer_dir)  # while the engine process loads the model
        try:
            kind, facts = self._conn.recv()
        except EOFError:
            kind, facts = "failed", f"the engine process exited with status {self.process.wait()} while loading"
        if kind != "ready":
            self.process.wait()
            raise EngineProcessError(facts)
        self.context_length: int = facts["context_length"]
        self.tokenizer = tokenizer_agreeing_with(facts["probe_ids"], chat_tokenizer, tokenizer_dir)
        threading.Thread(target=self._read, name="engine-updates", daemon=True).start()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self.tokenizer, messages)

    def check_fits(self, prompt_ids: list[int]) -> int:
        return room_after_prompt(self.context_length, prompt_ids)

    def submit(self, sequence: Sequence) -> None:
        if self._closing:
            raise RuntimeError("the model is being unloaded")
        with self._send_lock:
            request = self._next_id
            self._next_id += 1
            self._sequences[request] = sequence
            sequence.on_cancel = lambda _: self._send(("cancel", request))
            self._conn.send(("submit", request, sequence.prompt_ids, sequence.params))

    def _send(self, message: tuple[Any, ...]) -> None:
        # an engine that is gone raises OSError: its reader thread ends this process
        with self._send_lock, contextlib.suppress(OSError):
            self._conn.send(message)

    def close(self) -> None:
        self._closing = True
        self._send(("close",))
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _read(self) -> None:
        try:
            while True:
                kind, updates = self._conn.recv()
                if kind == "step":
                    for update in updates:
                        self._apply(update)
        except (EOFError, OSError):
            pass
        except BaseException:  # a message this side cannot read: nobody would finish the requests in flight
            log.exception("reading the engine process's updates failed")
            self.process.kill()
        status = self.process.wait()
        if self._closing:
            return
        # Requests in flight cannot be finished by anyone now: the deployment process goes too, and the router
        # answers them as a crashed container and restarts it.
        log.error("the engine process exited with status %s; this deployment process exits", status)
        logging.shutdown()
        os._exit(EXIT_ENGINE_LOST)

    def _apply(self, update: Update) -> None:
        seq = self._sequences.get(update.request)
        if seq is None:
            return
        seq.generated.extend(update.tokens)
        seq.token_times.extend(update.token_times)
        seq.text += update.text
        if update.tokens and seq.on_token is not None:
            seq.on_token(seq)
        if update.finish_reason is not None:
            del self._sequences[update.request]
            seq.finish_reason, seq.error = update.finish_reason, update.error
            if seq.on_done is not None:
                try:
                    seq.on_done(seq)
                except Exception:
                    log.exception("a completion callback failed")


# ---------------------------------------------------------------------------------------------- the engine side
class EngineHost:
    """The child's side: a runner fed from the socket, one ``step`` message back after each decoding step."""

    def __init__(self, conn: Connection, runner_factory: Any, model_path: str, options: dict[str, Any]) -> None:
        self._conn = conn
        self._live: dict[int, Sequence] = {}  # request -> its sequence, until its finish is sent
        self._changed: dict[int, Sequence] = {}  # written and read on the runner's worker thread only
        self._sent: dict[int, tuple[int, int]] = {}  # request -> (tokens, characters of text) already sent
        self.runner = runner_factory(model_path, after_step=self._flush, **options)

    def serve(self) -> bool:
        """Feed the runner until ``close`` (True) or until the socket closes (False: the deployment process is
        gone, killed -9 too)."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                return False
            if message[0] == "submit":
                _, request, prompt_ids, params = message
                mark = functools.partial(self._mark, request)
                self._live[request] = seq = Sequence(prompt_ids, params, on_token=mark, on_done=mark)
                self.runner.submit(seq)
            elif message[0] == "cancel" and (seq := self._live.get(message[1])) is not None:
                seq.cancel()
            elif message[0] == "close":
                self.runner.close()
                return True

    def _mark(self, request: int, seq: Sequence) -> None:
        self._changed[request] = seq

    def _flush(self) -> None:
        if not self._changed:
            return
        updates = []
        for request, seq in self._changed.items():
            tokens, chars = self._sent.get(request, (0, 0))
            done = seq.finish_reason is not None
            updates.append(
                Update(
                    request,
                    seq.generated[tokens:],
                    seq.token_times[tokens:],
                    seq.text[chars:],
                    seq.finish_reason if done else None,
                    seq.error if done else None,
                )
            )
            if done:
                self._sent.pop(request, None)
                self._live.pop(request, None)
            else:
                self._sent[request] = (len(seq.generated), len(seq.text))
        self._changed.clear()
        with contextlib.suppress(OSError):  # the deployment process is gone; serve() sees the socket close
            self._conn.send(("step", updates))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A deployment's engine process (deployment processes start it).")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--runner", default=DEFAULT_RUNNER)
    parser.add_argument("--options", default="{}", help="JSON of the runner's keyword arguments")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conn = Connection(args.fd)
    try:
        host = EngineHost(conn, runner_class(args.runner), args.model_path, json.loads(args.options))
    except BaseException as exc:  # MemoryError past the limit too: the deployment process reports it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    facts = {"context_length": host.runner.context_length, "probe_ids": probe_chat(host.runner.encode_chat)}
    conn.send(("ready", facts))
    if not host.serve():
        os._exit(0)  # nobody is left to answer: do not wait for a forward in flight


if __name__ == "__main__":
    # run as the module's own name, so that the Update objects it pickles name deployments.engine_process, which
    # the deployment process can unpickle (not __main__)
    from deployments.engine_process import main as engine_main

    engine_main()
