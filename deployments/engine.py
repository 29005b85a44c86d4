"""One deployment's model in memory and the worker thread that decodes its requests with continuous batching.

Continuous batching: the worker keeps a running batch of rows and, between two decoding steps, lets waiting
requests join it: their prompts are prefilled (several short ones in one forward; a long one in chunks of
``prefill_chunk_tokens``, one chunk per step, so running rows never stall behind a whole long prompt), and they
decode with everyone else from the next step on. Where a forward's fixed cost dominates (a small model, a CPU),
short joining prompts are instead prefilled inside the running rows' decoding step, one forward for both
(:class:`ForwardCost` decides from the worker's own timings). A row that ends (an end token, its budget, a cancel)
leaves the batch at once and its slot is reused.

The KV cache is a :class:`SlotCache`: per layer one preallocated ``[slots, kv_heads, capacity, head_dim]`` tensor,
where row ``i`` of the running batch lives in slot ``i`` and writes its token ``t`` at position ``t``. A join
writes only the new rows' keys; a leave moves at most two rows (the last running row into the hole, and a
half-prefilled row behind it); capacity doubles when a row needs more (rare). No padding ever sits inside a row,
so every row sees exactly the positions and keys the model's own ``generate`` would give it; a 4-D mask keeps
each row to its own filled positions.

Each row keeps its own sampling settings (greedy, temperature, top_p), its own budget and its own end ids (the
model's ``generation_config.eos_token_id``, which holds Phi-3's ``<|end|>``). Text is decoded incrementally
(:class:`IncrementalDetokenizer`): one short window per token, never the whole reply again.

Tokens reach the caller through :class:`Sequence` callbacks as they are made (for streaming), and the final
text excludes the end token. A caller may cancel a sequence (timeout, client gone): the worker drops it at the
next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.device import Placement, load_causal_lm, resolve_placement

log = logging.getLogger(__name__)
# One model load at a time: transformers' lazy imports are not safe across threads, and loads compete for memory.
_LOAD_LOCK = threading.Lock()
MIN_TEMPERATURE = 1e-4
INITIAL_CAPACITY = 256  # cache positions per slot before the first growth


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
    token_times: list[float] = field(default_factory=list)  # time.monotonic() when each generated token was made
    on_cancel: Callable[[Sequence], None] | None = None  # tells the engine holding it (another process, say)

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(self)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation, rendered by the model's chat template with the assistant prompt added."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def room_after_prompt(context_length: int, prompt_ids: list[int]) -> int:
    """How many new tokens fit after the prompt; raises :class:`InputTooLongError` when none does."""
    room = context_length - len(prompt_ids)
    if room < 1:
        raise InputTooLongError(
            f"the input is {len(prompt_ids)} tokens but the model's context holds {context_length} "
            f"(at most {context_length - 1} input tokens); shorten the input"
        )
    return room


def context_length_of(config: Any) -> int:
    """The model's context in tokens (``max_position_embeddings``; 4096 where the config names none)."""
    return int(getattr(config, "max_position_embeddings", 0) or 4096)


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


