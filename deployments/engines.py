"""What process serves a deployment: the builtin engine, ``transformers serve``, or ``vllm serve``.

``engine`` is a deployment's choice (``EndpointConfig.engine`` is the default):

- ``builtin``: :mod:`deployments.model_server`, this project's process around :class:`deployments.engine.ModelRunner`
  (continuous batching on a slot KV cache), speaking the endpoint's own ``/score`` and chat completions.
- ``transformers-serve``: ``transformers serve MODEL --continuous-batching`` (transformers' paged-attention
  continuous batching), OpenAI chat completions; CPU or GPU. Needs ``transformers[serving]`` (fastapi, uvicorn,
  pydantic, openai).
- ``vllm``: ``vllm serve MODEL`` with its OpenAI API; an NVIDIA GPU and the ``vllm`` package.

:func:`engine_command` turns a deployment into the argv and environment of its process, so every caller starts
an engine the same way; :func:`engine_problem` says, in one sentence naming what to install or change, why an
engine cannot start here (checked when a deployment is created, before any process starts). The external engines
speak OpenAI chat completions only: the router translates ``/score`` (the sample's body) into one chat completion
per input and maps generation settings the same way for every engine (:func:`chat_request_for`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.device import Placement, PlacementError, cuda_facts_without_torch, resolve_placement

ENGINES = ("builtin", "transformers-serve", "vllm")
MODEL_SERVER_MODULE = "deployments.model_server"
TRANSFORMERS_SERVE_NEEDS = ("fastapi", "uvicorn", "pydantic", "openai")  # transformers' is_serve_available()
END_OF_TURN = "<|end|>"
TRANSFORMERS_CB_PAGE_TOKENS = 256  # ContinuousBatchingConfig.page_size's default: tokens per cache block


class EngineUnavailableError(RuntimeError):
    """The engine a deployment asks for cannot start on this machine."""


@dataclass(frozen=True)
class EngineLaunch:
    """One deployment process to start: which engine, which model, where it listens and on what device."""

    engine: str
    name: str  # the deployment's name; the external engines serve the model under it
    model_dir: Path  # the Hugging Face folder (deployments.engine.find_hf_folders of the registered model)
    port: int
    host: str = "127.0.0.1"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 16
    torch_threads: int = 1
    # transformers serve: KV cache size in tokens (None: the library sizes its paged cache from free memory, which
    # on a CPU is most of the machine's RAM)
    cache_tokens: int | None = None
    builtin_args: list[str] = field(default_factory=list)  # the model server's own flags (config file, limits)


@dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]  # added to the parent's environment
    ready_path: str  # GET this until 200 before routing to the process


def _venv_script(name: str) -> str | None:
    """A console script of this interpreter's environment (the venv's bin folder), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def engine_problem(
    engine: str,
    placement: Placement,
    *,
    has_module: Callable[[str], bool] = _has_module,
    script: Callable[[str], str | None] = _venv_script,
) -> str | None:
    """Why ``engine`` cannot start here on ``placement``, as one sentence naming the fix; None when it can."""
    if engine not in ENGINES:
        return f"engine {engine!r} is not one of {', '.join(ENGINES)}; pick one of those"
    if engine == "transformers-serve":
        missing = [m for m in TRANSFORMERS_SERVE_NEEDS if not has_module(m)]
        if missing or script("transformers") is None:
            return (
                "engine 'transformers-serve' needs transformers' serving extras "
                f"(missing: {', '.join(missing) or 'the transformers command'}); "
                "install them with: pip install 'transformers[serving]'"
            )
    if engine == "vllm":
        if not has_module("vllm") or script("vllm") is None:
            return "engine 'vllm' needs the vllm package and an NVIDIA GPU; install it with: pip install vllm"
        if not placement.is_cuda:
            return (
                f"engine 'vllm' serves on a CUDA GPU only, and this deployment runs on {placement.device}; "
                "use engine 'builtin' or 'transformers-serve' here, or deploy on a GPU machine"
            )
    return None


