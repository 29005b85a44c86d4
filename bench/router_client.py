"""CPU per request of the router's upstream client: httpx's ``AsyncClient`` against aiohttp's ``ClientSession``.

    .venv/bin/python bench/router_client.py                 # 16 connections, 4,000 requests each client
    .venv/bin/python bench/router_client.py --connections 1 --requests 2000

Both post the same ``/score``-sized body with the router's headers to a trivial keep-alive HTTP/1.1 server in
another process (a fixed JSON answer, so the server's cost stays out of the number) and are measured by this
process's own CPU time (user + system) over the requests, after a warm-up round each. This is the client's share of
the router's work on every forwarded request, which on a small machine comes out of the model's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from serve_throughput import free_port  # this folder is on sys.path when a script here runs

SERVER = r"""
import asyncio, sys
BODY = b'["' + b"x" * 150 + b'"]'
ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + str(len(BODY)).encode()
          + b"\r\nx-ms-generated-tokens: 32\r\n\r\n" + BODY)
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

BODY = json.dumps({"input_data": ["What is a Prefect flow?"], "params": {"max_new_tokens": 32}}).encode()
HEADERS = {"x-instance-token": "t" * 32, "x-ms-time-left": "60000", "content-type": "application/json"}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def cpu_ms_per_request(call: Callable[[], Awaitable[None]], requests: int, connections: int) -> float:
    numbers = iter(range(requests))

    async def worker() -> None:
        for _ in numbers:
            await call()

    started = cpu_s()
    await asyncio.gather(*[worker() for _ in range(connections)])
    return (cpu_s() - started) * 1000 / requests


async def measure(url: str, requests: int, connections: int) -> dict[str, float]:
    import aiohttp
    import httpx

    results: dict[str, float] = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=60)
    async with httpx.AsyncClient(limits=limits, timeout=None, trust_env=False) as client:

        async def with_httpx() -> None:
            response = await client.post(url, content=BODY, headers=HEADERS, timeout=httpx.Timeout(30, connect=2.0))
            assert response.status_code == 200 and response.content

        await cpu_ms_per_request(with_httpx, connections * 10, connections)
        results["httpx"] = await cpu_ms_per_request(with_httpx, requests, connections)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
    async with session:

        async def with_aiohttp() -> None:
            timeout = aiohttp.ClientTimeout(total=30, connect=2.0)
            async with session.post(url, data=BODY, headers=HEADERS, timeout=timeout) as response:
                assert response.status == 200 and await response.read()

        await cpu_ms_per_request(with_aiohttp, connections * 10, connections)
        results["aiohttp"] = await cpu_ms_per_request(with_aiohttp, requests, connections)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4000, help="requests per client")
    args = parser.parse_args(argv)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        results = asyncio.run(measure(f"http://127.0.0.1:{port}/score", args.requests, args.connections))
    finally:
        server.terminate()
        server.wait(timeout=10)
    for name, value in results.items():
        print(f"{name}: {value:.3f} ms of CPU per request ({args.connections} connections, {args.requests} requests)")
    print(f"aiohttp / httpx: {results['aiohttp'] / results['httpx']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
