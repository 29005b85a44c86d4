"""The builtin engine's continuous batching on a real tiny Phi-3 model, against the model's own ``generate``.

One runner (batch of 4, prefill chunks of 16 tokens so longer prompts are prefilled over several steps) serves
the module; reference replies come from ``model.generate`` on the same weights while the runner is idle. The model
is ``context_sensitive_model`` (conftest): under the default initialisation a model repeats one token whatever
the context, and a wrong cache row would go unnoticed.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from deployments.engine import ForwardCost, IncrementalDetokenizer, ModelRunner, SamplingParams, Sequence

CHUNK = 16


@pytest.fixture(scope="module")
def runner(context_sensitive_model: Path) -> ModelRunner:
    engine = ModelRunner(
        context_sensitive_model,
        max_batch_size=4,
        batch_wait_ms=0,
        torch_threads=1,
        device="cpu",
        prefill_chunk_tokens=CHUNK,
    )
    yield engine
    engine.close()


def prompt(runner: ModelRunner, text: str) -> list[int]:
    return runner.encode_chat([{"role": "user", "content": text}])


def reference(runner: ModelRunner, ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's own greedy reply (without its end token), batch of one."""
    import torch

    tensor = torch.tensor([ids])
    with torch.inference_mode():
        out = runner.model.generate(
            input_ids=tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(runner.end_ids),
            pad_token_id=runner.pad_id,
        )
    new = out[0, len(ids) :].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in runner.end_ids), new)


def run(runner: ModelRunner, seqs: list[Sequence], timeout_s: float = 60) -> list[Sequence]:
    done = [threading.Event() for _ in seqs]
    for seq, event in zip(seqs, done, strict=True):
        seq.on_done = lambda s, e=event: e.set()
        runner.submit(seq)
    for event in done:
        assert event.wait(timeout_s), "a sequence did not finish"
    return seqs


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def test_greedy_single_requests_equal_generate(runner: ModelRunner) -> None:
    long_text = " ".join(["Tell me about Prefect flows, deployments and the registry."] * 3)
    for text in ["Hello! Who are you?", long_text]:
        ids = prompt(runner, text)
        (seq,) = run(runner, [Sequence(ids, greedy(24))])
        assert seq.generated == reference(runner, ids, 24), text
        assert seq.text == runner.decode(seq.generated)
    assert len(prompt(runner, long_text)) > 2 * CHUNK  # that prompt really was prefilled in chunks


def test_joins_and_leaves_keep_every_row_equal_to_generate(runner: ModelRunner) -> None:
    """Ten requests through four slots, budgets 3..30: rows leave at different steps and waiting ones take their
    slots (short and chunked prompts alike); each reply is still the model's own greedy reply."""
    texts = [f"Question {i}: {'what is a rollback ' * (i % 4)}?" for i in range(10)]
    budgets = [3, 30, 7, 12, 30, 5, 18, 9, 25, 4]
    seqs = [Sequence(prompt(runner, t), greedy(b)) for t, b in zip(texts, budgets, strict=True)]
    run(runner, seqs)
    for seq, budget in zip(seqs, budgets, strict=True):
        expected = reference(runner, seq.prompt_ids, budget)
        assert seq.generated == expected
        assert seq.finish_reason == ("length" if len(expected) == budget else "stop")


def test_a_request_arriving_mid_batch_gets_tokens_before_the_batch_ends(runner: ModelRunner) -> None:
    # a prompt whose reply runs its whole budget: the batch it starts lasts 80 steps
    candidates = [prompt(runner, f"Hello {i}! Who are you?") for i in range(10)]
    ids = next(c for c in candidates if len(reference(runner, c, 80)) == 80)
    started = threading.Event()
    first = Sequence(ids, greedy(80), on_token=lambda s: len(s.generated) == 5 and started.set())
    first_done = threading.Event()
    first.on_done = lambda s: first_done.set()
    runner.submit(first)
    assert started.wait(30)
    late_ids = prompt(runner, "How are the endpoint's keys stored? " * 3)  # chunked prefill while the batch runs
    (late,) = run(runner, [Sequence(late_ids, greedy(10))])
    assert first_done.wait(60)
    assert late.token_times[0] < first.token_times[-1]  # no waiting for the running batch to end
    assert late.token_times[-1] < first.token_times[-1]  # and it left the batch as soon as it was done
    assert late.generated == reference(runner, late_ids, 10)
    assert first.generated == reference(runner, ids, 80)


