"""Serving throughput: our endpoint against ``mlflow models serve`` on the same registered tiny model, and our
endpoint's router against its deployment's own process reached directly (the cost of the router's extra hop).

    .venv/bin/python bench/serve_throughput.py                       # 1, 4, 16 clients, 32 new tokens
    .venv/bin/python bench/serve_throughput.py --concurrency 1 4 16 --max-new-tokens 32 --requests-per-client 8

One run registers a tiny Phi-3 model (the ``tiny`` recipe's architecture, random weights so that every reply
runs to ``max_new_tokens``; ``--model-dir`` serves another folder) in an MLflow SQLite store, serves it with
``mlflow models serve -m models:/NAME/VERSION --env-manager local`` (the sample's serving path) and with our
endpoint (one deployment), and sends both the same fixed prompts, greedy, with the same ``max_new_tokens``,
from 1, 4 and 16 concurrent clients. Both see the same token sequence: MLflow gets the prompt already rendered
with the chat template (its text-generation pipeline does not apply one), our ``/score`` renders it itself.
Generated tokens are counted the same way for both: the reply text re-tokenised with the model's tokenizer.
Both servers run with the same torch thread count (``--threads``). Peak memory is the server process's peak
RSS (with its children: for our endpoint, the router and the deployment process), sampled every 50 ms.

"deployment process (direct)" sends the same ``/score`` bodies to the deployment's model-server process on its
loopback port, with the instance token the router uses (read from the state folder's ``instances.json``), so the
difference to "finetune-phi endpoint" is the router alone: keys, routing, admission, metrics and one more HTTP
hop. The router's own RSS and each deployment process's RSS are read from ``/admin/state`` after the run.
Prints a markdown table and writes JSON to ``bench/results/``.
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
from concurrent.futures import ThreadPoolExecutor
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


DIRECT = "deployment process (direct)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


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
        for proc in [self.process, *self.process.children(recursive=True)]:
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
    """One server under test: how to call it and how to read the reply."""

    def __init__(self, name: str, url: str, pid: int, headers: dict[str, str], make_body: Any, read: Any) -> None:
        self.name, self.url, self.pid, self.headers, self.make_body, self.read = (
            name,
            url,
            pid,
            headers,
            make_body,
            read,
        )


def run_level(target: Target, prompts: list[str], clients: int, total: int, tokenizer: Any) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    replies: list[str] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        nonlocal errors
        with httpx.Client(headers=target.headers, timeout=300) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                prompt = prompts[index % len(prompts)]
                started = time.perf_counter()
                response = http.post(target.url, json=target.make_body(prompt))
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code != 200:
                        errors += 1
                        continue
                    latencies.append(elapsed)
                    replies.append(target.read(response))

    with RssSampler(target.pid) as rss:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            for future in [pool.submit(client) for _ in range(clients)]:
                future.result()
        wall = time.perf_counter() - started
    # Counted after the clock stops, so the client's own tokenising does not slow the servers down.
    tokens = [len(tokenizer(reply, add_special_tokens=False)["input_ids"]) for reply in replies]
    return {
        "server": target.name,
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "generated_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_tokens_per_reply": round(statistics.mean(tokens), 1) if tokens else 0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "peak_rss_mb": round(rss.peak / 2**20, 1),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=8, help="requests per client (at least 32 a level)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server (OMP_NUM_THREADS)")
    parser.add_argument("--model-dir", type=Path, help="serve this Hugging Face folder instead of a fresh tiny model")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, store, logs)")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    print(f"work folder: {work}", flush=True)
    from transformers import AutoTokenizer

    from deployments.client import EndpointAdminClient
    from deployments.keys import read_keys
    from deployments.protocol import INSTANCE_TOKEN_HEADER
    from deployments.service import start_server, stop_server
    from tasks import registry
    from tasks.backends.local_jobs import stop_process_group
    from tasks.config import Settings
    from tasks.state import read_json

    # A tiny model, registered as the flow registers a job's model
    if args.model_dir is None:
        from training.tiny_model import build_tiny_model, chat_texts

        texts = list(chat_texts(REPO_ROOT / "data" / "sample" / "chat_sample.jsonl"))
        model_dir = build_tiny_model(work / "job" / "model", texts)
    else:
        model_dir = args.model_dir
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

    # MLflow's scoring server, as the sample serves a registered model
    mlflow_port = free_port()
    mlflow_log = open(work / "mlflow-serve.log", "wb")  # noqa: SIM115 - closed after the server stops
    mlflow_process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{version.name}/{version.version}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(mlflow_port),
        ],
        env={
            **os.environ,
            **threads_env,
            "MLFLOW_TRACKING_URI": tracking_uri,
            # mlflow runs `uvicorn` by name: the venv's bin folder must be on PATH
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        },
        stdout=mlflow_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
                "model_roots": [str(work)],  # the benchmark's registry is beside the state folder, not in it
            },
        }
    )
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    try:
        started = time.monotonic()
        wait_http(f"http://127.0.0.1:{mlflow_port}/ping", 300, mlflow_process)
        mlflow_ready_s = time.monotonic() - started
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
        print(f"ready: mlflow {mlflow_ready_s:.1f} s, ours {ours_ready_s:.1f} s", flush=True)

        params = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "return_full_text": False}
        mlflow_target = Target(
            "mlflow models serve",
            f"http://127.0.0.1:{mlflow_port}/invocations",
            mlflow_process.pid,
            {"Content-Type": "application/json"},
            lambda p: {"inputs": [rendered[p]], "params": params},
            lambda r: r.json()["predictions"][0],
        )
        ours_target = Target(
            "finetune-phi endpoint",
            f"{base}/score",
            pid,
            {"Authorization": f"Bearer {keys['primary']}"},
            lambda p: {"input_data": [p], "params": params},
            lambda r: r.json()[0],
        )
        instance = read_json(work / "state" / "endpoint" / "instances.json", default={})["bench"][0]
        direct_target = Target(
            DIRECT,
            f"http://127.0.0.1:{instance['port']}/score",
            instance["pid"],
            {INSTANCE_TOKEN_HEADER: instance["token"]},
            ours_target.make_body,
            ours_target.read,
        )
        targets = (mlflow_target, ours_target, direct_target)
        for target in targets:  # warm-up: first requests pay for lazy initialisation
            run_level(target, PROMPTS, 2, 4, tokenizer)
        for clients in args.concurrency:
            total = max(32, clients * args.requests_per_client)
            for target in targets:
                result = run_level(target, PROMPTS, clients, total, tokenizer)
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
        stop_process_group(mlflow_process, grace_s=20)
        mlflow_log.close()
        if mlflow_process.returncode not in (None, 0, -signal.SIGTERM):
            print((work / "mlflow-serve.log").read_text(errors="replace")[-3000:], file=sys.stderr)

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
    table = render_table(results, memory)
    print()
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"serve_throughput-{time.strftime('%Y%m%dT%H%M%S')}.json"
    payload = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "max_new_tokens": args.max_new_tokens,
        "machine": machine,
        "results": results,
        "memory": memory,
        "table": table,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def render_table(results: list[dict[str, Any]], memory: dict[str, Any]) -> str:
    lines = [
        "| clients | server | req/s | generated tok/s | p50 ms | p99 ms | peak RSS MB | tokens/reply | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']} | {r['server']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['peak_rss_mb']} | {r['mean_tokens_per_reply']} | {r['errors']} |"
        )
    by = {(r["clients"], r["server"]): r for r in results}
    for clients in sorted({r["clients"] for r in results}):
        ours, theirs = by.get((clients, "finetune-phi endpoint")), by.get((clients, "mlflow models serve"))
        if ours and theirs and theirs["tokens_per_s"]:
            lines.append(
                f"\n{clients} client(s): tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
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
    if memory:
        deployments = ", ".join(f"{k} {v} MB" for k, v in memory["deployment_rss_mb"].items())
        lines.append(
            f"\nRSS after the run: router {memory['router_rss_mb']} MB (torch imported: "
            f"{memory['router_imports_torch']}); deployment processes: {deployments}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
