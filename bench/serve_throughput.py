"""Serving throughput: our endpoint against ``mlflow models serve``, ``transformers serve --continuous-batching`` and
the model's own ``generate``, on the same model.

    .venv/bin/python bench/serve_throughput.py                       # tiny model, 1/4/16 clients, 32 new tokens
    .venv/bin/python bench/serve_throughput.py --size 100m --servers ours transformers-serve --min-requests 16
    .venv/bin/python bench/serve_throughput.py --concurrency 1 4 16 --max-new-tokens 32 --requests-per-client 8

One run builds a Phi-3-architecture model with random weights (``--size tiny``: the ``tiny`` recipe's
architecture, 3.7 M parameters; ``--size 100m``: hidden 768, 12 layers, 12 heads, MLP 2560, ~100 M parameters, so
that compute dominates; random weights so every reply runs to ``max_new_tokens``; ``--model-dir`` serves another
folder), registers it in an MLflow SQLite store and serves it with each server of ``--servers``:

- ``mlflow``: ``mlflow models serve -m models:/NAME/VERSION --env-manager local`` (the sample's serving path),
  called on ``/invocations``; our endpoint is measured on ``/score`` beside it (the sample's contract);
- ``ours``: our endpoint, one deployment, also on streaming ``/v1/chat/completions``;
- ``transformers-serve``: ``transformers serve MODEL --continuous-batching`` (transformers' paged-attention
  continuous batching), started by :func:`deployments.engines.engine_command`, on streaming chat completions,
  its paged cache capped at ``--hf-cache-tokens`` (16,384 tokens, 16 rows of a 1,024-token context; the library's
  own default takes most of the machine's free RAM: 12-14 GB here).

"deployment process (direct)" sends the same ``/score`` bodies (and "(direct, stream)" the same streaming chat
bodies) to the deployment's model-server process on its loopback port, with the instance token the router uses
(read from the state folder's ``instances.json``), so the difference to "finetune-phi endpoint" is the router
alone: keys, routing, admission, metrics and one more HTTP hop. Every non-streamed reply of the deployment process
carries its own handling time (``Server-Timing: deployment;dur=<ms>``, relayed by the router), so the hop is also
given net of generation: the p50 of latency minus the deployment's time, routed against direct (generation's
run-to-run spread, tens of ms at 32 tokens on a shared VM, no longer hides a hop of a few ms). The router's own RSS
and each deployment process's RSS are read from ``/admin/state`` after the run (our endpoint's peak RSS counts the
router and its deployment processes).

All get the same fixed prompts, greedy, with the same ``max_new_tokens``, from 1, 4 and 16 concurrent clients.
MLflow gets the prompt already rendered with the chat template (its text-generation pipeline does not apply one);
the others render it themselves. Generated tokens are counted the same way for all: the reply text re-tokenised with
the model's tokenizer. Streaming runs also give the time to the first content chunk (TTFT). Every server runs with
the same torch thread count (``--threads``). Peak memory is the server process's peak RSS, sampled every 50 ms. The
load generator is one asyncio event loop with aiohttp in the benchmark's process ("client CPU ms/request": this
process's CPU per answered request, the 50 ms RSS sampler's included). "server CPU ms/request" is the CPU time (user
+ system, from ``/proc``) the server spent per answered request: for our endpoint the router's own process alone
(its children are the deployment processes), for the direct target the deployment process with its engine process,
for the others the server with its workers.

After the servers stop, the same process measures the ceilings in-process with the same thread count: the model's
own ``generate`` at each client count's batch (1, 4, 16), our engine alone (:class:`deployments.engine.ModelRunner`:
16 rows, and 1 and 16 closed-loop clients with their TTFT), transformers' continuous-batching manager alone
(``model.generate_batch``, paged attention), and the burst floor of TTFT: the model's own forward over 1 prompt and
over the largest level's prompts at once (the last of that many requests sent together cannot get its first token
sooner). TTFT p99 is also given over the requests after each client's first ("later"): a closed loop whose replies
all run to ``max_new_tokens`` stays in step, so those arrive in bursts too. Prints markdown tables and the target
ratios, and writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PROMPTS = [
    "What is a Prefect flow?",
    "Hello! Who are you?",
    "How does the endpoint pick a deployment?",
    "Explain a rollback in one or two sentences.",
    "What does the registry keep for each model version?",
    "Why should replies end with an end token?",
    "What is low-rank adaptation?",
    "How are the endpoint's keys stored?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def process_tree(process: Any, children: bool) -> list[Any]:
    """A psutil process and, with ``children``, its live descendants (a server's workers)."""
    return [process, *(process.children(recursive=True) if children else [])]


class RssSampler:
    """Peak resident memory of a process and its children, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        total = 0
        for proc in process_tree(self.process, children=True):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Target:
    """One server under test: how to call it and how to read the reply (``stream``: server-sent events)."""

    def __init__(
        self,
        name: str,
        url: str,
        pid: int,
        headers: dict[str, str],
        make_body: Any,
        read: Any,
        stream: bool = False,
        router: bool = False,
    ) -> None:
        self.name, self.url, self.pid, self.headers = name, url, pid, headers
        self.make_body, self.read, self.stream = make_body, read, stream
        self.router = router  # its CPU is its own; its children (the deployment processes) are counted apart


async def read_stream(response: Any, started: float) -> tuple[str, float | None]:
    """The text of an OpenAI chat completion stream, and when its first content arrived (seconds after start)."""
    parts: list[str] = []
    first: float | None = None
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:]).get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                if first is None:
                    first = time.perf_counter() - started
                parts.append(content)
    return "".join(parts), first


def run_level(target: Target, prompts: list[str], clients: int, total: int, tokenizer: Any, budget: int) -> LevelRun:
    """``clients`` closed-loop clients sending ``total`` requests in all, on one asyncio event loop (aiohttp): a
    load generator that costs far less CPU per request than a thread per client (which on two cores took CPU and
    GIL turns from the servers it measured); its own CPU per request is reported beside the server's."""
    import asyncio

    import aiohttp

    latencies: list[float] = []
    first_tokens: list[float] = []
    # TTFT of the requests after each client's first: the first ones arrive all at once when the round starts
    later_first_tokens: list[float] = []
    deployment_times: list[float] = []  # the deployment process's own time per reply (its Server-Timing header)
    outside_times: list[float] = []  # latency minus that: the client's, the router's and the HTTP hops' share
    replies: list[str] = []
    errors = 0
    counter = iter(range(total))

    async def one(http: aiohttp.ClientSession, prompt: str) -> tuple[bool, str, float | None, float | None]:
        started = time.perf_counter()
        async with http.post(target.url, json=target.make_body(prompt)) as response:
            if response.status != 200:
                await response.read()
                return False, "", None, None
            if target.stream:
                text, first = await read_stream(response, started)
                return True, text, first, None
            body = json.loads(await response.read())
            return True, target.read(body), None, deployment_seconds(response.headers.get("server-timing", ""))

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal errors
        opening = True
        while (index := next(counter, None)) is not None:
            started = time.perf_counter()
            ok, text, first, deployment_s = await one(http, prompts[index % len(prompts)])
            elapsed = time.perf_counter() - started
            if not ok:
                errors += 1
                continue
            latencies.append(elapsed)
            replies.append(text)
            if first is not None:
                first_tokens.append(first)
                if not opening:
                    later_first_tokens.append(first)
            opening = False
            if deployment_s is not None:
                deployment_times.append(deployment_s)
                outside_times.append(elapsed - deployment_s)

    async def level() -> None:
        connector = aiohttp.TCPConnector(limit=clients, force_close=False)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(headers=target.headers, connector=connector, timeout=timeout) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))

    cpu_before = process_cpu_s(target.pid, not target.router)
    client_cpu_before = time.process_time()
    with RssSampler(target.pid) as rss:
        started = time.perf_counter()
        asyncio.run(level())
        wall = time.perf_counter() - started
    client_cpu_s = time.process_time() - client_cpu_before
    cpu_s = process_cpu_s(target.pid, not target.router) - cpu_before
    # Counted after the clock stops, so the client's own tokenising does not slow the servers down. A reply's text
    # can re-tokenise into more tokens than were generated (random weights pick byte pieces that merge differently):
    # never count more than the budget.
    tokens = [min(len(tokenizer(reply, add_special_tokens=False)["input_ids"]), budget) for reply in replies]
    return LevelRun(
        latencies,
        first_tokens,
        tokens,
        errors,
        wall,
        rss.peak,
        cpu_s,
        deployment_times,
        outside_times,
        client_cpu_s,
        later_first_tokens,
    )


