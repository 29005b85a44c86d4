"""Engine choice per deployment: the process command line of each engine, and the refusal when one cannot start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deployments.device import Placement
from deployments.engines import (
    EngineLaunch,
    EngineUnavailableError,
    chat_request_for,
    check_engine,
    engine_command,
    engine_problem,
)

CPU = Placement("cpu", "float32")
GPU1 = Placement("cuda:1", "bfloat16")


def launch(engine: str, **extra: object) -> EngineLaunch:
    return EngineLaunch(engine=engine, name="blue", model_dir=Path("/models/phi"), port=41000, **extra)


def test_transformers_serve_command_has_continuous_batching_device_and_dtype() -> None:
    command = engine_command(launch("transformers-serve", torch_threads=2), GPU1)
    argv = command.argv
    assert Path(argv[0]).name == "transformers" and argv[1:3] == ["serve", "/models/phi"]
    assert "--continuous-batching" in argv
    assert argv[argv.index("--device") + 1] == "cuda:1" and argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "41000"
    assert command.env["OMP_NUM_THREADS"] == "2" and command.ready_path == "/health"


def test_vllm_command_serves_the_openai_api_on_its_gpu() -> None:
    command = engine_command(launch("vllm", max_batch_size=8), GPU1)
    argv = command.argv
    assert Path(argv[0]).name == "vllm" and argv[1:3] == ["serve", "/models/phi"]
    assert argv[argv.index("--served-model-name") + 1] == "blue"
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--max-num-seqs") + 1] == "8"
    assert command.env["CUDA_VISIBLE_DEVICES"] == "1"


def test_builtin_command_is_the_model_server_module() -> None:
    command = engine_command(launch("builtin", builtin_args=["--endpoint-config", "c.json"]), CPU)
    assert command.argv[:3] == [sys.executable, "-m", "deployments.model_server"]
    assert command.argv[-2:] == ["--endpoint-config", "c.json"] and command.ready_path == "/ready"


def test_a_missing_package_is_refused_naming_what_to_install() -> None:
    def without(*names: str):
        return lambda module: module not in names

    problem = engine_problem("transformers-serve", CPU, has_module=without("fastapi"), script=lambda n: "/bin/" + n)
    assert problem == (
        "engine 'transformers-serve' needs transformers' serving extras (missing: fastapi); "
        "install them with: pip install 'transformers[serving]'"
    )
    problem = engine_problem("vllm", GPU1, has_module=without("vllm"), script=lambda n: None)
    assert problem == "engine 'vllm' needs the vllm package and an NVIDIA GPU; install it with: pip install vllm"
    problem = engine_problem("vllm", CPU, has_module=lambda m: True, script=lambda n: "/bin/" + n)
    assert problem is not None and problem.startswith("engine 'vllm' serves on a CUDA GPU only")
    assert engine_problem("transformers-serve", CPU, has_module=lambda m: True, script=lambda n: "/x") is None
    assert (
        engine_problem("tgi", CPU) == "engine 'tgi' is not one of builtin, transformers-serve, vllm; pick one of those"
    )


def test_this_machine_can_start_transformers_serve_but_not_vllm() -> None:
    """The project's venv has transformers' serving extras (the benchmark runs it); vllm is GPU-only and absent."""
    assert check_engine("transformers-serve", "cpu") == CPU
    assert check_engine("builtin", "auto").device in ("cpu", "cuda:0")
    with pytest.raises(EngineUnavailableError, match=r"pip install vllm|CUDA GPU only"):
        check_engine("vllm", "cpu")


@pytest.mark.parametrize(
    ("do_sample", "temperature", "top_p", "expected"),
    [
        (False, 0.7, 0.9, (0.0, 1.0)),  # greedy whatever the temperature says, as the builtin engine does
        (True, 0.7, 0.9, (0.7, 0.9)),
        (True, None, None, (1.0, 1.0)),
    ],
)
def test_generation_settings_map_the_same_for_external_engines(
    do_sample: bool, temperature: float | None, top_p: float | None, expected: tuple[float, float]
) -> None:
    body = chat_request_for(
        [{"role": "user", "content": "hi"}],
        model="blue",
        max_new_tokens=64,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
    )
    assert (body["temperature"], body["top_p"]) == expected
    assert body["max_tokens"] == 64 and body["stop"] == ["<|end|>"] and body["stream"] is False


def test_a_chat_body_for_an_external_engine_gets_the_builtin_engines_settings() -> None:
    from deployments.external import engine_chat_body

    body = {"model": "blue", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "stop": "###"}
    out = engine_chat_body(body, model=None, default_max_new_tokens=128, max_new_tokens_cap=512)
    assert "model" not in out and out["max_tokens"] == 512 and out["temperature"] == 1.0  # OpenAI's default
    assert out["stop"] == ["###", "<|end|>"]
    out = engine_chat_body(
        {**body, "max_tokens": None, "temperature": 0, "stream": True, "stop": None},
        model="blue",
        default_max_new_tokens=128,
        max_new_tokens_cap=512,
    )
    assert out["model"] == "blue" and out["max_tokens"] == 128 and out["temperature"] == 0
    assert out["stop"] == ["<|end|>"] and out["stream_options"] == {"include_usage": True}
