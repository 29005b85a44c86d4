"""Supervised fine-tuning of a chat model with TRL's SFTTrainer, from one YAML recipe.

    python sft.py --config recipes/tiny_full_cpu.yaml \
        --train_file train.jsonl --eval_file test.jsonl --output_dir outputs

Any recipe key can be overridden on the command line (``--max_steps 20``). The same command runs locally (the
``local`` backend starts it from this folder) and as an Azure ML command job (this folder is the code snapshot).

Writes into ``--output_dir``: ``checkpoint-*`` every ``save_steps`` (re-running the same command resumes from the
last one), ``model/`` (the final model and tokenizer, safetensors; LoRA adapters are merged into it),
``metrics.json``, ``loss_curve.png`` and ``log_history.json``. With ``--mlflow_tracking_uri`` (or
``MLFLOW_TRACKING_URI`` in the environment, as inside an Azure ML job) it also logs an MLflow run: parameters,
per-step metrics, the dataset manifest hash, and ``model/`` as an MLflow transformers model.

Bad input (unknown recipe key, wrong type, missing or empty data file, a base model that cannot be loaded, a
tokenizer without a chat template, or ``assistant_only_loss`` with a template that lacks ``{% generation %}``
marks) stops with one sentence on stderr and exit code 2. A pad token missing or equal to the end-of-turn token is
replaced (unknown token, else ``<|endoftext|>``, else a new ``<|pad|>``), so ``<|end|>`` is never treated as padding.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Before torch loads (trl imports it): OpenMP threads that wait for work by spinning burn the cores they share with
# other processes. On a busy 2-core machine one tiny-model step took 8.6 s with torch's 2 threads spinning, 0.6-1.0 s
# with passive waits and 1.1-1.4 s on one thread. It only touches CPU-side parallel regions; override it by
# setting the variable yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the sft_* helpers and tiny_model.py sit beside this script (also for the tests)

from sft_args import FinetuneScriptArguments, FinetuneSFTConfig, UsageError, parse_args  # noqa: E402
from sft_data import check_data_files, read_chats  # noqa: E402
from sft_mlflow import (  # noqa: E402
    MLFLOW_PIP_REQUIREMENTS,
    MlflowRun,
    experiment_id,
    pipeline_impl_as_class,
    run_params,
    sqlite_artifact_location,
)
from sft_model import check_chat_template, ensure_distinct_pad_token, load_model  # noqa: E402
from sft_outputs import (  # noqa: E402
    plot_loss_curve,
    run_facts,
    save_final_model,
    write_json,
)
from sft_trainer import build_trainer, evaluate_run  # noqa: E402
from trl import ModelConfig  # noqa: E402 - after OMP_WAIT_POLICY (trl loads torch)


def main(script_args: FinetuneScriptArguments, training_args: FinetuneSFTConfig, model_args: ModelConfig) -> dict:
    from transformers.trainer_utils import get_last_checkpoint

    started = time.monotonic()
    output_dir = Path(training_args.output_dir or "")
    check_data_files(script_args)  # before MLflow: a typo in a path must not leave a failed run behind
    tracking_uri = script_args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    run = None
    main_process = int(os.environ.get("RANK", "0")) == 0
    if tracking_uri and output_dir.name and main_process:
        experiment = script_args.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "finetune-phi"
        run = MlflowRun(tracking_uri, experiment, output_dir, script_args.recipe_name or "sft")
    try:
        trainer, tokenizer, base_name = build_trainer(script_args, training_args, model_args, run)
        if run is not None:
            run.log_params(run_params(script_args, training_args, model_args))
            if script_args.manifest_sha256:
                run.mlflow.set_tag("manifest_sha256", script_args.manifest_sha256)

        # Train (from the last checkpoint when a previous attempt left one)
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        print(f"resuming from {last}" if last else f"training {base_name} from scratch", flush=True)
        result = trainer.train(resume_from_checkpoint=last)
        train_seconds = time.monotonic() - started

        # Evaluate
        metrics = evaluate_run(trainer, result.training_loss)

        # Save and log (files and MLflow from the main process only)
        model_dir = save_final_model(trainer, tokenizer, output_dir, script_args)
        if not trainer.is_world_process_zero():
            return metrics
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", script_args.recipe_name or "sft")
        write_json(output_dir / "log_history.json", trainer.state.log_history)
        metrics.update(run_facts(script_args, model_args, base_name, started, train_seconds))
        if run is not None:
            metrics.update(run.log_result(metrics, model_dir, output_dir / "loss_curve.png"))
        write_json(output_dir / "metrics.json", metrics)
        print(
            f"done: {metrics['steps']} steps, train_loss {metrics['train_loss']:.4f}"
            + (f", eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
            + f", {metrics['wall_time_s']:.0f} s; model in {model_dir}",
            flush=True,
        )
        return metrics
    except BaseException:
        if run is not None:
            run.end(status="FAILED")
        raise


def cli(argv: list[str] | None = None) -> int:
    try:
        script_args, training_args, model_args = parse_args(list(sys.argv[1:] if argv is None else argv))
        main(script_args, training_args, model_args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


# The names the tests and the Azure ML job's MLflow export step reach through this module.
__all__ = [
    "MLFLOW_PIP_REQUIREMENTS",
    "FinetuneSFTConfig",
    "FinetuneScriptArguments",
    "MlflowRun",
    "UsageError",
    "build_trainer",
    "check_chat_template",
    "cli",
    "ensure_distinct_pad_token",
    "experiment_id",
    "load_model",
    "main",
    "parse_args",
    "pipeline_impl_as_class",
    "read_chats",
    "sqlite_artifact_location",
]


if __name__ == "__main__":
    sys.exit(cli())
