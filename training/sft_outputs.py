"""What a run writes besides checkpoints: ``model/``, JSON files (atomically), the loss curve, resource figures."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_args import FinetuneScriptArguments
from sft_model import load_model
from trl import ModelConfig

MODEL_SUBDIR = "model"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it when the block succeeds (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tokens_per_second(trainer: Any) -> float | None:
    for callback in trainer.callback_handler.callbacks:
        rate = getattr(callback, "tokens_per_second", None)
        if rate:
            return round(rate, 1)
    return None


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_facts(
    script_args: FinetuneScriptArguments, model_args: ModelConfig, base_name: str, started: float, train_seconds: float
) -> dict[str, Any]:
    """The run's times, resources and lineage for ``metrics.json`` (the MLflow ids are filled in when logged)."""
    return {
        "wall_time_s": round(time.monotonic() - started, 2),
        "train_time_s": round(train_seconds, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "cpu_time_s": round(cpu_seconds(), 1),  # unlike wall time, barely moved by other load on the machine
        "manifest_sha256": script_args.manifest_sha256,
        "recipe": script_args.recipe_name,
        "base_model": "tiny" if script_args.build_tiny_model else base_name,
        "method": "lora" if model_args.use_peft else "full",
        "mlflow_run_id": None,
        "mlflow_model_uri": None,
    }


def save_final_model(trainer: Any, tokenizer: Any, output_dir: Path, script_args: FinetuneScriptArguments) -> Path:
    """Save the model for serving in ``output_dir/model``; a LoRA adapter is kept in ``adapter/`` and merged."""
    model_dir = output_dir / MODEL_SUBDIR
    model = trainer.model
    if not hasattr(model, "merge_and_unload") or not script_args.merge_adapter:
        trainer.save_model(str(model_dir))  # every process calls it: it gathers sharded weights, rank 0 writes
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(model_dir)
        return model_dir
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir / "adapter")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model, "is_loaded_in_4bit", False):
            # QLoRA: the 4-bit base cannot take the merge; reload it unquantised and apply the adapter.
            from peft import PeftModel

            base = trainer.model.peft_config["default"].base_model_name_or_path
            plain = load_model(base, ModelConfig(model_name_or_path=base, dtype="bfloat16"), trainer.args)
            model = PeftModel.from_pretrained(plain, output_dir / "adapter")
        model = model.merge_and_unload()
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    trainer.accelerator.wait_for_everyone()
    return model_dir


__all__ = [
    "MODEL_SUBDIR",
    "atomic_path",
    "cpu_seconds",
    "peak_memory_mb",
    "plot_loss_curve",
    "run_facts",
    "save_final_model",
    "tokens_per_second",
    "write_json",
]