class IncrementalDetokenizer:
    """Text of a growing token list, decoding only a short window per token.

    The window runs from the last token already turned into text (``prefix``) to the end; its text minus the text
    of the window's settled part is the new piece. A piece ending in U+FFFD (a multi-byte character split across
    tokens) is held back until the next token completes it. Decoding a window rather than a lone token keeps
    tokenizers that drop a leading space per decode (SentencePiece) right at word boundaries.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] decode to _settled, already part of text
        self._read = 0
        self._settled = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; the new text it completes ("" while a character is still split)."""
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix :])
        if len(window) <= len(self._settled) or window.endswith("\ufffd"):
            return ""
        piece = window[len(self._settled) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._settled = self._decode(self.ids[self._prefix : self._read])
        self.text += piece
        return piece

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as U+FFFD), added to ``text``."""
        window = self._decode(self.ids[self._prefix :])
        piece = window[len(self._settled) :] if len(window) > len(self._settled) else ""
        self._prefix = self._read = len(self.ids)
        self._settled = ""
        self.text += piece
        return piece


class SlotCache:
    """Keys and values of the running batch in preallocated per-slot tensors (the model calls ``update``).

    Before each forward the runner says which contiguous slots take part (``begin``) and at which positions each
    row's new tokens go; ``update`` writes them there and hands attention the slots' first ``kv_length``
    positions as a view, without copying the batch.
    """

    def __init__(self, slots: int, capacity: int, max_capacity: int) -> None:
        self.slots = slots
        self.capacity = capacity
        self.max_capacity = max_capacity
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self._first = 0
        self._count = 0
        self._rows: Any = None
        self._positions: Any = None
        self._kv_length = 0

    def begin(self, first: int, positions: Any, kv_length: int) -> None:
        """The next forward covers slots ``first .. first + len(positions)``; ``positions`` is ``[rows, tokens]``."""
        import torch

        self._first, self._count = first, positions.shape[0]
        self._rows = torch.arange(first, first + self._count, device=positions.device).unsqueeze(-1)
        self._positions = positions
        self._kv_length = kv_length

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        while len(self.keys) <= layer_idx:  # allocated on first use, shaped and typed like the model's keys
            _, heads, _, dim = key_states.shape
            shape = (self.slots, heads, self.capacity, dim)
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # rows [n, 1] and positions [n, q] index slot and position: the written block is [n, q, heads, dim]
        keys[self._rows, :, self._positions] = key_states.transpose(1, 2)
        values[self._rows, :, self._positions] = value_states.transpose(1, 2)
        end = self._first + self._count
        return keys[self._first : end, :, : self._kv_length], values[self._first : end, :, : self._kv_length]

    def ensure_capacity(self, positions: int) -> None:
        """Room for ``positions`` tokens per slot (doubling, up to the model's context)."""
        import torch

        if positions <= self.capacity:
            return
        new = self.capacity
        while new < positions:
            new *= 2
        new = min(max(new, positions), self.max_capacity)
        for store in (self.keys, self.values):
            for index, old in enumerate(store):
                grown = torch.zeros((*old.shape[:2], new, old.shape[3]), dtype=old.dtype, device=old.device)
                grown[:, :, : self.capacity] = old
                store[index] = grown
        self.capacity = new

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a row's first ``length`` positions from slot ``source`` to slot ``target``."""
        if source == target or length == 0:
            return
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]


