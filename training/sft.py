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

import contextlib
import difflib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads (trl imports it): OpenMP threads that wait for work by spinning burn the cores they share with
# other processes. On a busy 2-core machine one tiny-model step took 8.6 s with torch's 2 threads spinning, 0.6-1.0 s
# with passive waits and 1.1-1.4 s on one thread. It only touches CPU-side parallel regions; override it by
# setting the variable yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # tiny_model.py sits beside this script (also when imported by the tests)

# What the serving side needs to load the logged model; MLflow's inference adds torchvision, which is absent.
MLFLOW_PIP_REQUIREMENTS = ["torch", "transformers>=5", "tokenizers", "accelerate", "safetensors"]
MODEL_SUBDIR = "model"
TINY_BASE_SUBDIR = "tiny_base"  # the tiny model built before training, kept so a resumed run reuses its tokenizer
MLFLOW_RUN_FILE = "mlflow_run_id"


class UsageError(Exception):
    """Bad input: the message is one sentence naming the cause and the fix; the script exits with code 2."""


@dataclass
class FinetuneScriptArguments(ScriptArguments):
    """Inputs and bookkeeping. ``dataset_name`` and friends from TRL stay unused: data comes as JSONL files."""

    train_file: str | None = field(default=None, metadata={"help": "Chat JSONL (a `messages` list per line)."})
    eval_file: str | None = field(default=None, metadata={"help": "Chat JSONL held out for the eval loss."})
    manifest_sha256: str | None = field(default=None, metadata={"help": "Dataset manifest hash, for lineage."})
    mlflow_tracking_uri: str | None = field(
        default=None, metadata={"help": "MLflow tracking URI; default: MLFLOW_TRACKING_URI, else no MLflow."}
    )
    mlflow_experiment: str | None = field(
        default=None, metadata={"help": "MLflow experiment; default: MLFLOW_EXPERIMENT_NAME, else finetune-phi."}
    )
    build_tiny_model: bool = field(
        default=False,
        metadata={"help": "Build a tiny Phi-3 model and tokenizer from the training split instead of loading one."},
    )
    tiny_vocab_size: int = field(default=4096, metadata={"help": "Tiny model: BPE vocabulary upper bound."})
    tiny_hidden_size: int = field(default=256, metadata={"help": "Tiny model: hidden size."})
    tiny_num_layers: int = field(default=4, metadata={"help": "Tiny model: number of layers."})
    tiny_num_heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    tiny_intermediate_size: int = field(default=512, metadata={"help": "Tiny model: MLP width."})
    system_message: str | None = field(
        default=None,
        metadata={"help": "Insert this system message where a conversation has none ('' as the Azure sample does)."},
    )
    merge_adapter: bool = field(
        default=True, metadata={"help": "LoRA: merge the adapter into the base weights in model/ (served as is)."}
    )
    recipe_name: str | None = field(default=None, metadata={"help": "Recipe name for lineage (default: file stem)."})


@dataclass
class FinetuneSFTConfig(SFTConfig):
    """SFTConfig with this project's defaults: our own progress lines instead of tqdm, real-token counts for tok/s."""

    disable_tqdm: bool = field(default=True, metadata={"help": "Progress bars off: one progress line per log."})
    include_num_input_tokens_seen: str = field(  # str only: a `str | bool` field parses as a bool flag
        default="non_padding", metadata={"help": "Count real tokens (not padding), for tokens/s: all|non_padding|no."}
    )


DATACLASSES = (FinetuneScriptArguments, FinetuneSFTConfig, ModelConfig)