def deployment_seconds(server_timing: str) -> float | None:
    """The ``deployment;dur=<ms>`` entry of a Server-Timing header, in seconds (None without one)."""
    for entry in server_timing.split(","):
        name, _, params = entry.strip().partition(";")
        if name == "deployment":
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key == "dur":
                    return float(value) / 1000.0
    return None


def process_cpu_s(pid: int, children: bool) -> float:
    """CPU seconds (user + system) of the process, with its live children's (a server's workers) or without them
    (the router: its children are the deployment processes, counted apart)."""
    import psutil

    total = 0.0
    for proc in process_tree(psutil.Process(pid), children):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class LevelRun:
    """What one target did in one round of a level: per-request numbers, kept raw so rounds can be pooled."""

    latencies: list[float]
    first_tokens: list[float]
    tokens: list[int]
    errors: int
    wall_s: float
    peak_rss: int
    cpu_s: float  # the server's CPU seconds over the round (process_cpu_s: the router without its children)
    deployment_times: list[float]
    outside_times: list[float]
    client_cpu_s: float  # the load generator's own CPU seconds (this process: the event loop and the RSS sampler)
    later_first_tokens: list[float]  # TTFT of the requests after each client's first of the round


def summarise(name: str, clients: int, runs: list[LevelRun]) -> dict[str, Any]:
    """One table row from a target's rounds: requests and tokens over the rounds' summed wall time, percentiles of
    the pooled latencies."""
    latencies = [x for r in runs for x in r.latencies]
    first_tokens = [x for r in runs for x in r.first_tokens]
    later_first_tokens = [x for r in runs for x in r.later_first_tokens]
    tokens = [x for r in runs for x in r.tokens]
    deployment_times = [x for r in runs for x in r.deployment_times]
    outside_times = [x for r in runs for x in r.outside_times]
    wall = sum(r.wall_s for r in runs)
    return {
        "server": name,
        "clients": clients,
        "rounds": len(runs),
        "requests": len(latencies),
        "errors": sum(r.errors for r in runs),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "generated_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_tokens_per_reply": round(statistics.mean(tokens), 1) if tokens else 0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "ttft_p50_ms": round(percentile(first_tokens, 50) * 1000, 1) if first_tokens else None,
        "ttft_p99_ms": round(percentile(first_tokens, 99) * 1000, 1) if first_tokens else None,
        "ttft_p99_later_ms": round(percentile(later_first_tokens, 99) * 1000, 1) if later_first_tokens else None,
        "deployment_p50_ms": round(percentile(deployment_times, 50) * 1000, 2) if deployment_times else None,
        "outside_p50_ms": round(percentile(outside_times, 50) * 1000, 2) if outside_times else None,
        "peak_rss_mb": round(max(r.peak_rss for r in runs) / 2**20, 1),
        "cpu_ms_per_request": round(1000 * sum(r.cpu_s for r in runs) / len(latencies), 2) if latencies else None,
        "client_cpu_ms_per_request": (
            round(1000 * sum(r.client_cpu_s for r in runs) / len(latencies), 2) if latencies else None
        ),
    }


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


