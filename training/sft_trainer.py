"""The SFTTrainer with its data, model and tokenizer, and the callbacks that print progress and log to MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from sft_args import FinetuneScriptArguments, FinetuneSFTConfig, UsageError
from sft_data import read_chats
from sft_model import check_chat_template, ensure_distinct_pad_token, load_model, load_tokenizer
from sft_outputs import tokens_per_second
from trl import ModelConfig

TINY_BASE_SUBDIR = "tiny_base"  # the tiny model built before training, kept so a resumed run reuses its tokenizer


def _format_eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def make_callbacks(run: Any) -> list[Any]:
    """A progress line per log step (printed and flushed, for Prefect's log) and MLflow per-step metrics."""
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        tokens_per_second: float | None = None  # real tokens per second of training in this attempt

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0, self.step0, self.tokens0 = time.monotonic(), state.global_step, state.num_input_tokens_seen or 0
            if state.global_step and state.is_world_process_zero:
                print(f"resumed at step {state.global_step}/{state.max_steps}", flush=True)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tokens = (state.num_input_tokens_seen or 0) - self.tokens0
            if tokens > 0:
                self.tokens_per_second = tokens / max(time.monotonic() - self.t0, 1e-9)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = logs or {}
            elapsed = max(time.monotonic() - self.t0, 1e-9)
            steps = state.global_step - self.step0
            tokens = (state.num_input_tokens_seen or 0) - self.tokens0
            if ("loss" not in logs and "eval_loss" not in logs) or not state.is_world_process_zero:
                return  # the end-of-training summary (metrics.json has it), or not the main process
            parts = [f"step {state.global_step}/{state.max_steps}"]
            if "loss" in logs:
                parts.append(f"loss {logs['loss']:.4f}")
            if "eval_loss" in logs:
                parts.append(f"eval_loss {logs['eval_loss']:.4f}")
            if tokens > 0:
                parts.append(f"{tokens / elapsed:,.0f} tok/s")
            if steps > 0 and state.global_step < state.max_steps:
                parts.append(f"ETA {_format_eta((state.max_steps - state.global_step) * elapsed / steps)}")
            print(" | ".join(parts), flush=True)
            if run is not None:
                numbers = {
                    k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)
                }
                if tokens > 0:
                    numbers["tokens_per_second"] = tokens / elapsed
                if numbers:
                    run.log_metrics(numbers, step=state.global_step)

    return [ProgressLines()]


def evaluate_run(trainer: Any, training_loss: float) -> dict[str, Any]:
    """Train loss, steps and real-token throughput; first and last logged loss; eval loss and perplexity."""
    metrics: dict[str, Any] = {
        "train_loss": training_loss,
        "steps": trainer.state.global_step,
        "tokens_per_second": tokens_per_second(trainer),
    }
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics.update({"initial_loss": losses[0], "final_loss": losses[-1]})
    if trainer.eval_dataset is not None:
        eval_loss = trainer.evaluate()["eval_loss"]
        metrics.update({"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})
    return metrics


def build_trainer(
    script_args: FinetuneScriptArguments, training_args: FinetuneSFTConfig, model_args: ModelConfig, run: Any = None
) -> tuple[Any, Any, str]:
    """Data, model, tokenizer and the SFTTrainer. Returns (trainer, tokenizer, base model name)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer, get_peft_config

    if not training_args.output_dir:
        raise UsageError("--output_dir is required: the folder for checkpoints, model/ and metrics.json")
    if not script_args.train_file:
        raise UsageError("--train_file is required: a chat JSONL file from the data preparation step")
    output_dir = Path(training_args.output_dir)

    # Load the dataset (the `messages` column only)
    train_rows = read_chats(Path(script_args.train_file), "train_file", script_args.system_message)
    eval_rows = (
        read_chats(Path(script_args.eval_file), "eval_file", script_args.system_message)
        if script_args.eval_file
        else None
    )

    # Model and tokenizer
    if script_args.build_tiny_model:
        from tiny_model import build_tiny_model

        base = output_dir / TINY_BASE_SUBDIR
        if not (base / "config.json").is_file():  # a resumed run keeps the tokenizer its checkpoints were made with
            texts = [m["content"] for row in train_rows for m in row["messages"] if m["content"]]
            build_tiny_model(
                base,
                texts,
                vocab_size=script_args.tiny_vocab_size,
                hidden_size=script_args.tiny_hidden_size,
                num_layers=script_args.tiny_num_layers,
                num_heads=script_args.tiny_num_heads,
                intermediate_size=script_args.tiny_intermediate_size,
                max_position_embeddings=max(1024, training_args.max_length or 0),
                seed=training_args.seed,
            )
        base_name = str(base)
    elif model_args.model_name_or_path:
        base_name = model_args.model_name_or_path
    else:
        raise UsageError("no base model: set model_name_or_path in the recipe, or build_tiny_model: true")
    tokenizer = load_tokenizer(base_name)
    check_chat_template(tokenizer, base_name, training_args.assistant_only_loss)
    model = load_model(base_name, model_args, training_args)
    pad = ensure_distinct_pad_token(tokenizer)
    if pad is not None:
        print(f"pad token set to {pad!r}: the tokenizer's own was missing or was its end-of-turn token", flush=True)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))

    # Trainer
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=make_callbacks(run),
    )
    trainer.remove_callback(PrinterCallback)  # our progress lines replace its raw dicts
    return trainer, tokenizer, base_name


__all__ = [
    "TINY_BASE_SUBDIR",
    "build_trainer",
    "evaluate_run",
    "make_callbacks",
]