# ----------------------------------------------------------------------------------------------------- recipe
def _type_problem(action: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the argparse ``action`` (None when it does): TrlParser only checks strings."""
    if value is None:
        return None
    kind = action.type
    if kind in (int, float):
        if isinstance(value, bool | list | dict):
            return f"expected a number, got {value!r}"
        try:
            number = kind(value)
        except (TypeError, ValueError):
            return f"expected {'an integer' if kind is int else 'a number'}, got {value!r}"
        if kind is int and isinstance(value, float) and number != value:
            return f"expected an integer, got {value!r}"
        return None
    if getattr(kind, "__name__", "") == "string_to_bool" or action.const is True or action.nargs == "?":
        if isinstance(value, bool):
            return None
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return None
        if action.nargs == "?" and kind not in (None, str) and getattr(kind, "__name__", "") != "string_to_bool":
            return None
        return f"expected true or false, got {value!r}"
    if action.choices is not None and not isinstance(value, list):
        allowed = [getattr(c, "value", c) for c in action.choices]
        if value not in allowed and str(value) not in [str(c) for c in allowed]:
            return f"expected one of {', '.join(map(str, allowed))}, got {value!r}"
    return None


def check_recipe(parser: TrlParser, recipe: Path) -> dict[str, Any]:
    """Read the recipe and check its keys and value types; raise :class:`UsageError` naming the key and the file."""
    import yaml

    if not recipe.is_file():
        raise UsageError(f"recipe {recipe} does not exist; pass --config with a file from training/recipes/")
    try:
        body = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {recipe} is not valid YAML ({exc}); fix the file") from None
    if not isinstance(body, dict):
        raise UsageError(f"recipe {recipe} must be a mapping of `key: value` lines")
    actions = {a.dest: a for a in parser._actions}
    for key, value in body.items():
        if key == "env":
            continue
        if key not in actions:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"recipe {recipe} has an unknown key {key!r}{hint}; remove it or use a field of ScriptArguments, "
                "SFTConfig or ModelConfig"
            )
        problem = _type_problem(actions[key], value)
        if problem:
            raise UsageError(f"recipe {recipe}: key {key!r} has the wrong type ({problem}); fix the value")
    return body


def parse_args(argv: list[str]) -> tuple[FinetuneScriptArguments, FinetuneSFTConfig, ModelConfig]:
    """TrlParser over the three dataclasses; the recipe is checked first so mistakes get a clear message."""
    parser = TrlParser(DATACLASSES)
    recipe: Path | None = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("--config needs a recipe path, e.g. --config recipes/tiny_full_cpu.yaml")
        recipe = Path(argv[index + 1])
        check_recipe(parser, recipe)
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as exc:
        if "not used by the HfArgumentParser" in str(exc):  # recipe keys were checked above: these are flags
            raise UsageError(f"unknown command-line flags ({exc}); check the names with --help") from None
        where = f"recipe {recipe} with these flags" if recipe else "these flags"
        raise UsageError(f"{where} cannot be used: {exc}; change the recipe or override on the command line") from None
    if script_args.recipe_name is None and recipe is not None:
        script_args.recipe_name = recipe.stem
    return script_args, training_args, model_args


# ------------------------------------------------------------------------------------------------------- data
def check_data_files(script_args: FinetuneScriptArguments) -> None:
    if not script_args.train_file:
        raise UsageError("--train_file is required: a chat JSONL file from the data preparation step")
    for what in ("train_file", "eval_file"):
        value = getattr(script_args, what)
        if value and not Path(value).is_file():
            raise UsageError(f"{what} {value} does not exist; run the data preparation step or fix --{what}")
        if value and not _has_a_line(Path(value)):
            raise UsageError(f"{what} {value} holds no conversations; check the data preparation report")


def _has_a_line(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(line.strip() for line in handle)


def read_chats(path: Path, what: str, system_message: str | None) -> list[dict[str, Any]]:
    """Rows of a chat JSONL file as ``{"messages": [...]}`` only (a `prompt` column would make TRL see
    prompt-completion rows); ``system_message`` is inserted where a conversation has no system turn."""
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist; run the data preparation step or fix --{what}")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"{what} {path} line {number} is not a chat row ({{'messages': [{{'role', 'content'}}, ...]}}); "
                    "prepare the data with `finetune-phi prepare-data`"
                ) from None
            if system_message is not None and (not messages or messages[0]["role"] != "system"):
                messages.insert(0, {"role": "system", "content": system_message})
            rows.append({"messages": messages})
    if not rows:
        raise UsageError(f"{what} {path} holds no conversations; check the data preparation report")
    return rows


# ------------------------------------------------------------------------------------------------------ model
def _offline_hint(name: str) -> str:
    return (
        f"base model {name!r} could not be loaded: it is not a local folder and not in the Hugging Face cache; "
        "set HF_HUB_OFFLINE=0 on a machine with internet access to download it, or point model_name_or_path at "
        "a local model folder"
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise UsageError(f"the tokenizer in {name} cannot be loaded ({exc}); check the folder") from None
        raise UsageError(_offline_hint(name)) from None


def load_model(name: str, model_args: ModelConfig, training_args: FinetuneSFTConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": model_args.model_revision}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}  # each process its own GPU
    if training_args.model_init_kwargs and isinstance(training_args.model_init_kwargs, dict):
        kwargs.update(training_args.model_init_kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ImportError as exc:
        raise UsageError(
            f"loading {name} needs a package that is missing ({exc}); install it or change the recipe"
        ) from None
    except (OSError, ValueError) as exc:
        if Path(name).is_dir():
            raise UsageError(f"the model in {name} cannot be loaded ({exc}); check the folder") from None
        raise UsageError(_offline_hint(name)) from None


END_OF_TURN = "<|end|>"  # Phi-3's end of a turn: what generation stops on, so it must stay in the labels
PAD_FALLBACK = "<|pad|>"
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # where TRL's assistant-only loss finds the replies


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token a reply ends with: Phi-3's ``<|end|>`` when the vocabulary has it, else the end-of-sequence token."""
    vocab = tokenizer.get_vocab()
    return vocab.get(END_OF_TURN, tokenizer.eos_token_id)


def ensure_distinct_pad_token(tokenizer: Any) -> str | None:
    """Give the tokenizer a pad token that is not its end-of-turn token; return the new pad token, None if unchanged.

    A pad token equal to the end token is the classic cause of fine-tuned models that never stop (the end token
    gets treated as padding); TRL would fall back to the end-of-sequence token when there is no pad token at all.
    Candidates in order: the unknown token (the Azure sample's choice), ``<|endoftext|>``, then a new ``<|pad|>``
    (the caller then resizes the embeddings)."""
    end = end_of_turn_id(tokenizer)
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != end:
        return None
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, "<|endoftext|>"):
        if candidate and candidate in vocab and vocab[candidate] != end:
            tokenizer.pad_token = candidate
            return candidate
    tokenizer.add_special_tokens({"pad_token": PAD_FALLBACK})
    return PAD_FALLBACK