SIZES = {  # build_tiny_model arguments
    "tiny": {},
    "100m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2560},
}


def build_model(size: str, folder: Path) -> Path:
    from training.tiny_model import build_tiny_model, chat_texts

    texts = list(chat_texts(REPO_ROOT / "data" / "sample" / "chat_sample.jsonl"))
    return build_tiny_model(folder, texts, **SIZES[size])


# ------------------------------------------------------------------------------------------- in-process ceilings
def closed_loop(
    runner: Any, encoded: list[list[int]], clients: int, total: int, max_new_tokens: int
) -> tuple[int, float, list[float], list[float]]:
    """``clients`` senders that each submit their next prompt the moment their last one ends, as the served levels'
    clients do, with no HTTP at all: tokens generated, wall time, and each request's time to its first token (from
    its submission), all of them and those after each sender's first. What the served TTFT adds to this is the HTTP
    path's."""
    from deployments.engine import SamplingParams, Sequence

    indexes = iter(range(total))
    lock = threading.Lock()
    finished = threading.Semaphore(0)
    seqs: list[Any] = []
    first_tokens: list[float] = []
    later_first_tokens: list[float] = []

    def send(opening: bool) -> None:
        with lock:
            index = next(indexes, None)
        if index is None:
            finished.release()
            return
        submitted = time.monotonic()
        seq = Sequence(encoded[index % len(encoded)], SamplingParams(max_new_tokens=max_new_tokens))

        def on_done(done: Any, submitted: float = submitted) -> None:
            if done.token_times:
                first_tokens.append(done.token_times[0] - submitted)
                if not opening:
                    later_first_tokens.append(done.token_times[0] - submitted)
            send(False)  # on the engine's worker thread: the next prompt is queued before the next step

        seq.on_done = on_done
        seqs.append(seq)
        runner.submit(seq)

    started = time.perf_counter()
    for _ in range(clients):
        send(True)
    for _ in range(clients):
        finished.acquire()
    return sum(len(s.generated) for s in seqs), time.perf_counter() - started, first_tokens, later_first_tokens


