"""One deployment's model in memory and the worker thread that batches its requests.

Dynamic batching: a worker thread per deployment takes every request waiting in its queue (up to
``max_batch_size``, after a short ``batch_wait_ms`` so that requests arriving together share a batch), left-pads
their prompts, and decodes them together with one KV cache, one token per step for the whole batch. Each row keeps
its own sampling settings (temperature, top_p, greedy or not), its own token budget and its own end: a row stops at
any of the model's end ids (``generation_config.eos_token_id``, which holds Phi-3's ``<|end|>``) or at its budget.
On a small model a decoding step costs nearly the same for 1 row as for 16, so throughput grows with concurrency.

Tokens reach the caller through :class:`Sequence` callbacks as they are made (for streaming), and the final
text excludes the end token. A caller may cancel a sequence (timeout, client gone): the worker drops it at the
next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# One model load at a time: transformers' lazy imports are not safe across threads, and loads compete for memory.
_LOAD_LOCK = threading.Lock()
MIN_TEMPERATURE = 1e-4


class InputTooLongError(ValueError):
    """The prompt does not fit in the model's context."""


@dataclass
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Sequence:
    """One prompt being generated. ``on_token`` runs on the worker thread after each new token (text so far)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[Sequence], None] | None = None
    on_done: Callable[[Sequence], None] | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (an end token came), "length" (budget used up), "cancelled", "error"
    error: str | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    text: str = ""  # decoded reply without the end token, updated as tokens come

    def cancel(self) -> None:
        self.cancelled = True


def _first_folder_with(root: Path, marker: str, candidates: list[Path], what: str) -> Path:
    """The first of ``candidates`` holding ``marker``; else the first folder under ``root`` that does."""
    found = next((c for c in candidates if (c / marker).is_file()), None)
    if found is not None:
        return found
    anywhere = sorted(p.parent for p in root.rglob(marker))
    if not anywhere:
        raise FileNotFoundError(f"no {what} ({marker}) under {root}")
    return anywhere[0]


def find_hf_folders(root: str | Path) -> tuple[Path, Path]:
    """The folders holding the model weights and the tokenizer under ``root``.

    Accepts a Hugging Face model folder (``config.json`` and the tokenizer side by side) and an MLflow
    transformers model (``MLmodel`` with ``model/`` and ``components/tokenizer/``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist; register the model again or fix the path")
    model_dir = _first_folder_with(
        root, "config.json", [root, root / "model", root / "data" / "model"], "Hugging Face model"
    )
    tokenizer_dir = _first_folder_with(
        root, "tokenizer_config.json", [model_dir, root / "components" / "tokenizer", root], "tokenizer"
    )
    return model_dir, tokenizer_dir


class ModelRunner:
    """A causal LM and its tokenizer, plus the batching worker. Thread-safe ``submit``."""

    def __init__(
        self, model_path: str | Path, *, max_batch_size: int, batch_wait_ms: float, torch_threads: int = 0
    ) -> None:
        with _LOAD_LOCK:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if torch_threads > 0:
                torch.set_num_threads(torch_threads)  # process-wide; see EndpointConfig.torch_threads

            self._torch = torch
            model_dir, tokenizer_dir = find_hf_folders(model_path)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            self.model.eval()
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        self.end_ids = self._end_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (sorted(self.end_ids) or [0])[0])
        self._queue: queue.Queue[Sequence | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"generate-{Path(model_path).name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ prompts
    def _end_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else list(eos))
        end = self.tokenizer.convert_tokens_to_ids("<|end|>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id:
            ids.add(end)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, rendered by the model's chat template with the assistant prompt added."""
        ids = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def check_fits(self, prompt_ids: list[int]) -> int:
        """How many new tokens fit after the prompt; raises :class:`InputTooLongError` when none does."""
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise InputTooLongError(
                f"the input is {len(prompt_ids)} tokens but the model's context holds {self.context_length} "
                f"(at most {self.context_length - 1} input tokens); shorten the input"
            )
        return room

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ queue
    def submit(self, sequence: Sequence) -> None:
        if self._closed:
            raise RuntimeError("the model is being unloaded")
        self._queue.put(sequence)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)

    def _take_batch(self) -> list[Sequence] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # seen again after this batch
                break
            batch.append(item)
        return [s for s in batch if not s.cancelled] or []

    def _loop(self) -> None:
        torch = self._torch
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    self._generate(batch)
            except Exception as exc:  # a bad batch must not kill the worker: fail its requests, go on
                log.exception("generation failed for a batch of %d", len(batch))
                for seq in batch:
                    if seq.finish_reason is None:
                        seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
                        self._finish(seq)

    # ------------------------------------------------------------------ decoding
    def _finish(self, seq: Sequence) -> None:
        if seq.on_done is not None:
            try:
                seq.on_done(seq)
            except Exception:
                log.exception("a completion callback failed")

    def _sample(self, logits: Any, rows: list[Sequence]) -> Any:
        torch = self._torch
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        # Below MIN_TEMPERATURE sampling is argmax anyway, and logits / temperature would overflow.
        sampled_rows = [
            i for i, s in enumerate(rows) if s.params.do_sample and s.params.temperature >= MIN_TEMPERATURE
        ]
        if not sampled_rows:
            return greedy
        idx = torch.tensor(sampled_rows)
        sub = logits[idx]
        temps = torch.tensor([rows[i].params.temperature for i in sampled_rows]).unsqueeze(-1)
        probs = torch.softmax(sub / temps, dim=-1).nan_to_num(0.0)
        top_ps = torch.tensor([rows[i].params.top_p for i in sampled_rows]).unsqueeze(-1)
        if bool((top_ps < 1.0).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
            drop = before >= top_ps
            drop[:, 0] = False  # the most likely token always stays (a top_p that underflows to 0 keeps one)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        if not bool(usable.all()):  # degenerate settings (extreme temperature/top_p): that row decodes greedily
            probs[~usable] = torch.nn.functional.one_hot(greedy[idx][~usable], probs.shape[-1]).to(probs.dtype)
        choice = torch.multinomial(probs, 1).squeeze(-1)
        out = greedy.clone()
        out[idx] = choice
        return out

    def _generate(self, batch: list[Sequence]) -> None:
        torch = self._torch
        width = max(len(s.prompt_ids) for s in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):  # left padding: every row's next token sits in the last column
            input_ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            attention[row, width - len(seq.prompt_ids) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache, logits = out.cache, out.logits[:, -1, :]
        positions = positions[:, -1:] + 1
        rows = list(batch)  # the sequences still decoding, in cache order
        while rows:
            tokens = self._sample(logits, rows).tolist()
            keep: list[int] = []
            for index, seq in enumerate(rows):
                if self._advance(seq, int(tokens[index])):
                    keep.append(index)
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows from the cache so they cost nothing more
                selected = torch.tensor(keep)
                cache.batch_select_indices(selected)
                attention, positions = attention[selected], positions[selected]
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
            attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=torch.long)], dim=-1)
            step_ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(-1)
            out = self.model(
                input_ids=step_ids, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
            )
            cache, logits = out.cache, out.logits[:, -1, :]
            positions = positions + 1

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Record one new token for ``seq``; False when the sequence is finished."""
        if seq.cancelled:
            seq.finish_reason = "cancelled"
        elif token in self.end_ids:
            seq.finish_reason = "stop"
        else:
            seq.generated.append(token)
            seq.text = self.decode(seq.generated)
            if seq.on_token is not None:
                seq.on_token(seq)
            if len(seq.generated) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason is None:
            return True
        self._finish(seq)
        return False
