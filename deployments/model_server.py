"""One deployment instance: a process that holds one model and generates, as an Azure ML instance runs a container.

    python -m deployments.model_server --name blue --model-path MODEL_DIR --port 43123 \\
        --endpoint-config server-config.json [--memory-limit-mb 4096]

The router (:mod:`deployments.server`) starts one per instance in its own process group, with a secret in
``FINETUNE_PHI_INSTANCE_TOKEN`` that every request but the probes must carry; it listens on loopback only. The
router has already checked keys, limits and the body; this process renders the prompt, generates with
:class:`deployments.engine.ModelRunner` (in a thread, or with ``endpoint.engine_process`` in a child process:
:mod:`deployments.engine_process`) and answers the endpoint's own shapes (``/score``,
``/v1/chat/completions`` with server-sent events), so the router passes answers through unchanged.

Probes: ``GET /health`` (liveness: the event loop answers) and ``GET /ready`` (readiness: 200 once the model is
loaded, 503 with ``{"state": "loading"|"failed", "error"}`` before or when the load failed).

The memory limit is applied to this process itself as an address-space limit (``RLIMIT_AS``) before torch is
imported: unlike a cgroup it needs no privilege (CI runners, laptops), and an allocation past it fails with
``MemoryError`` in this process instead of the kernel's OOM killer choosing a victim. It counts virtual memory,
which is why the router's size check adds the runtime's own footprint; CUDA maps far more address space than it
uses, so the limit is not applied on a GPU (the size check still is).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import resource
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.protocol import (
    FINISH_HEADER,
    INSTANCE_TOKEN_HEADER,
    PIN_HEADER,
    SERVER_TIMING_HEADER,
    TIME_LEFT_HEADER,
    TOKENS_HEADER,
    ApiError,
    ChatCompletionRequest,
    ScoreRequest,
    error_body,
    install_error_handlers,
    server_timing,
)

log = logging.getLogger("deployments.model_server")

# Test-only: "deployment=tests.module:Class" swaps the engine of that deployment (a runner that hangs, say). Only
# modules under tests/ are accepted, and tests/ is not part of the installed package, so no production
# configuration can reach it.
ENV_TEST_ENGINE = "FINETUNE_PHI_TEST_ENGINE"


def apply_memory_limit(limit_mb: int | None) -> None:
    """Cap this process's address space at ``limit_mb`` (before the model and torch are loaded)."""
    if not limit_mb:
        return
    limit = int(limit_mb) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def may_use_gpu(device: str | None) -> bool:
    """True unless the engine is sure to run on the CPU: CUDA maps far more address space than it uses, so an
    address-space limit would stop it from starting."""
    device = device or "cpu"
    return device != "cpu" and (device.startswith("cuda") or Path("/dev/nvidiactl").exists())


def runner_spec(name: str) -> str:
    """``module:Class`` of the runner that generates for deployment ``name``: the real one unless a test engine is
    named for it."""
    from deployments.engine_process import DEFAULT_RUNNER

    for item in (os.environ.get(ENV_TEST_ENGINE) or "").split(","):
        deployment, _, target = item.partition("=")
        if deployment.strip() == name and target.startswith("tests."):
            return target
    return DEFAULT_RUNNER


def start_engine(name: str, model_path: str, config: Any, device: str | None, dtype: str | None) -> Any:
    """The deployment's engine: the runner in a child process (``config.engine_process``) or in this one."""
    from deployments.engine_process import EngineProcess, runner_class

    options = {
        "max_batch_size": config.max_batch_size,
        "batch_wait_ms": config.batch_wait_ms,
        "fuse_joins": config.fuse_joins,
        "torch_threads": config.torch_threads,
        "device": device or config.device,
        "dtype": dtype or config.dtype,
    }
    if config.engine_process:
        return EngineProcess(model_path, runner=runner_spec(name), **options)
    return runner_class(runner_spec(name))(model_path, **options)


