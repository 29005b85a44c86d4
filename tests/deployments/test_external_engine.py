"""A real ``transformers serve --continuous-batching`` process, started from the command a ``transformers-serve``
deployment gets, answering the endpoint's contract through :mod:`deployments.external`: ``/score``'s inputs as
chat completions, greedy token for token equal to the model's own ``generate``, budgets kept, streaming passed
through with the deployment's name."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.device import Placement
from deployments.engines import EngineLaunch, chat_request_for, engine_command
from deployments.external import ExternalEngineError, score_response, score_via_chat, stream_chat
from tasks.process_groups import stop_process_group
from tests.deployments.conftest import free_port, wait_for

QUESTIONS = ["Hello! Who are you?", "What is a Prefect flow?", "How are the endpoint's keys stored?"]


@pytest.fixture(scope="module")
def engine_url(context_sensitive_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    launch = EngineLaunch("transformers-serve", "ext", context_sensitive_model, port, cache_tokens=4096)
    command = engine_command(launch, Placement("cpu", "float32"))
    log_path = tmp_path_factory.mktemp("engine") / "transformers-serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command.argv,
            env={**os.environ, **command.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy() -> bool:
        assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}{command.ready_path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, "transformers serve to answer /health", timeout_s=180, poll_s=0.5)
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        stop_process_group(process, grace_s=10)


def greedy_reference(model_dir: Path, question: str, max_new_tokens: int) -> tuple[str, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
    )
    tensor = torch.tensor([ids])
    end_ids = list(model.generation_config.eos_token_id)
    with torch.inference_mode():
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    new = next((new[:i] for i, t in enumerate(new) if t in end_ids), new)
    return tokenizer.decode(new, skip_special_tokens=True), new


def test_score_inputs_become_chat_completions_equal_to_generate(
    engine_url: str, context_sensitive_model: Path
) -> None:
    async def score() -> list:
        async with httpx.AsyncClient(timeout=120) as http:
            return await score_via_chat(
                http,
                engine_url,
                None,
                [[{"role": "user", "content": q}] for q in QUESTIONS],
                max_new_tokens=12,
                do_sample=False,
                temperature=0.7,  # ignored: do_sample false is greedy on every engine
                top_p=0.9,
            )

    replies = asyncio.run(score())
    for question, reply in zip(QUESTIONS, replies, strict=True):
        text, tokens = greedy_reference(context_sensitive_model, question, 12)
        assert reply.text == text, question
        assert reply.finish_reason == ("length" if len(tokens) == 12 else "stop")
        assert reply.completion_tokens in (len(tokens), len(tokens) + 1)  # + the end token, where one came


def test_streaming_passes_through_with_the_deployment_name(engine_url: str) -> None:
    body = chat_request_for(
        [{"role": "user", "content": QUESTIONS[0]}], model=None, max_new_tokens=8, do_sample=False, temperature=None,
        top_p=None, stream=True,
    )  # fmt: skip

    async def collect() -> tuple[list[bytes], str]:
        async with httpx.AsyncClient(timeout=120) as http:
            events = [e async for e in stream_chat(http, engine_url, body, "blue")]
            whole = (await http.post(engine_url, json={**body, "stream": False})).json()
        return events, whole["choices"][0]["message"]["content"]

    events, whole = asyncio.run(collect())
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["model"] == "blue" for c in chunks)
    text = "".join((ch.get("delta") or {}).get("content") or "" for c in chunks for ch in c.get("choices") or [])
    assert text == whole
    finishes = [ch["finish_reason"] for c in chunks for ch in c.get("choices") or [] if ch.get("finish_reason")]
    assert finishes in (["length"], ["stop"])


def test_an_engine_error_is_raised_with_its_status(engine_url: str) -> None:
    async def bad() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            await score_via_chat(
                http, engine_url, "not-the-served-model", [[{"role": "user", "content": "hi"}]], max_new_tokens=4,
                do_sample=False, temperature=None, top_p=None,
            )  # fmt: skip

    with pytest.raises(ExternalEngineError) as caught:
        asyncio.run(bad())
    assert caught.value.status >= 400 and "the engine answered" in str(caught.value)


def test_the_samples_body_gets_the_builtin_servers_answer_shape(
    engine_url: str, context_sensitive_model: Path
) -> None:
    sample = {  # the sample's own request (Prompt flow node), plus chat turns as a second input
        "input_data": ["What is a Prefect flow?", [{"role": "user", "content": "Hello! Who are you?"}]],
        "params": {"temperature": 0.0, "max_new_tokens": 128, "do_sample": True, "return_full_text": True},
    }

    async def score(body: dict) -> tuple[list, list]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await score_response(http, engine_url, None, body, default_max_new_tokens=8, max_new_tokens_cap=10)

    answers, replies = asyncio.run(score(sample))
    first, _ = greedy_reference(context_sensitive_model, "What is a Prefect flow?", 10)  # capped at 10, greedy at 0
    second, _ = greedy_reference(context_sensitive_model, "Hello! Who are you?", 10)
    assert answers == [f"What is a Prefect flow?\n{first}", second]  # full text only for a string input
    assert all(r.completion_tokens is not None and r.completion_tokens <= 11 for r in replies)
    with_reasons = {**sample, "params": {"max_new_tokens": 3, "return_finish_reason": True}}
    answers, _ = asyncio.run(score(with_reasons))
    expected = []
    for question in ("What is a Prefect flow?", "Hello! Who are you?"):
        text, tokens = greedy_reference(context_sensitive_model, question, 3)
        expected.append({"text": text, "finish_reason": "length" if len(tokens) == 3 else "stop"})
    assert answers == expected


def test_a_transformers_serve_deployment_serves_score_and_streaming_chat_through_the_router(
    launch, context_sensitive_model: Path
) -> None:
    live = launch(max_new_tokens_cap=10, default_max_new_tokens=6)
    live.admin.create_deployment("ext", str(context_sensitive_model), "1", engine="transformers-serve", device="cpu")
    live.admin.wait_ready("ext", 240)
    live.admin.set_traffic({"ext": 100})
    assert live.admin.get_state()["deployments"]["ext"]["engine"] == "transformers-serve"
    question = "What is a Prefect flow?"
    greedy_text, tokens = greedy_reference(context_sensitive_model, question, 10)  # the cap, not the 128 asked

    # /score with the sample's body shape, greedy first (transformers' CB keeps its first request's settings)
    body = {"input_data": [question], "params": {"max_new_tokens": 128, "do_sample": False, "return_full_text": True}}
    scored = httpx.post(f"{live.url}/score", json=body, headers=live.headers(), timeout=120)
    assert scored.status_code == 200, scored.text
    assert scored.json() == [f"{question}\n{greedy_text}"]
    assert scored.headers["azureml-model-deployment"] == "ext"
    assert scored.headers["x-finish-reason"] == ("length" if len(tokens) == 10 else "stop")

    # streaming chat completions through the router: the same greedy text, OpenAI's framing, the deployment's name
    chat = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=chat, headers=live.headers(), timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["model"] for c in chunks} == {"ext"}
    text = "".join((ch.get("delta") or {}).get("content") or "" for c in chunks for ch in c.get("choices") or [])
    assert text == greedy_text

    # the router's own contract on top: keys, and per-deployment metrics
    assert httpx.post(f"{live.url}/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
    generated = [
        line
        for line in metrics.splitlines()
        if line.startswith('finetune_phi_generated_tokens_total{deployment="ext"}')
    ]
    assert generated and float(generated[0].split()[-1]) > 0