def test_mixed_sampling_settings_in_one_batch_each_honoured(runner: ModelRunner) -> None:
    ids = prompt(runner, "What is low-rank adaptation?")
    expected = reference(runner, ids, 20)
    hot = SamplingParams(max_new_tokens=20, do_sample=True, temperature=50.0, top_p=1.0)
    seqs = [
        Sequence(ids, greedy(20)),
        Sequence(ids, SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.0, top_p=1e-9)),
        Sequence(ids, SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.0)),
        Sequence(ids, hot),
        Sequence(ids, hot),
        Sequence(ids, greedy(6)),
    ]
    run(runner, seqs)
    greedy_row, top_p_row, zero_temp_row, hot_a, hot_b, short_row = seqs
    assert greedy_row.generated == expected
    assert top_p_row.generated == expected  # top_p keeps only the most likely token: sampling becomes argmax
    assert zero_temp_row.generated == expected  # temperature 0 decodes greedily
    # temperature 50 flattens the distribution: two such rows differ from greedy and from each other
    assert hot_a.generated != expected and hot_b.generated != expected and hot_a.generated != hot_b.generated
    assert short_row.generated == expected[:6] and short_row.finish_reason == "length"


def test_cancelled_row_leaves_and_the_others_finish(runner: ModelRunner) -> None:
    ids = prompt(runner, "Explain a rollback in one or two sentences.")
    victim = Sequence(ids, greedy(200), on_token=lambda s: len(s.generated) == 3 and s.cancel())
    other = Sequence(ids, greedy(15))
    run(runner, [victim, other])
    assert victim.finish_reason == "cancelled" and len(victim.generated) < 200
    assert other.generated == reference(runner, ids, 15)


TEXTS = [
    "Plain ASCII, with punctuation: a, b; c!",
    "Dansk: blåbærgrød på ærø, Øresund og Århus.",
    "Emoji 🙂🚀 and CJK 東京 and math ∑∫ mixed in.",
    "  leading spaces\nnew lines\ttabs  ",
]


def test_incremental_detokenisation_equals_a_full_decode(runner: ModelRunner) -> None:
    tokenizer = runner.tokenizer
    rng = random.Random(0)
    vocab = len(tokenizer)
    cases = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    cases += [[rng.randrange(vocab) for _ in range(60)] for _ in range(20)]  # includes specials and split bytes
    for ids in cases:
        detok = IncrementalDetokenizer(tokenizer)
        pieces = [detok.push(t) for t in ids]
        pieces.append(detok.flush())
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == full == detok.text
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)  # a split character is never streamed half-done
    for text, ids in zip(TEXTS, cases, strict=False):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_engine_reply_text_is_the_full_decode(runner: ModelRunner) -> None:
    ids = prompt(runner, "Why should replies end with an end token?")
    streamed: list[str] = []
    (seq,) = run(runner, [Sequence(ids, greedy(30), on_token=lambda s: streamed.append(s.text))])
    assert seq.text == runner.decode(seq.generated)
    assert all(seq.text.startswith(t) for t in streamed)  # the text only ever grows


def test_prompts_of_different_lengths_prefilled_in_one_forward_each_equal_generate(
    context_sensitive_model: Path,
) -> None:
    """Requests arriving together are prefilled in one padded forward (production's 512-token chunks hold them
    all): the padding of a shorter prompt must not overwrite its own keys and values."""
    engine = ModelRunner(context_sensitive_model, max_batch_size=4, batch_wait_ms=500, torch_threads=1, device="cpu")
    try:
        texts = ["Hi", "What is a rollback " * 6, "Who are you?", "Tell me about Prefect flows and tasks."]
        seqs = [Sequence(prompt(engine, t), greedy(20)) for t in texts]
        assert len({len(s.prompt_ids) for s in seqs}) == len(seqs)  # four lengths: three rows are padded
        run(engine, seqs)
        for seq in seqs:
            assert seq.generated == reference(engine, seq.prompt_ids, 20)
    finally:
        engine.close()