def create_app(
    name: str, model_path: str, config: Any, token: str, device: str | None = None, dtype: str | None = None
) -> Any:
    """The instance's ASGI app; the model loads in a thread once the app starts (probes answer meanwhile)."""
    from deployments.engine import InputTooLongError, SamplingParams, Sequence

    state: dict[str, Any] = {"runner": None, "state": "loading", "error": None}

    def load() -> None:
        started = time.monotonic()
        try:
            runner = start_engine(name, model_path, config, device, dtype)
        except BaseException as exc:  # MemoryError past the limit too: report it, the router stops this process
            log.warning("deployment %s failed to load %s: %s", name, model_path, exc)
            state.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            return
        log.info("deployment %s loaded in %.1f s", name, time.monotonic() - started)
        state.update(runner=runner, state="ready")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name=f"load-{name}", daemon=True).start()
        yield
        if state["runner"] is not None:
            state["runner"].close()

    app = FastAPI(title=f"finetune-phi deployment {name}", lifespan=lifespan, openapi_url=None)
    install_error_handlers(app)

    def runner_for(request: Request) -> Any:
        given = request.headers.get(INSTANCE_TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "Unauthorized", "this deployment process answers its router only")
        if state["runner"] is None:
            raise ApiError(503, "DeploymentNotReady", f"deployment {name!r} is {state['state']}")
        return state["runner"]

    def time_left(request: Request, started: float) -> float:
        header = request.headers.get(TIME_LEFT_HEADER, "")
        budget_ms = float(header) if header.replace(".", "", 1).isdigit() else float(config.request_timeout_ms)
        return budget_ms / 1000.0 - (time.monotonic() - started)

    def budget(requested: int | None, room: int) -> int:
        wanted = requested if requested is not None else config.default_max_new_tokens
        return max(1, min(wanted, config.max_new_tokens_cap, room))

    def encode(runner: Any, messages: list[dict[str, str]], param: str) -> list[int]:
        try:
            ids = runner.encode_chat(messages)
        except Exception as exc:  # the model's chat template refuses the conversation (empty, roles out of order)
            raise ApiError(
                400, "InvalidConversation", f"the model's chat template cannot render this input: {exc}", param=param
            ) from None
        try:
            runner.check_fits(ids)
        except InputTooLongError as exc:
            raise ApiError(400, "InputTooLong", str(exc), param=param) from None
        return ids

    async def run_all(runner: Any, seqs: list[Any], seconds_left: float) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for seq in seqs:
            future: asyncio.Future[Any] = loop.create_future()

            def done(s: Any, f: asyncio.Future[Any] = future) -> None:
                loop.call_soon_threadsafe(lambda: f.done() or f.set_result(s))

            seq.on_done = done
            futures.append(future)
        for seq in seqs:
            runner.submit(seq)
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=max(seconds_left, 0.001))
        except TimeoutError:
            raise ApiError(
                408,
                "RequestTimeout",
                f"the request took longer than request_timeout_ms ({config.request_timeout_ms} ms); "
                "ask for fewer max_new_tokens or raise the timeout",
            ) from None
        finally:
            for seq in seqs:
                if seq.finish_reason is None:
                    seq.cancel()
        failed = next((s for s in seqs if s.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, "GenerationFailed", f"generation failed: {failed.error}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = {"state": state["state"], "error": state["error"], "pid": os.getpid()}
        return JSONResponse(body, status_code=200 if state["state"] == "ready" else 503)

    @app.post("/score")
    async def score(request: Request, body: ScoreRequest) -> JSONResponse:
        started = time.monotonic()
        runner = runner_for(request)
        p = body.params
        do_sample = bool(p.do_sample) and (p.temperature is None or p.temperature > 0)
        seqs = []
        for index, item in enumerate(body.input_data):
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else [t.model_dump() for t in item]
            ids = encode(runner, messages, f"input_data.{index}")
            params = SamplingParams(
                max_new_tokens=budget(p.max_new_tokens, runner.check_fits(ids)),
                do_sample=do_sample,
                temperature=p.temperature if p.temperature is not None else 1.0,
                top_p=p.top_p if p.top_p is not None else 1.0,
            )
            seqs.append(Sequence(ids, params))
        await run_all(runner, seqs, time_left(request, started))
        replies = []
        for item, seq in zip(body.input_data, seqs, strict=True):
            text = seq.text
            if p.return_full_text and isinstance(item, str):
                text = f"{item}\n{text}"
            replies.append({"text": text, "finish_reason": seq.finish_reason} if p.return_finish_reason else text)
        headers = {
            PIN_HEADER: name,
            FINISH_HEADER: ",".join(s.finish_reason or "" for s in seqs),
            TOKENS_HEADER: str(sum(len(s.generated) for s in seqs)),
            SERVER_TIMING_HEADER: server_timing(started),
        }
        return JSONResponse(replies, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        started = time.monotonic()
        runner = runner_for(request)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
        ]
        ids = encode(runner, messages, "messages")
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default: sampling at 1
        params = SamplingParams(
            max_new_tokens=budget(body.max_completion_tokens or body.max_tokens, runner.check_fits(ids)),
            do_sample=temperature > 0,
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else 1.0,
        )
        stops = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        model_name = body.model or name
        seconds_left = time_left(request, started)
        seq = Sequence(ids, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = stream_chat(runner, seq, seconds_left, completion_id, model_name, stops, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={PIN_HEADER: name})
        await run_all(runner, [seq], seconds_left)
        text, finish = apply_stops(seq.text, stops, seq.finish_reason or "stop")
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(seq.generated),
                "total_tokens": len(ids) + len(seq.generated),
            },
        }
        headers = {
            PIN_HEADER: name,
            FINISH_HEADER: finish,
            TOKENS_HEADER: str(len(seq.generated)),
            SERVER_TIMING_HEADER: server_timing(started),
        }
        return JSONResponse(payload, headers=headers)

    async def stream_chat(
        runner: Any,
        seq: Any,
        seconds_left: float,
        completion_id: str,
        model_name: str,
        stops: list[str],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[str] = asyncio.Queue()  # "token", "done" or "timeout"
        # One wake-up of this loop per batch of new tokens, not one per token: the worker thread skips it while
        # one is pending (each is a write to the loop's wake-up fd, and a queue item this loop must go through).
        # The worker appends a token before it looks at the flag, and the flag is cleared before the text is
        # read, so no token is left unseen.
        token_pending = threading.Event()

        def on_token(_: Any) -> None:
            if not token_pending.is_set():
                token_pending.set()
                loop.call_soon_threadsafe(updates.put_nowait, "token")

        seq.on_token = on_token
        seq.on_done = lambda s: loop.call_soon_threadsafe(updates.put_nowait, "done")
        # one timer for the whole stream instead of a wait_for (a task) around every token
        timer = loop.call_later(max(seconds_left, 0.001), updates.put_nowait, "timeout")
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                data["choices"], data["usage"] = [], usage
            return f"data: {json.dumps(data)}\n\n".encode()

        sent, finish = 0, None
        try:
            runner.submit(seq)
            yield chunk({"role": "assistant", "content": ""}, None)
            while finish is None:
                update = await updates.get()
                token_pending.clear()
                is_done = update == "done"
                if update == "timeout":
                    seq.cancel()
                    error = error_body(408, "RequestTimeout", "the request took longer than request_timeout_ms")
                    yield f"data: {json.dumps(error)}\n\n".encode()
                    break
                text, stop_finish = apply_stops(seq.text, stops, None)
                if len(text) > sent and not text.endswith("\ufffd"):  # hold back a half-decoded character
                    yield chunk({"content": text[sent:]}, None)
                    sent = len(text)
                if stop_finish is not None:
                    seq.cancel()
                    finish = "stop"
                elif is_done:
                    if seq.finish_reason == "error":
                        error = error_body(500, "GenerationFailed", f"generation failed: {seq.error}")
                        yield f"data: {json.dumps(error)}\n\n".encode()
                        break
                    text, _ = apply_stops(seq.text, stops, None)
                    if len(text) > sent:
                        yield chunk({"content": text[sent:]}, None)
                    finish = seq.finish_reason or "stop"
            if finish is not None:
                yield chunk({}, finish)
                if include_usage:
                    usage = {
                        "prompt_tokens": len(seq.prompt_ids),
                        "completion_tokens": len(seq.generated),
                        "total_tokens": len(seq.prompt_ids) + len(seq.generated),
                    }
                    yield chunk({}, None, usage)
            yield b"data: [DONE]\n\n"
        finally:
            timer.cancel()
            if seq.finish_reason is None:
                seq.cancel()

    return app


def apply_stops(text: str, stops: list[str], finish: str | None) -> tuple[str, str | None]:
    """Cut ``text`` at the first stop string (OpenAI's ``stop``); the finish reason becomes ``stop`` then."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    if cut >= 0:
        return text[:cut], "stop"
    return text, finish


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One deployment instance (the endpoint's router starts these).")
    parser.add_argument("--name", required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--endpoint-config", required=True, type=Path, help="JSON of tasks.config.EndpointConfig")
    parser.add_argument("--memory-limit-mb", type=int, default=None)
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the endpoint config's)")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16 (default: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tasks.config import EndpointConfig

    config = EndpointConfig.model_validate(json.loads(args.endpoint_config.read_text(encoding="utf-8")))
    if may_use_gpu(args.device or config.device):  # the deployment's own choice, else the endpoint's
        log.info("deployment %s: no address-space limit on a GPU (the router's size check still applies)", args.name)
    else:
        apply_memory_limit(args.memory_limit_mb)  # before torch and the model are in memory
    import uvicorn

    from deployments.protocol import ENV_INSTANCE_TOKEN

    token = os.environ.pop(ENV_INSTANCE_TOKEN, "")
    if not token:
        raise SystemExit(f"{ENV_INSTANCE_TOKEN} is not set: deployment processes are started by the endpoint's router")
    app = create_app(args.name, args.model_path, config, token, args.device, args.dtype)
    # access_log off: the router logs each request once; timeout_keep_alive above the router's pool idle time
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, timeout_keep_alive=75)


if __name__ == "__main__":
    main()