def check_chat_template(tokenizer: Any, name: str, assistant_only_loss: bool) -> None:
    """The tokenizer must have a chat template, with ``{% generation %}`` marks when only the replies are learnt."""
    template = tokenizer.chat_template
    if not template:
        raise UsageError(
            f"the tokenizer of {name} has no chat template, so conversations cannot be formatted; use a chat "
            "(instruct) model or a model folder whose tokenizer_config.json has a chat_template"
        )
    if assistant_only_loss and not GENERATION_MARK.search(str(template)):
        raise UsageError(
            f"assistant_only_loss needs {{% generation %}} marks in the chat template and the template of {name} has "
            "none; set assistant_only_loss: false or give the tokenizer a template with the marks"
        )


# -------------------------------------------------------------------------------------------------- callbacks
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


# ---------------------------------------------------------------------------------------------------- outputs
@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
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
    with _atomic_path(path) as tmp:
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
    with _atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rate(trainer: Any) -> float | None:
    for callback in trainer.callback_handler.callbacks:
        rate = getattr(callback, "tokens_per_second", None)
        if rate:
            return round(rate, 1)
    return None


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


# ----------------------------------------------------------------------------------------------------- MLflow
class MlflowRun:
    """The job's MLflow run; its id is kept in the output folder so a resumed job continues the same run."""

    def __init__(self, tracking_uri: str, experiment: str, output_dir: Path, run_name: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        id_file = output_dir / MLFLOW_RUN_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        # Inside an Azure ML job MLFLOW_RUN_ID names the job's own run: start_run() attaches to it.
        if not previous and not os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_experiment(experiment_id=experiment_id(tracking_uri, experiment))
        self.run = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id
        output_dir.mkdir(parents=True, exist_ok=True)
        with _atomic_path(id_file) as tmp:
            tmp.write_text(self.run_id + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}  # a resumed run must not re-log a param
        if fresh:
            self.mlflow.log_params(fresh)

    def log_model(self, model_dir: Path) -> str:
        """Log the saved folder by path (weights copied, not loaded into memory); return the model URI."""
        with _pipeline_impl_as_class():
            info = self.mlflow.transformers.log_model(
                transformers_model=str(model_dir),
                name="model",
                task="text-generation",
                pip_requirements=list(MLFLOW_PIP_REQUIREMENTS),
            )
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """``artifacts/`` beside a SQLite store's file (as ``tasks/registry.py`` does), None for any other store.

    MLflow's default artifact root for a SQLite store is ``./mlruns`` of the process's working folder, which for a
    job is this code folder: every model logged from it would land in ``training/mlruns/``."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server or Azure ML has its own artifact store
    return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id; a new one gets its artifacts in the tracking store's own place, never ``./mlruns``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=sqlite_artifact_location(tracking_uri))
    except MlflowException:  # another process created it in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def _pipeline_impl_as_class() -> Iterator[None]:
    """MLflow 3.17 logs a checkpoint folder with ``check_task(task)[1]["impl"].__name__``, but transformers 5 names
    the pipeline class as a dotted string there (AttributeError). Resolve it to the class for the block."""
    import importlib

    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task: str) -> Any:
        name, meta, options = original(task)
        impl = meta.get("impl")
        if isinstance(impl, str):
            module, _, attr = impl.rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), attr)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def run_params(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    keys = (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "padding_free",
        "assistant_only_loss", "bf16", "activation_checkpointing", "weight_decay", "seed", "save_steps",
    )  # fmt: skip
    params: dict[str, Any] = {k: getattr(training_args, k) for k in keys}
    params.update(
        {
            "model_name_or_path": "tiny (built from the training split)"
            if script_args.build_tiny_model
            else model_args.model_name_or_path,
            "use_peft": model_args.use_peft,
            "recipe": script_args.recipe_name,
            "manifest_sha256": script_args.manifest_sha256,
        }
    )
    if model_args.use_peft:
        params.update({"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha})
    return {k: str(v) for k, v in params.items() if v is not None}


# ------------------------------------------------------------------------------------------------------- main
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
        metrics: dict[str, Any] = {
            "train_loss": result.training_loss,
            "steps": trainer.state.global_step,
            "tokens_per_second": _rate(trainer),
        }
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        if losses:
            metrics.update({"initial_loss": losses[0], "final_loss": losses[-1]})
        if trainer.eval_dataset is not None:
            eval_loss = trainer.evaluate()["eval_loss"]
            metrics.update({"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))})

        # Save and log (files and MLflow from the main process only)
        model_dir = save_final_model(trainer, tokenizer, output_dir, script_args)
        if not trainer.is_world_process_zero():
            return metrics
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", script_args.recipe_name or "sft")
        write_json(output_dir / "log_history.json", trainer.state.log_history)
        metrics.update(
            {
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
        )
        if run is not None:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            run.log_metrics(numbers, step=metrics["steps"])
            metrics["mlflow_model_uri"] = run.log_model(model_dir)
            run.mlflow.log_artifact(str(output_dir / "loss_curve.png"))
            metrics["mlflow_run_id"] = run.run_id
            run.end()
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


if __name__ == "__main__":
    sys.exit(cli())