def ceilings(
    model_dir: Path, prompts: list[str], threads: int, max_new_tokens: int, batch: int, between: list[int]
) -> list[dict]:
    """The model's own generate at batch 1, at each of ``between`` and at ``batch``, our engine alone and
    transformers' CB manager alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from deployments.engine import ModelRunner, SamplingParams, Sequence

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in prompts
    ]
    end_ids = list(model.generation_config.eos_token_id or [])
    pad = tokenizer.pad_token_id
    rows = [encoded[i % len(encoded)] for i in range(batch)]
    results = []

    def record(
        name: str,
        rows_done: int,
        tokens: int,
        wall: float,
        first_tokens: list[float] | None = None,
        later_first_tokens: list[float] | None = None,
    ) -> None:
        results.append(
            {"server": name, "clients": rows_done, "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}
        )
        if first_tokens:
            results[-1]["ttft_p50_ms"] = round(percentile(first_tokens, 50) * 1000, 1)
            results[-1]["ttft_p99_ms"] = round(percentile(first_tokens, 99) * 1000, 1)
        if later_first_tokens:
            results[-1]["ttft_p99_later_ms"] = round(percentile(later_first_tokens, 99) * 1000, 1)
        print(json.dumps(results[-1]), flush=True)

    def prefill_s(ids_batch: list[list[int]]) -> float:
        """The median of 7 timed forwards over these prompts at once (left-padded), after one untimed."""
        width = max(len(i) for i in ids_batch)
        ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids_batch])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids_batch])
        times = []
        with torch.inference_mode():
            for _ in range(8):
                started = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    def generate(ids_batch: list[list[int]]) -> int:
        width = max(len(i) for i in ids_batch)
        ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids_batch])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids_batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_ids,
                pad_token_id=pad,
            )
        new = out[:, width:].tolist()
        return sum(next((k for k, t in enumerate(r) if t in end_ids), len(r)) for r in new)

    generate(rows[:2])  # warm-up
    started, tokens = time.perf_counter(), 0
    for ids in encoded * 2:
        tokens += generate([ids])
    record("model.generate, batch 1", 1, tokens, time.perf_counter() - started)
    for size in sorted({size for size in between if 1 < size < batch} | {batch}):  # each served level's ceiling
        started, tokens = time.perf_counter(), 0
        for _ in range(3):
            tokens += generate(rows[:size])
        record(f"model.generate, batch {size}", size, tokens, time.perf_counter() - started)

    # The burst floor of time to first token: when a level (or round) starts, all its clients send at once, and the
    # last of those first tokens cannot come before one forward over all their prompts (or several smaller ones).
    for size in (1, batch):
        results.append({"server": f"model prefill, {size} prompts at once", "clients": size})
        results[-1]["prefill_ms"] = round(prefill_s(rows[:size]) * 1000, 2)
        print(json.dumps(results[-1]), flush=True)

    runner = ModelRunner(model_dir, max_batch_size=batch, batch_wait_ms=3, torch_threads=threads, device="cpu")
    try:
        for rounds in (1, 3):  # the first round warms up
            done = threading.Semaphore(0)
            seqs = [Sequence(r, SamplingParams(max_new_tokens=max_new_tokens)) for r in rows * rounds]
            started = time.perf_counter()
            for seq in seqs:
                seq.on_done = lambda s, d=done: d.release()
                runner.submit(seq)
            for _ in seqs:
                done.acquire()
        record(
            f"our engine alone, {batch} rows",
            batch,
            sum(len(s.generated) for s in seqs),
            time.perf_counter() - started,
        )
        for clients in (1, batch):
            tokens, wall, first_tokens, later = closed_loop(runner, encoded, clients, 8 * clients, max_new_tokens)
            record(f"our engine alone, {clients} closed-loop clients", clients, tokens, wall, first_tokens, later)
    finally:
        runner.close()

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids, pad_token_id=pad)
    try:
        # one manager for the warm-up and the timed round, as a server keeps one (its paged cache is allocated once)
        model.generate_batch(inputs=rows, generation_config=config, progress_bar=False, persistent_manager=True)
        started = time.perf_counter()
        outputs = model.generate_batch(
            inputs=rows * 3, generation_config=config, progress_bar=False, persistent_manager=True
        )
        wall = time.perf_counter() - started
        model.destroy_cached_continuous_batching_manager()
        tokens = sum(len([t for t in o.generated_tokens if t not in end_ids]) for o in outputs.values())
        record(f"transformers generate_batch (CB), {batch} rows", batch, tokens, wall)
    except Exception as exc:  # the library's CB on this model/device: say why it has no number
        print(f"generate_batch failed: {type(exc).__name__}: {exc}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=8, help="requests per client")
    parser.add_argument("--min-requests", type=int, default=32, help="at least this many requests a level")
    parser.add_argument(
        "--rounds", type=int, default=1, help="split each level into this many rounds, the servers taking turns"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server (OMP_NUM_THREADS)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the random-weight model to build")
    parser.add_argument("--model-dir", type=Path, help="serve this Hugging Face folder instead of building one")
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["mlflow", "ours", "transformers-serve"],
        default=["mlflow", "ours", "transformers-serve"],
    )
    parser.add_argument(
        "--hf-cache-tokens",
        type=int,
        default=16384,
        help="transformers serve's paged KV cache in tokens (0: the library's default, most of free RAM)",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=None, help="the endpoint's batch_wait_ms (default: the config's)"
    )
    parser.add_argument(
        "--fuse-joins",
        choices=["auto", "always", "never"],
        default=None,
        help="the endpoint's fuse_joins (default: the config's)",
    )
    parser.add_argument(
        "--engine-process",
        choices=["on", "off"],
        default=None,
        help="the endpoint's engine_process: the decoding loop in a child process or a thread (default: the config's)",
    )
    parser.add_argument("--skip-ceilings", action="store_true", help="no in-process generate/engine numbers")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, store, logs)")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    print(f"work folder: {work}", flush=True)
    from transformers import AutoConfig, AutoTokenizer

    from deployments.client import EndpointAdminClient
    from deployments.device import Placement
    from deployments.engines import EngineLaunch, engine_command
    from deployments.keys import read_keys
    from deployments.protocol import INSTANCE_TOKEN_HEADER
    from deployments.service import start_server, stop_server
    from tasks import registry
    from tasks.config import Settings
    from tasks.process_groups import stop_process_group
    from tasks.state import read_json

    model_dir = args.model_dir or build_model(args.size, work / "job" / "model")
    model_config = AutoConfig.from_pretrained(model_dir)
    tracking_uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    (work / "mlflow").mkdir()
    version = registry.register_job_model(
        tracking_uri=tracking_uri, model_name="bench-tiny", job_id="bench", model_dir=model_dir
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = {
        p: tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    }
    threads_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    max_clients = max(args.concurrency)
    logs: list[Any] = []
    processes: dict[str, subprocess.Popen] = {}

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log_file = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed after the server stops
        logs.append(log_file)
        process = subprocess.Popen(
            argv,
            env={**os.environ, **env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes[name] = process
        return process

    mlflow_port, hf_port = free_port(), free_port()
    if "mlflow" in args.servers:  # MLflow's scoring server, as the sample serves a registered model
        mlflow_argv = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m"]
        mlflow_argv += [f"models:/{version.name}/{version.version}", "--env-manager", "local"]
        mlflow_argv += ["-h", "127.0.0.1", "-p", str(mlflow_port)]
        mlflow_process = spawn("mlflow-serve", mlflow_argv, {**threads_env, "MLFLOW_TRACKING_URI": tracking_uri})
    if "transformers-serve" in args.servers:  # the same command line a transformers-serve deployment gets
        launch = EngineLaunch(
            "transformers-serve",
            "bench",
            Path(model_dir),
            hf_port,
            torch_threads=args.threads,
            cache_tokens=args.hf_cache_tokens or None,
        )
        command = engine_command(launch, Placement("cpu", "float32"))
        hf_process = spawn("transformers-serve", command.argv, command.env)
    settings = Settings.model_validate(
        {
            "state_dir": str(work / "state"),
            "data": {"path": str(REPO_ROOT / "data" / "sample" / "chat_sample.jsonl")},
            "endpoint": {
                "port": free_port(),
                # The benchmark's clients all go to one deployment: admit them all (the sample's 3 is the default).
                "max_concurrent_requests": max_clients,
                "max_batch_size": max_clients,
                "torch_threads": args.threads,
                **({} if args.batch_wait_ms is None else {"batch_wait_ms": args.batch_wait_ms}),
                **({} if args.fuse_joins is None else {"fuse_joins": args.fuse_joins}),
                **({} if args.engine_process is None else {"engine_process": args.engine_process == "on"}),
                "device": "cpu",
                "max_new_tokens_cap": max(512, args.max_new_tokens),
                "model_roots": [str(work)],  # the benchmark's registry is beside the state folder, not in it
            },
        }
    )
    targets: list[Target] = []
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    greedy = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "return_full_text": False}

    def chat_body(prompt: str) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_new_tokens,
            "temperature": 0,
            "stream": True,
        }

    try:
        started = time.monotonic()
        if "mlflow" in args.servers:
            wait_http(f"http://127.0.0.1:{mlflow_port}/ping", 300, mlflow_process)
            targets.append(
                Target(
                    "mlflow models serve",
                    f"http://127.0.0.1:{mlflow_port}/invocations",
                    mlflow_process.pid,
                    {"Content-Type": "application/json"},
                    lambda p: {"inputs": [rendered[p]], "params": greedy},
                    lambda body: body["predictions"][0],
                )
            )
        if "transformers-serve" in args.servers:
            wait_http(f"http://127.0.0.1:{hf_port}/health", 300, hf_process)
            targets.append(
                Target(
                    "transformers serve --continuous-batching (stream)",
                    f"http://127.0.0.1:{hf_port}/v1/chat/completions",
                    hf_process.pid,
                    {},
                    chat_body,
                    None,
                    stream=True,
                )
            )
        others_ready_s = time.monotonic() - started
        started = time.monotonic()
        pid = start_server(settings)
        keys = read_keys(work / "state" / "endpoint")
        base = f"http://127.0.0.1:{settings.endpoint.port}"
        admin = EndpointAdminClient(base, keys["admin"])
        admin.create_deployment(
            "bench", str(registry.model_folder(version, tracking_uri=tracking_uri)), version.version
        )
        admin.wait_ready("bench", 300)
        admin.set_traffic({"bench": 100})
        ours_ready_s = time.monotonic() - started
        print(f"ready: others {others_ready_s:.1f} s, ours {ours_ready_s:.1f} s", flush=True)
        auth = {"Authorization": f"Bearer {keys['primary']}"}
        if "ours" in args.servers or "mlflow" in args.servers:  # the sample's contract (beside MLflow's)
            targets.append(
                Target(
                    "finetune-phi endpoint",
                    f"{base}/score",
                    pid,
                    auth,
                    lambda p: {"input_data": [p], "params": greedy},
                    lambda body: body[0],
                    router=True,
                )
            )
        if "ours" in args.servers:
            targets.append(
                Target(
                    OURS_STREAM, f"{base}/v1/chat/completions", pid, auth, chat_body, None, stream=True, router=True
                )
            )
            instance = read_json(work / "state" / "endpoint" / "instances.json", default={})["bench"][0]
            targets.append(
                Target(
                    DIRECT,
                    f"http://127.0.0.1:{instance['port']}/score",
                    instance["pid"],
                    {INSTANCE_TOKEN_HEADER: instance["token"]},
                    lambda p: {"input_data": [p], "params": greedy},
                    lambda body: body[0],
                )
            )
            targets.append(
                Target(
                    DIRECT_STREAM,
                    f"http://127.0.0.1:{instance['port']}/v1/chat/completions",
                    instance["pid"],
                    {INSTANCE_TOKEN_HEADER: instance["token"]},
                    chat_body,
                    None,
                    stream=True,
                )
            )
        for target in targets:  # warm-up: first requests pay for lazy initialisation
            run_level(target, PROMPTS, 2, 4, tokenizer, args.max_new_tokens)
        for clients in args.concurrency:
            total = max(args.min_requests, clients * args.requests_per_client)
            per_round = max(clients, -(-total // args.rounds))
            runs: dict[str, list[LevelRun]] = {t.name: [] for t in targets}
            # Rounds interleave the targets (A B C A B C ...), so a drift in the machine's speed over the run
            # (a shared VM's neighbours) falls on every target alike instead of on whichever ran last.
            for _ in range(args.rounds):
                for target in targets:
                    runs[target.name].append(
                        run_level(target, PROMPTS, clients, per_round, tokenizer, args.max_new_tokens)
                    )
            for target in targets:
                result = summarise(target.name, clients, runs[target.name])
                results.append(result)
                print(json.dumps(result), flush=True)
        state = admin.get_state()
        memory = {
            "router_rss_mb": state["router"]["own_rss_mb"],
            "deployment_rss_mb": {
                f"{name}/{i['index']}": i["rss_mb"] for name, d in state["deployments"].items() for i in d["instances"]
            },
            "router_imports_torch": state["router"]["torch_imported"],
        }
        print(json.dumps(memory), flush=True)
    finally:
        stop_server(settings, grace_s=10)
        for process in processes.values():
            stop_process_group(process, grace_s=20)
        for handle in logs:
            handle.close()
        for name, process in processes.items():
            if process.returncode not in (None, 0, -signal.SIGTERM):
                print((work / f"{name}.log").read_text(errors="replace")[-3000:], file=sys.stderr)

    inprocess = (
        []
        if args.skip_ceilings
        else ceilings(Path(model_dir), PROMPTS, args.threads, args.max_new_tokens, max_clients, args.concurrency)
    )
    machine = {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(),
        "threads_per_server": args.threads,
    }
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    if names:
        machine["cpu"] = names[0]
    parameters = sum(
        v
        for v in [
            getattr(model_config, "vocab_size", 0) * model_config.hidden_size,
            model_config.num_hidden_layers
            * (4 * model_config.hidden_size**2 + 3 * model_config.hidden_size * model_config.intermediate_size),
        ]
    )
    table = render_table(results, inprocess, max_clients, memory)
    print()
    print(f"model: {args.model_dir or args.size}, ~{parameters / 1e6:.1f} M parameters")
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"serve_throughput-{time.strftime('%Y%m%dT%H%M%S')}.json"
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(args.model_dir or args.size),
        "parameters_approx": parameters,
        "max_new_tokens": args.max_new_tokens,
        "machine": machine,
        "results": results,
        "in_process": inprocess,
        "memory": memory,
        "table": table,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


OURS, OURS_STREAM = "finetune-phi endpoint", "finetune-phi endpoint (stream)"
DIRECT, DIRECT_STREAM = "deployment process (direct)", "deployment process (direct, stream)"
MLFLOW, HF_CB = "mlflow models serve", "transformers serve --continuous-batching (stream)"


def render_table(
    results: list[dict[str, Any]], inprocess: list[dict[str, Any]], batch: int, memory: dict[str, Any]
) -> str:
    lines = [
        "| clients | server | req/s | generated tok/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | peak RSS MB "
        "| tokens/reply | errors | server CPU ms/request | client CPU ms/request |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']} | {r['server']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['ttft_p50_ms'] or '-'} | {r['ttft_p99_ms'] or '-'} | {r['peak_rss_mb']} | "
            f"{r['mean_tokens_per_reply']} | {r['errors']} | {r['cpu_ms_per_request']} | "
            f"{r['client_cpu_ms_per_request']} |"
        )
    prefills = {r["clients"]: r["prefill_ms"] for r in inprocess if "prefill_ms" in r}
    generating = [r for r in inprocess if "tokens_per_s" in r]
    if generating:
        lines += [
            "",
            "| in-process, same threads | rows | generated tok/s | TTFT p50 ms | TTFT p99 ms | TTFT p99 later ms |",
        ]
        lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {r['server']} | {r['clients']} | {r['tokens_per_s']} | {r.get('ttft_p50_ms', '-')} | "
            f"{r.get('ttft_p99_ms', '-')} | {r.get('ttft_p99_later_ms', '-')} |"
            for r in generating
        ]
    if prefills:
        lines.append("")
        lines += [f"model prefill of {n} prompt(s) at once: {ms} ms" for n, ms in sorted(prefills.items())]
    by = {(r["clients"], r["server"]): r for r in results}
    ceiling = {r["clients"]: r["tokens_per_s"] for r in inprocess if r["server"].startswith("model.generate")}
    lines.append("")
    for clients in sorted({r["clients"] for r in results}):
        ours, theirs = by.get((clients, OURS)), by.get((clients, MLFLOW))
        if ours and theirs and theirs["tokens_per_s"]:
            lines.append(
                f"{clients} client(s): tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
                f"p50 {ours['p50_ms'] / theirs['p50_ms']:.2f}x, "
                f"p99 {ours['p99_ms'] / theirs['p99_ms']:.2f}x of MLflow's"
            )
        direct = by.get((clients, DIRECT))
        if ours and direct and direct["tokens_per_s"]:
            lines.append(
                f"{clients} client(s), through the router vs the deployment process direct: tokens/s "
                f"{(ours['tokens_per_s'] / direct['tokens_per_s'] - 1) * 100:+.1f}%, "
                f"p50 {ours['p50_ms'] - direct['p50_ms']:+.1f} ms"
            )
            if ours["outside_p50_ms"] is not None and direct["outside_p50_ms"] is not None:
                lines.append(
                    f"{clients} client(s), the hop net of the deployment's own time (Server-Timing): p50 of latency "
                    f"minus it {ours['outside_p50_ms']:.2f} vs {direct['outside_p50_ms']:.2f} ms direct, "
                    f"{ours['outside_p50_ms'] - direct['outside_p50_ms']:+.2f} ms; the deployment's own p50 "
                    f"{ours['deployment_p50_ms']:.1f} routed vs {direct['deployment_p50_ms']:.1f} ms direct"
                )
        stream, hf = by.get((clients, OURS_STREAM)), by.get((clients, HF_CB))
        best = max((r for r in (ours, stream) if r), key=lambda r: r["tokens_per_s"], default=None)
        parts = []
        if best and hf and hf["tokens_per_s"]:
            parts.append(f"x{best['tokens_per_s'] / hf['tokens_per_s']:.2f} transformers-serve-CB tok/s")
        if stream and hf and hf["p50_ms"]:
            parts.append(f"p50 {stream['p50_ms'] / hf['p50_ms']:.2f}x of its")
        if best and clients in ceiling:
            parts.append(f"{100 * best['tokens_per_s'] / ceiling[clients]:.0f}% of generate batch {clients}")
        if parts:
            lines.append(f"{clients} client(s), ours ({best['server'] if best else '-'}): " + ", ".join(parts))
    one, many = by.get((1, OURS_STREAM)), by.get((batch, OURS_STREAM))
    if one and many and one["ttft_p99_ms"]:
        line = f"TTFT p99 at {batch} clients: {many['ttft_p99_ms'] / one['ttft_p99_ms']:.2f}x its 1-client value"
        if many["ttft_p99_later_ms"]:
            line += (
                f"; {many['ttft_p99_later_ms'] / one['ttft_p99_ms']:.2f}x over the requests after each client's first"
            )
        lines.append(line)
    alone = {r["clients"]: r for r in inprocess if "closed-loop" in r["server"]}
    if 1 in alone and batch in alone and alone[1].get("ttft_p99_ms"):
        line = f"TTFT p99 of the engine alone (closed loop, no HTTP), {batch} clients: "
        line += f"{alone[batch]['ttft_p99_ms'] / alone[1]['ttft_p99_ms']:.2f}x 1 client's"
        if alone[batch].get("ttft_p99_later_ms"):
            line += f"; {alone[batch]['ttft_p99_later_ms'] / alone[1]['ttft_p99_ms']:.2f}x after each client's first"
        lines.append(line)
    if 1 in prefills and batch in prefills and prefills[1]:
        lines.append(
            f"burst floor: one forward over {batch} prompts takes {prefills[batch] / prefills[1]:.2f}x one prompt's "
            f"({prefills[batch]} vs {prefills[1]} ms); the last of {batch} requests sent at once gets its first token "
            "no sooner"
        )
    if memory:
        deployments = ", ".join(f"{k} {v} MB" for k, v in memory["deployment_rss_mb"].items())
        lines.append(
            f"\nRSS after the run: router {memory['router_rss_mb']} MB (torch imported: "
            f"{memory['router_imports_torch']}); deployment processes: {deployments}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
