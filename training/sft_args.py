"""The script's arguments: TRL's dataclasses with this project's fields, and the recipe check before parsing."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser


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


__all__ = [
    "DATACLASSES",
    "FinetuneSFTConfig",
    "FinetuneScriptArguments",
    "UsageError",
    "check_recipe",
    "parse_args",
]