def check_engine(
    engine: str, device: str = "auto", dtype: str = "auto", *, cuda_facts: tuple[int, bool] | None = None
) -> Placement:
    """The placement for a deployment of ``engine``; raises :class:`EngineUnavailableError` (or
    :class:`~deployments.device.PlacementError`) with the one-sentence fix when it cannot start here.
    ``cuda_facts``: see :func:`~deployments.device.resolve_placement` (the router passes
    :func:`~deployments.device.cuda_facts_without_torch`)."""
    placement = resolve_placement(device, dtype, cuda_facts=cuda_facts)
    problem = engine_problem(engine, placement)
    if problem is not None:
        raise EngineUnavailableError(problem)
    return placement


def engine_command(launch: EngineLaunch, placement: Placement | None = None) -> EngineCommand:
    """The argv and environment that start ``launch``'s engine. ``placement`` defaults to resolving the launch's
    choice without torch (:func:`~deployments.device.cuda_facts_without_torch`: the caller is the router); the
    builtin model server resolves its own."""
    threads = str(launch.torch_threads) if launch.torch_threads > 0 else ""
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} if threads else {}
    env["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "1")  # a model folder, never a download
    if launch.engine == "builtin":  # the model server gets --device/--dtype in builtin_args and resolves them
        argv = [
            sys.executable,
            "-m",
            MODEL_SERVER_MODULE,
            "--name",
            launch.name,
            "--model-path",
            str(launch.model_dir),
        ]
        argv += ["--port", str(launch.port), *launch.builtin_args]
        return EngineCommand(argv, env, "/ready")
    placement = placement or resolve_placement(launch.device, launch.dtype, cuda_facts=cuda_facts_without_torch())
    if launch.engine == "transformers-serve":
        argv = [
            _venv_script("transformers") or "transformers",
            "serve",
            str(launch.model_dir),  # forced model: loaded at start, served whatever "model" a request names
            "--continuous-batching",
            "--device", placement.device,
            "--dtype", placement.dtype,
            "--host", launch.host,
            "--port", str(launch.port),
            "--log-level", "warning",
        ]  # fmt: skip
        if launch.cache_tokens:
            argv += ["--cb-num-blocks", str(-(-launch.cache_tokens // TRANSFORMERS_CB_PAGE_TOKENS))]
        return EngineCommand(argv, env, "/health")
    if launch.engine == "vllm":
        if placement.is_cuda:  # vllm takes its GPU from CUDA_VISIBLE_DEVICES, not from a device flag
            env["CUDA_VISIBLE_DEVICES"] = placement.device.split(":", 1)[1]
        argv = [
            _venv_script("vllm") or "vllm",
            "serve",
            str(launch.model_dir),
            "--served-model-name", launch.name,
            "--dtype", placement.dtype,
            "--host", launch.host,
            "--port", str(launch.port),
            "--max-num-seqs", str(launch.max_batch_size),
        ]  # fmt: skip
        return EngineCommand(argv, env, "/health")
    raise EngineUnavailableError(f"engine {launch.engine!r} is not one of {', '.join(ENGINES)}; pick one of those")


def chat_request_for(
    messages: list[dict[str, str]],
    *,
    model: str | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float | None,
    top_p: float | None,
    stream: bool = False,
) -> dict[str, Any]:
    """An OpenAI chat completion body that asks an external engine for what the builtin engine would do.

    Greedy when ``do_sample`` is false (temperature 0: both transformers serve and vllm then take the argmax),
    the budget already capped by the router, and ``<|end|>`` as a stop so a model whose generation config lacks it
    still stops at the end of its turn. ``model``: the name the engine serves (vllm: the deployment's name); None
    leaves it out (transformers serve started on one folder serves it whatever the request names, and refuses any
    other name).
    """
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_new_tokens,
        "temperature": (temperature if temperature is not None else 1.0) if do_sample else 0.0,
        "top_p": top_p if (do_sample and top_p is not None) else 1.0,
        "stop": [END_OF_TURN],
        "stream": stream,
    }
    if model is not None:
        body["model"] = model
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


__all__ = [
    "ENGINES",
    "EngineCommand",
    "EngineLaunch",
    "EngineUnavailableError",
    "PlacementError",
    "chat_request_for",
    "check_engine",
    "engine_command",
    "engine_problem",
]
