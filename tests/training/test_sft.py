"""training/sft.py on the tiny model: outputs, chat formatting, MLflow, LoRA merge, resume after kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINING = REPO_ROOT / "training"
RECIPE = TRAINING / "recipes" / "tiny_full_cpu.yaml"
sys.path.insert(0, str(TRAINING))

import sft  # noqa: E402  (training/ is a code snapshot, not a package)


def _greedy(model_dir: Path, question: str, max_new_tokens: int = 60) -> tuple[list[int], object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist(), tokenizer


def _first_question(path: Path) -> str:
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def test_tiny_run_writes_model_metrics_and_curve(trained_tiny_model: Path, sample_split) -> None:
    metrics = json.loads((trained_tiny_model / "metrics.json").read_text())
    for key in (
        "train_loss", "eval_loss", "eval_perplexity", "tokens_per_second", "steps", "wall_time_s", "peak_memory_mb",
        "mlflow_run_id", "mlflow_model_uri", "manifest_sha256",
    ):  # fmt: skip
        assert metrics.get(key) is not None, key
    assert metrics["steps"] == 120
    assert metrics["manifest_sha256"] == sample_split.sha256
    assert metrics["final_loss"] < metrics["initial_loss"] - 2.0, "the loss should fall well below its start"
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert (trained_tiny_model / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in trained_tiny_model.glob("checkpoint-*")) == ["checkpoint-120", "checkpoint-60"]
    model_dir = trained_tiny_model / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()


PROGRESS_LINE = re.compile(r"^step (\d+)/120 \| loss \d+\.\d{4} \| [\d,]+ tok/s \| ETA \d+:\d\d:\d\d$", re.M)


def test_progress_lines_give_step_total_loss_tokens_per_second_and_eta(trained_tiny_model: Path) -> None:
    log = (trained_tiny_model.parent / "train.log").read_text()
    steps = [int(step) for step in PROGRESS_LINE.findall(log)]
    assert steps == [20, 40, 60, 80, 100], log[-2000:]  # the last step has no ETA left to give
    assert re.search(r"^step 120/120 \| loss \d+\.\d{4} \| [\d,]+ tok/s$", log, re.M)


def test_greedy_reply_to_a_training_prompt_stops_on_end_token(trained_tiny_model: Path, sample_split) -> None:
    new_tokens, tokenizer = _greedy(trained_tiny_model / "model", _first_question(sample_split.train_path))
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert new_tokens[-1] == end_id, tokenizer.decode(new_tokens)
    assert len(tokenizer.decode(new_tokens, skip_special_tokens=True).split()) >= 3, "a reply, not just the end"


def test_labels_keep_the_end_token_after_each_assistant_turn(tmp_path: Path, sample_split) -> None:
    args = sft.parse_args(
        [
            *("--config", str(RECIPE), "--train_file", str(sample_split.train_path)),
            *("--output_dir", str(tmp_path), "--max_steps", "1", "--tiny_num_layers", "1"),
        ]
    )
    for assistant_only in (False, True):
        args[1].assistant_only_loss = assistant_only
        trainer, tokenizer, _ = sft.build_trainer(*args)
        end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
        rows = [trainer.train_dataset[i] for i in range(8)]
        batch = trainer.data_collator(rows)
        assert tokenizer.pad_token_id != end_id
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            turns = ids.count(assistant_id)
            ends_in_labels = sum(1 for i, label in zip(ids, labels, strict=True) if i == end_id and label == end_id)
            assert turns >= 1 and ends_in_labels >= turns, (assistant_only, tokenizer.decode(ids))
            if assistant_only:  # the user's words are not learnt, the reply and its <|end|> are
                assert labels[ids.index(assistant_id)] == -100
                assert ends_in_labels == turns


def test_mlflow_run_and_model_logged_from_the_saved_folder(trained_tiny_model: Path, sample_split) -> None:
    import mlflow
    from mlflow import MlflowClient

    metrics = json.loads((trained_tiny_model / "metrics.json").read_text())
    uri = f"sqlite:///{trained_tiny_model.parents[2] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # Artifacts beside the SQLite store, not in ./mlruns of the job's working folder (training/).
    assert run.info.artifact_uri.startswith((trained_tiny_model.parents[2] / "artifacts").as_uri() + "/")
    assert run.data.params["learning_rate"] == "0.002"
    assert run.data.params["manifest_sha256"] == run.data.tags["manifest_sha256"] == sample_split.sha256
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [20, 40, 60, 80, 100, 120]
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(metrics["mlflow_model_uri"])
        answer = model.predict([_first_question(sample_split.train_path)], params={"max_new_tokens": 8})
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(answer, list) and isinstance(answer[0], str)


def _refuse_to_load(cls: type, *args: object, **kwargs: object) -> None:
    raise AssertionError(f"{cls.__name__}.from_pretrained was called: the model was reloaded into memory")


def test_log_model_copies_the_saved_folder_without_loading_the_model(
    tmp_path: Path, sample_split, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers
    import yaml
    from mlflow.models import get_model_info
    from tiny_model import build_tiny_model, chat_texts
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    model_dir = build_tiny_model(
        tmp_path / "model", list(chat_texts(sample_split.train_path)), hidden_size=32, num_layers=1, num_heads=2
    )
    # Every way to materialise weights: the model classes and the Auto* factories (pipeline() goes through them).
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(_refuse_to_load))
    monkeypatch.setattr(_BaseAutoModelClass, "from_pretrained", classmethod(_refuse_to_load))
    run = sft.MlflowRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "log-model-test", tmp_path / "out", "log-model")
    try:
        model_uri = run.log_model(model_dir)
        info = get_model_info(model_uri)
    finally:
        run.end()
        run.mlflow.set_tracking_uri(None)
    assert "transformers" in info.flavors and info.flavors["transformers"]["source_model_name"] == str(model_dir)
    [mlmodel] = (tmp_path / "artifacts").rglob("MLmodel")  # beside the SQLite store
    assert "transformers" in yaml.safe_load(mlmodel.read_text())["flavors"]
    weights = list(mlmodel.parent.rglob("model.safetensors"))
    assert len(weights) == 1 and weights[0].read_bytes() == (model_dir / "model.safetensors").read_bytes()


def _run_sft(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "sft.py", *args], cwd=TRAINING, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_lora_on_the_tiny_model_saves_merged_weights(tmp_path: Path, sample_split) -> None:
    done = _run_sft(
        [
            *("--config", "recipes/tiny_full_cpu.yaml", "--train_file", str(sample_split.train_path)),
            *("--output_dir", str(tmp_path), "--max_steps", "3", "--save_strategy", "no", "--logging_steps", "1"),
            *("--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16"),
            *("--lora_target_modules", "qkv_proj", "o_proj"),
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["steps"] == 3
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    model_dir = tmp_path / "model"
    assert not (model_dir / "adapter_config.json").exists(), "model/ must hold merged weights, not an adapter"
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in n for n in names)
    new_tokens, _ = _greedy(model_dir, "What is LoRA?", max_new_tokens=4)
    assert new_tokens


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_from_the_last_checkpoint(tmp_path: Path, sample_split) -> None:
    from tasks.backends.base import JobStatus, TrainingJobSpec
    from tasks.backends.local_jobs import LocalJobRunner

    runner = LocalJobRunner(tmp_path / "jobs")
    spec = TrainingJobSpec(
        recipe=RECIPE,
        train_file=sample_split.train_path,
        eval_file=sample_split.test_path,
        manifest_sha256=sample_split.sha256,
        overrides={"max_steps": 16, "save_steps": 4, "logging_steps": 4, "per_device_train_batch_size": 4,
                   "tiny_num_layers": 2, "save_total_limit": 5},
    )  # fmt: skip
    job = runner.submit(spec)
    output = Path(job.output_dir)
    deadline = time.monotonic() + 240
    while not (output / "checkpoint-8" / "trainer_state.json").is_file():
        assert runner.get(job.job_id).status == JobStatus.RUNNING, runner.log_tail(job.job_id)
        assert time.monotonic() < deadline, "no checkpoint-8 within 240 s"
        time.sleep(0.2)
    pgid = runner._record(job.job_id)["pid"]
    os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not runner.get(job.job_id).status.is_terminal:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    info = runner.get(job.job_id)
    assert info.status == JobStatus.FAILED and "was killed" in (info.error or "")
    assert not (output / "metrics.json").exists()

    runner.restart(job.job_id)
    done = runner.wait(job.job_id, timeout_s=300, poll_interval_s=0.5)
    assert done.status == JobStatus.COMPLETED
    log = (tmp_path / "jobs" / job.job_id / "train.log").read_text()
    second = log.split("attempt 2")[1]
    resumed_from = int(second.split("resumed at step ")[1].split("/")[0])
    assert resumed_from >= 8 and "resuming from" in second
    assert "step 4/16" not in second, "steps before the checkpoint must not run again"
    assert json.loads((output / "metrics.json").read_text())["steps"] == 16
