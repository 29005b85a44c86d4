"""Device and dtype choices: one resolver for the engine and the evaluation step; impossible choices refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deployments.device import Placement, PlacementError, resolve_placement
from deployments.engine import ModelRunner, SamplingParams, Sequence
from tasks.config import ConfigError, load_config

NO_GPU = (0, False)


def test_auto_on_a_cpu_machine_is_the_cpu_in_float32() -> None:
    assert resolve_placement("auto", "auto", cuda_facts=NO_GPU) == Placement("cpu", "float32")
    assert resolve_placement("cpu", "bfloat16", cuda_facts=NO_GPU) == Placement("cpu", "bfloat16")


def test_auto_with_a_gpu_is_the_first_gpu_in_bfloat16_or_float16_without_it() -> None:
    assert resolve_placement("auto", "auto", cuda_facts=(2, True)) == Placement("cuda:0", "bfloat16")
    assert resolve_placement("cuda", "auto", cuda_facts=(1, False)) == Placement("cuda:0", "float16")
    assert resolve_placement("cuda:1", "float32", cuda_facts=(2, True)) == Placement("cuda:1", "float32")
    assert resolve_placement("cpu", "auto", cuda_facts=(2, True)) == Placement("cpu", "float32")


@pytest.mark.parametrize(
    ("device", "dtype", "facts", "message"),
    [
        ("cuda", "auto", NO_GPU, "device 'cuda:0' needs a CUDA GPU but torch sees none on this machine; use device"),
        ("cuda:3", "auto", (2, True), "device 'cuda:3' does not exist: torch sees 2 GPU(s) (cuda:0 to cuda:1)"),
        ("cpu", "float16", NO_GPU, "dtype 'float16' is not supported on the CPU; use float32 (or bfloat16) there"),
        ("auto", "float16", NO_GPU, "dtype 'float16' is not supported on the CPU"),
        ("tpu", "auto", NO_GPU, "device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        ("cpu", "int8", NO_GPU, "dtype 'int8' is not one of auto, float32, bfloat16, float16"),
    ],
)
def test_impossible_choices_are_refused_with_the_fix(device: str, dtype: str, facts: tuple, message: str) -> None:
    with pytest.raises(PlacementError) as caught:
        resolve_placement(device, dtype, cuda_facts=facts)
    assert str(caught.value).startswith(message)
    assert str(caught.value).count(".") <= 1 and "\n" not in str(caught.value)  # one sentence


def test_auto_asks_this_machine() -> None:
    import torch

    placement = resolve_placement()
    assert placement.is_cuda == torch.cuda.is_available()
    if not placement.is_cuda:
        assert placement.dtype == "float32"


def test_config_fields_take_the_choices_and_refuse_others(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "data: {path: x.jsonl}\n"
        "endpoint: {device: 'cuda:1', dtype: bfloat16, engine: transformers-serve}\n"
        "evaluation: {device: cpu, dtype: float32}\n"
    )
    settings = load_config(config)
    assert (settings.endpoint.device, settings.endpoint.dtype, settings.endpoint.engine) == (
        "cuda:1",
        "bfloat16",
        "transformers-serve",
    )
    assert (settings.evaluation.device, settings.evaluation.dtype) == ("cpu", "float32")
    config.write_text("data: {path: x.jsonl}\nendpoint: {device: gpu}\n")
    with pytest.raises(ConfigError, match=r"endpoint\.device"):
        load_config(config)


def test_runner_with_an_impossible_choice_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match="not supported on the CPU"):
        ModelRunner(tmp_path / "not-even-read", max_batch_size=1, batch_wait_ms=0, device="cpu", dtype="float16")
    with pytest.raises(PlacementError, match=r"does not exist|needs a CUDA GPU"):
        ModelRunner(tmp_path / "not-even-read", max_batch_size=1, batch_wait_ms=0, device="cuda:99")


@pytest.mark.gpu
def test_runner_on_the_gpu_in_bfloat16_matches_generate(tiny_model_dir: Path) -> None:
    import torch

    runner = ModelRunner(tiny_model_dir, max_batch_size=4, batch_wait_ms=0, device="auto", dtype="auto")
    try:
        assert runner.model.device.type == "cuda" and runner.model.dtype == torch.bfloat16
        ids = runner.encode_chat([{"role": "user", "content": "Hello! Who are you?"}])
        seqs = [Sequence(ids, SamplingParams(max_new_tokens=12)) for _ in range(3)]
        done = []
        for seq in seqs:
            seq.on_done = done.append
            runner.submit(seq)
        deadline = time.monotonic() + 60
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(done) == 3 and all(s.finish_reason in ("stop", "length") and s.generated for s in seqs)
        tensor = torch.tensor([ids], device=runner.model.device)
        out = runner.model.generate(tensor, max_new_tokens=12, do_sample=False, eos_token_id=sorted(runner.end_ids))
        assert seqs[0].generated == out[0, len(ids) :].tolist()[: len(seqs[0].generated)]
    finally:
        runner.close()


@pytest.mark.gpu
def test_evaluation_runs_on_the_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tasks.evaluate import evaluate_model

    rows = (Path(__file__).resolve().parents[2] / "data" / "sample" / "chat_sample.jsonl").read_text().splitlines()
    split = tmp_path / "test.jsonl"
    split.write_text("\n".join(rows[:4]) + "\n")
    result = evaluate_model(tiny_model_dir, split, "m", label="gpu", num_prompts=1, max_new_tokens=4, device="cuda")
    assert result.loss > 0 and result.generations


def test_gpu_facts_without_torch_follow_the_driver_and_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.device import cuda_facts_without_torch

    for index in range(2):
        (tmp_path / f"0000:0{index}:00.0").mkdir()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cuda_facts_without_torch(tmp_path) == (2, True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cuda_facts_without_torch(tmp_path) == (1, True)
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert cuda_facts_without_torch(tmp_path) == (0, False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cuda_facts_without_torch(tmp_path / "no-driver") == (0, False)


def test_the_routers_checks_import_no_torch() -> None:
    """The endpoint's router refuses impossible deployments without loading torch (it holds no model)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from deployments.device import cuda_facts_without_torch\n"
        "from deployments.engines import check_engine\n"
        "from pathlib import Path\n"
        "from deployments.engines import EngineLaunch, engine_command\n"
        "check_engine('transformers-serve', 'auto', 'auto', cuda_facts=cuda_facts_without_torch())\n"
        "for engine in ('builtin', 'transformers-serve', 'vllm'):\n"
        "    engine_command(EngineLaunch(engine, 'blue', Path('/m'), 1, device='cpu'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