@dataclass
class _Row:
    """A sequence in the running batch: its slot's contents and what it feeds next."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    filled: int = 0  # cache positions written (prompt tokens prefilled, then one per step)
    next_token: int | None = None  # sampled, not yet fed to the model


class ForwardCost:
    """The worker's own estimate of what a forward costs: ``seconds = fixed + per_token * tokens``, fitted by least
    squares over its recent forwards (exponentially weighted, so a change of load or machine is followed).

    It decides whether joining prompts ride along with the running rows' decoding step (one forward, the running
    rows padded to the prompts' width) or get a prefill forward of their own: fusing adds
    ``running * (width - 1)`` padding tokens and saves one forward's fixed cost, so it pays when that padding is worth
    less than ``fixed / per_token`` tokens. On a small model on a CPU (Python and kernel launches dominate) that is
    hundreds of tokens; on a model whose compute dominates it is a few, and joins keep their own prefill.
    """

    DECAY = 0.98  # weight of the past per observation: about the last 50 forwards count

    def __init__(self) -> None:
        self._weight = self._tokens = self._tokens_sq = self._seconds = self._tokens_seconds = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.DECAY
        self._weight = d * self._weight + 1.0
        self._tokens = d * self._tokens + tokens
        self._tokens_sq = d * self._tokens_sq + tokens * tokens
        self._seconds = d * self._seconds + seconds
        self._tokens_seconds = d * self._tokens_seconds + tokens * seconds

    def overhead_tokens(self) -> float:
        """``fixed / per_token``: how many tokens one forward's fixed cost is worth (0 until forwards of different
        sizes were seen; unbounded when a bigger forward measured no slower)."""
        spread = self._weight * self._tokens_sq - self._tokens**2
        if self._weight < 2 or spread <= 1e-9 * max(self._tokens_sq * self._weight, 1.0):
            return 0.0
        per_token = (self._weight * self._tokens_seconds - self._tokens * self._seconds) / spread
        fixed = (self._seconds - per_token * self._tokens) / self._weight
        if fixed <= 0:
            return 0.0
        return float("inf") if per_token <= 0 else fixed / per_token


class ModelRunner:
    """A causal LM and its tokenizer, plus the continuous-batching worker. Thread-safe ``submit``.

    ``device``/``dtype`` follow :func:`deployments.device.resolve_placement`; an impossible choice raises its
    ``PlacementError`` before any weight is read.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int,
        batch_wait_ms: float,
        torch_threads: int = 0,
        device: str = "auto",
        dtype: str = "auto",
        prefill_chunk_tokens: int = 512,
        fuse_joins: str = "auto",
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.placement: Placement = resolve_placement(device, dtype)
        with _LOAD_LOCK:
            import torch
            from transformers import AutoTokenizer

            if torch_threads > 0:
                torch.set_num_threads(torch_threads)  # process-wide; see EndpointConfig.torch_threads

            self._torch = torch
            model_dir, tokenizer_dir = find_hf_folders(model_path)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            self.model = load_causal_lm(model_dir, self.placement)
        self.device = self.model.device
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        self.forward_cost = ForwardCost()
        self.fuse_joins = fuse_joins  # "auto" (the cost model decides), "always" or "never"
        self.fused_joins = 0  # rows whose prompt was prefilled inside a decoding step
        # runs on the worker thread after each step, once that step's tokens and finishes are recorded: an engine
        # process sends one message a step instead of one per token
        self._after_step = after_step
        self.context_length = context_length_of(self.model.config)
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
        return render_chat(self.tokenizer, messages)

    def check_fits(self, prompt_ids: list[int]) -> int:
        return room_after_prompt(self.context_length, prompt_ids)

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

    def _loop(self) -> None:
        torch = self._torch
        waiting: deque[Sequence] = deque()
        running: list[_Row] = []  # running[i] lives in cache slot i
        prefilling: _Row | None = None  # a long prompt being prefilled in chunks, in slot len(running)
        cache = self._new_cache()
        stopping = False
        joining: list[_Row] = []
        while True:
            if not (running or prefilling or waiting):
                if stopping:
                    return
                # the cache stays allocated while idle: zero-filling it again for each request cost more than the
                # request's prefill on a 100 M-parameter model (slots x layers x capacity)
                stopping = self._wait_for_work(waiting)
            stopping = self._drain_queue(waiting) or stopping
            try:
                with torch.inference_mode():
                    prefilling, joining = self._admit(cache, waiting, running, prefilling)
                    if self._after_step is not None:  # the joined rows' first tokens go out before the next step
                        self._after_step()
                    self._decode_step(cache, running, prefilling, joining)
            except Exception as exc:  # a failing forward must not kill the worker: fail its rows, go on
                log.exception("generation failed for a batch of %d", len(running) + (prefilling is not None))
                for row in [*running, *([prefilling] if prefilling else []), *joining]:
                    if row.seq.finish_reason is None:
                        row.seq.finish_reason, row.seq.error = "error", f"{type(exc).__name__}: {exc}"
                        self._finish(row)
                running.clear()
                prefilling, joining = None, []
                cache = self._new_cache()
            if self._after_step is not None:
                self._after_step()

    def _new_cache(self) -> SlotCache:
        return SlotCache(self.max_batch_size, min(INITIAL_CAPACITY, self.context_length), self.context_length)

    def _wait_for_work(self, waiting: deque[Sequence]) -> bool:
        """Block for the first request, then ``batch_wait_ms`` for others arriving with it; True on close."""
        first = self._queue.get()
        if first is None:
            return True
        waiting.append(first)
        deadline = time.monotonic() + self.batch_wait_s
        while len(waiting) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            waiting.append(item)
        return False

    def _drain_queue(self, waiting: deque[Sequence]) -> bool:
        """Move what arrived since the last step to ``waiting``; True when a close came."""
        closed = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return closed
            if item is None:
                closed = True
            else:
                waiting.append(item)

    # ------------------------------------------------------------------ joining
    def _admit(
        self, cache: SlotCache, waiting: deque[Sequence], running: list[_Row], prefilling: _Row | None
    ) -> tuple[_Row | None, list[_Row]]:
        """One prefill forward: the next chunk of a long prompt, or as many short waiting prompts as fit. Returns
        the row still prefilling, and the short prompts left to ride along with the next decoding step instead
        (when :meth:`_fuse_pays` says one forward for both costs less than two)."""
        for seq in [s for s in waiting if s.cancelled]:
            waiting.remove(seq)
            seq.finish_reason = "cancelled"
            self._finish(_Row(seq, IncrementalDetokenizer(self.tokenizer)))
        if prefilling is not None:
            if prefilling.seq.cancelled:
                prefilling.seq.finish_reason = "cancelled"
                self._finish(prefilling)
                return None, []
            return self._prefill_chunk(cache, running, prefilling), []
        free = self.max_batch_size - len(running)
        if not waiting or free == 0:
            return None, []
        if len(waiting[0].prompt_ids) > self.prefill_chunk_tokens:
            row = self._take(cache, waiting)
            return self._prefill_chunk(cache, running, row), []
        joining: list[_Row] = []
        tokens = 0
        while waiting and len(joining) < free:
            size = len(waiting[0].prompt_ids)
            if size > self.prefill_chunk_tokens or (joining and tokens + size > self.prefill_chunk_tokens):
                break
            tokens += size
            joining.append(self._take(cache, waiting))
        if self._fuse_pays(running, joining):
            return None, joining
        self._prefill(cache, len(running), joining, [0] * len(joining), [len(r.seq.prompt_ids) for r in joining])
        self._join(cache, running, joining)
        return None, []

    def _fuse_pays(self, running: list[_Row], joining: list[_Row]) -> bool:
        """Whether ``joining`` prefilled inside the running rows' next step costs less than a forward of its own."""
        live = [r for r in running if not r.seq.cancelled]
        if not live or not joining:
            return False
        width = max(len(r.seq.prompt_ids) for r in joining)
        if self.fuse_joins == "never" or max(r.filled for r in live) + width > self.context_length:
            return False  # (or a running row's padding would run past the context)
        return self.fuse_joins == "always" or len(live) * (width - 1) < self.forward_cost.overhead_tokens()

    def _take(self, cache: SlotCache, waiting: deque[Sequence]) -> _Row:
        seq = waiting.popleft()
        cache.ensure_capacity(len(seq.prompt_ids) + seq.params.max_new_tokens)
        return _Row(seq, IncrementalDetokenizer(self.tokenizer))

    def _prefill_chunk(self, cache: SlotCache, running: list[_Row], row: _Row) -> _Row | None:
        """Prefill the next ``prefill_chunk_tokens`` of ``row``'s prompt; None once the prompt is all in."""
        end = min(row.filled + self.prefill_chunk_tokens, len(row.seq.prompt_ids))
        self._prefill(cache, len(running), [row], [row.filled], [end])
        if end < len(row.seq.prompt_ids):
            return row
        self._join(cache, running, [row])
        return None

    def _prefill(
        self, cache: SlotCache, first_slot: int, rows: list[_Row], starts: list[int], ends: list[int]
    ) -> None:
        """Write prompt tokens ``starts[i]:ends[i]`` of each row into slots from ``first_slot``; sample a token for
        each row whose prompt is then complete."""
        if not rows:
            return
        torch = self._torch
        pieces = [row.seq.prompt_ids[start:end] for row, start, end in zip(rows, starts, ends, strict=True)]
        ids, positions = self._padded_batch(pieces, starts)
        last = torch.tensor([[e - s - 1] for s, e in zip(starts, ends, strict=True)], device=self.device)
        started = time.perf_counter()
        logits = self._forward(cache, first_slot, ids, positions, max(ends), logits_to_keep=last).logits[:, -1, :]
        for row, end in zip(rows, ends, strict=True):
            row.filled = end
        complete = [i for i, row in enumerate(rows) if row.filled == len(row.seq.prompt_ids)]
        if complete:
            tokens = self._sample(logits[complete], [rows[i].seq for i in complete]).tolist()
            for i, token in zip(complete, tokens, strict=True):
                rows[i].next_token = int(token)
        else:
            logits[:1, :1].tolist()  # the forward is done (a GPU runs it asynchronously) before it is timed
        self.forward_cost.observe(ids.numel(), time.perf_counter() - started)

    def _padded_batch(self, pieces: list[list[int]], starts: list[int]) -> tuple[Any, Any]:
        """``ids`` and ``positions``, ``[rows, width]`` on the model's device: row ``i`` feeds ``pieces[i]`` from
        position ``starts[i]``, right-padded to the longest piece.

        The pads take the positions after the row's end: a pad's keys and values land where this row's own decoding
        writes next (before attending to them) and no query of the row can see them meanwhile. Repeating the last
        real position instead let the pads overwrite that token's keys and values."""
        width = max(len(piece) for piece in pieces)
        ids = [piece + [self.pad_id] * (width - len(piece)) for piece in pieces]
        positions = [list(range(start, start + width)) for start in starts]
        torch = self._torch
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
        )

    def _join(self, cache: SlotCache, running: list[_Row], rows: list[_Row]) -> None:
        """Rows whose prompts are in (already in the slots after ``running``): record each one's first token and
        let them decode with the batch, or leave at once."""
        running.extend(rows)
        joined = [row for row in rows if self._advance(row, int(row.next_token or 0))]
        self._leave(cache, running, None, running[: len(running) - len(rows)] + joined)

    # ------------------------------------------------------------------ decoding
    def _forward(
        self, cache: SlotCache, first_slot: int, ids: Any, positions: Any, kv_length: int, logits_to_keep: Any = 0
    ) -> Any:
        torch = self._torch
        cache.begin(first_slot, positions, kv_length)
        dtype = self.placement.torch_dtype()
        allowed = torch.arange(kv_length, device=self.device) <= positions.unsqueeze(-1)  # [rows, q, kv]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
        return self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )

    def _decode_step(
        self, cache: SlotCache, running: list[_Row], prefilling: _Row | None, joining: list[_Row]
    ) -> None:
        """Feed every running row its last token, sample the next one, and let finished rows leave. ``joining``
        rows (short prompts, nothing in the cache yet) are prefilled in the same forward, in the slots after the
        running rows: each running row's one token is padded to their width (the pads sit at the positions the
        row writes next, as a prefill's do, and no real query sees them), and a joining row's first token comes
        from its prompt's last position."""
        torch = self._torch
        for index in [i for i, r in enumerate(running) if r.seq.cancelled]:
            running[index].seq.finish_reason = "cancelled"
            self._finish(running[index])
        self._leave(cache, running, prefilling, [r for r in running if r.seq.finish_reason is None])
        if not running and joining:  # every running row left: the joining rows' prefill is a forward of its own
            self._prefill(cache, 0, joining, [0] * len(joining), [len(r.seq.prompt_ids) for r in joining])
            self._join(cache, running, joining)
            joining = []
        if not running:
            return
        rows = [*running, *joining]
        self.fused_joins += len(joining)
        pieces = [[int(r.next_token or 0)] for r in running] + [list(r.seq.prompt_ids) for r in joining]
        starts = [r.filled for r in running] + [0] * len(joining)
        ids, positions = self._padded_batch(pieces, starts)
        kv_length = max(starts) + ids.shape[1]
        cache.ensure_capacity(kv_length)
        last = [[0]] * len(running) + [[len(r.seq.prompt_ids) - 1] for r in joining]
        keep_index = torch.tensor(last, device=self.device) if joining else 1
        started = time.perf_counter()
        out = self._forward(cache, 0, ids, positions, kv_length, logits_to_keep=keep_index)
        tokens = self._sample(out.logits[:, -1, :], [r.seq for r in rows]).tolist()
        self.forward_cost.observe(ids.numel(), time.perf_counter() - started)
        keep = []
        for row, token in zip(running, tokens[: len(running)], strict=True):
            row.filled += 1
            if self._advance(row, int(token)):
                keep.append(row)
        for row, token in zip(joining, tokens[len(running) :], strict=True):
            row.filled = len(row.seq.prompt_ids)
            if self._advance(row, int(token)):
                keep.append(row)
        running.extend(joining)
        self._leave(cache, running, prefilling, keep)

    def _leave(self, cache: SlotCache, running: list[_Row], prefilling: _Row | None, keep: list[_Row]) -> None:
        """Shrink ``running`` to ``keep``: each hole takes the last running row, and a half-prefilled row follows
        the running rows down, so the batch stays in slots ``0..n-1`` and the prefill in slot ``n``."""
        if len(keep) == len(running):
            return
        kept = {id(r) for r in keep}
        rows, before = list(running), len(running)
        index = 0
        while index < len(rows):
            if id(rows[index]) in kept:
                index += 1
                continue
            last = rows.pop()
            if index < len(rows):  # the hole is not the last slot: the last row fills it (checked again if leaving)
                rows[index] = last
                if id(last) in kept:
                    cache.move(len(rows), index, last.filled)
        if prefilling is not None:
            cache.move(before, len(rows), prefilling.filled)
        running[:] = rows

    def _finish(self, row: _Row) -> None:
        seq = row.seq
        if seq.finish_reason != "error":
            row.detokenizer.flush()
            seq.text = row.detokenizer.text
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
        idx = torch.tensor(sampled_rows, device=logits.device)
        sub = logits[idx]
        temps = torch.tensor([rows[i].params.temperature for i in sampled_rows], device=logits.device).unsqueeze(-1)
        probs = torch.softmax(sub / temps, dim=-1).nan_to_num(0.0)
        top_ps = torch.tensor([rows[i].params.top_p for i in sampled_rows], device=logits.device).unsqueeze(-1)
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

    def _advance(self, row: _Row, token: int) -> bool:
        """Record one new token for ``row``; False when its sequence is finished."""
        seq = row.seq
        if seq.cancelled:
            seq.finish_reason = "cancelled"
        elif token in self.end_ids:
            seq.finish_reason = "stop"
        else:
            seq.generated.append(token)
            seq.token_times.append(time.monotonic())
            row.next_token = token
            if row.detokenizer.push(token):
                seq.text = row.detokenizer.text
            if seq.on_token is not None:
                seq.on_token(seq)
            if len(seq.generated) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason is None:
            return True
        self._finish(row)
        return False