def test_joins_prefilled_inside_the_decoding_step_keep_every_row_equal_to_generate(
    context_sensitive_model: Path,
) -> None:
    """``fuse_joins="always"``: a short prompt joining a running batch is prefilled in the running rows' decoding
    step (their one token padded to the prompt's width). Ten requests through four slots: every reply is still the
    model's own greedy reply, and rows that joined late got their first token before the first row's last."""
    engine = ModelRunner(
        context_sensitive_model, max_batch_size=4, batch_wait_ms=0, torch_threads=1, device="cpu", fuse_joins="always"
    )
    try:
        texts = [f"Question {i}: {'what is a rollback ' * (i % 4)}?" for i in range(10)]
        budgets = [30, 3, 7, 12, 30, 5, 18, 9, 25, 4]
        seqs = [Sequence(prompt(engine, t), greedy(b)) for t, b in zip(texts, budgets, strict=True)]
        run(engine, seqs)
        assert engine.fused_joins >= 3  # at least the rows that took a slot while others ran
        for seq, budget in zip(seqs, budgets, strict=True):
            expected = reference(engine, seq.prompt_ids, budget)
            assert seq.generated == expected
            assert seq.finish_reason == ("length" if len(expected) == budget else "stop")
        assert min(s.token_times[0] for s in seqs[1:] if s.token_times) < seqs[0].token_times[-1]
    finally:
        engine.close()


def test_the_forward_cost_model_fits_a_fixed_and_a_per_token_cost() -> None:
    cost = ForwardCost()
    assert cost.overhead_tokens() == 0  # nothing measured yet: never fuse
    for tokens in [16, 16, 640, 16, 40, 16] * 10:
        cost.observe(tokens, 0.004 + 0.00001 * tokens)  # 4 ms a forward plus 10 us a token
    assert cost.overhead_tokens() == pytest.approx(400, rel=1e-6)
    same_size = ForwardCost()
    for _ in range(10):
        same_size.observe(16, 0.004)
    assert same_size.overhead_tokens() == 0  # one size only: no way to tell the fixed cost, so no fusing
    compute_bound = ForwardCost()
    for tokens in [16, 640, 40] * 10:
        compute_bound.observe(tokens, 0.0001 * tokens)
    assert compute_bound.overhead_tokens() < 1  # the time is all per token: a join keeps its own prefill
    overhead_bound = ForwardCost()
    for tokens in [16, 640, 40] * 10:
        overhead_bound.observe(tokens, 0.004)
    assert overhead_bound.overhead_tokens() == float("inf")  # a bigger forward costs no more: always fuse


def test_the_engine_process_generates_what_the_runner_does_and_ends_with_its_socket(
    runner: ModelRunner, context_sensitive_model: Path
) -> None:
    from deployments.engine_process import EngineProcess

    engine = EngineProcess(context_sensitive_model, max_batch_size=4, batch_wait_ms=0, torch_threads=1, device="cpu")
    try:
        texts = ["Hello! Who are you?", "What is a Prefect flow?", "Register the model.", "Roll back."]
        ids = [engine.encode_chat([{"role": "user", "content": t}]) for t in texts]
        assert ids == [prompt(runner, t) for t in texts]  # the prompt rendered on the HTTP side is the runner's
        streamed: list[int] = []
        seqs = [Sequence(i, greedy(12)) for i in ids]
        seqs[0].on_token = lambda s: streamed.append(len(s.generated))
        run(engine, seqs)
        for seq, prompt_ids in zip(seqs, ids, strict=True):
            assert seq.generated == reference(runner, prompt_ids, 12)
            assert seq.text == runner.decode(seq.generated)
            assert len(seq.token_times) == len(seq.generated)
        assert streamed and streamed[-1] == len(seqs[0].generated)  # tokens came as they were made
        cancelled = Sequence(ids[0], greedy(400))
        first = threading.Event()
        cancelled.on_token = lambda s: first.set()
        done = threading.Event()
        cancelled.on_done = lambda s: done.set()
        engine.submit(cancelled)
        assert first.wait(30)
        cancelled.cancel()  # crosses to the engine process
        assert done.wait(30) and cancelled.finish_reason == "cancelled" and len(cancelled.generated) < 400
    finally:
        engine.close()
    assert engine.process.returncode == 0
