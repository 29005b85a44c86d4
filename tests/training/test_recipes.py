"""Every recipe parses with TrlParser (catches drift in TRL/transformers fields); bad input stops with one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINING = REPO_ROOT / "training"
sys.path.insert(0, str(TRAINING))

import sft  # noqa: E402  (training/ is a code snapshot, not a package)

RECIPES = sorted((TRAINING / "recipes").glob("*.yaml"))


def test_there_are_the_three_recipes() -> None:
    assert {r.stem for r in RECIPES} >= {"tiny_full_cpu", "phi3.5-mini_full_gpu", "phi3.5-mini_lora_gpu"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU TrainingArguments refuses bf16 at parse time: the GPU recipes are parsed with bf16 turned off
# there (the raw YAML still has to say bf16: true), and in full on a GPU machine.
CPU_FLAGS = ["--bf16", "false", "--use_cpu", "true"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_starts_with_its_launch_command(recipe: Path) -> None:
    import yaml

    extra = CPU_FLAGS if "gpu" in recipe.stem and not _cuda() else []
    script_args, training_args, model_args = sft.parse_args(["--config", str(recipe), "--output_dir", "/x", *extra])
    assert script_args.recipe_name == recipe.stem
    assert recipe.read_text().startswith("# To run (from training/")
    assert f"--config recipes/{recipe.name}" in recipe.read_text().split("\n\n")[0]
    if "gpu" in recipe.stem:
        assert yaml.safe_load(recipe.read_text())["bf16"] is True
        assert model_args.dtype == "bfloat16" and training_args.packing
        assert training_args.max_length == 2048 and training_args.per_device_train_batch_size == 4
        assert model_args.model_name_or_path == "microsoft/Phi-3.5-mini-instruct"
        assert script_args.system_message == ""
    else:
        assert training_args.use_cpu and not training_args.bf16 and script_args.build_tiny_model


def test_phi35_recipes_keep_the_sample_hyper_parameters() -> None:
    extra = [] if _cuda() else CPU_FLAGS
    _, full, _ = sft.parse_args(["--config", str(TRAINING / "recipes/phi3.5-mini_full_gpu.yaml"), *extra])
    assert (full.learning_rate, full.lr_scheduler_type.value, full.warmup_steps, full.num_train_epochs) == (
        5e-6, "cosine", 0.2, 3,
    )  # fmt: skip
    assert full.activation_checkpointing
    _, _, lora = sft.parse_args(["--config", str(TRAINING / "recipes/phi3.5-mini_lora_gpu.yaml"), *extra])
    assert lora.use_peft and lora.lora_r == 16 and "qkv_proj" in lora.lora_target_modules


def test_flags_override_the_recipe() -> None:
    _, args, _ = sft.parse_args(
        ["--config", str(TRAINING / "recipes/tiny_full_cpu.yaml"), "--max_steps", "7", "--learning_rate", "0.01"]
    )
    assert (args.max_steps, args.learning_rate) == (7, 0.01)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("learning_rat: 0.1\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ("max_steps: lots\n", "key 'max_steps' has the wrong type (expected an integer, got 'lots')"),
        ("packing: maybe\n", "key 'packing' has the wrong type (expected true or false"),
        ("lr_scheduler_type: wobbly\n", "key 'lr_scheduler_type' has the wrong type (expected one of"),
    ],
)
def test_bad_recipe_gives_a_clear_message_naming_key_and_file(tmp_path: Path, line: str, expected: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("use_cpu: true\n" + line)
    with pytest.raises(sft.UsageError) as caught:
        sft.parse_args(["--config", str(recipe)])
    assert expected in str(caught.value) and str(recipe) in str(caught.value)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = sft.cli(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _chat(path: Path, rows: int) -> Path:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(rows)))
    return path


def test_missing_data_file_exits_2_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(TRAINING / "recipes/tiny_full_cpu.yaml")
    code, err = _cli(
        ["--config", recipe, "--train_file", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path)], capsys
    )
    assert code == 2
    missing = tmp_path / "nope.jsonl"
    assert err == f"error: train_file {missing} does not exist; run the data preparation step or fix --train_file"


def test_empty_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    recipe = str(TRAINING / "recipes/tiny_full_cpu.yaml")
    code, err = _cli(["--config", recipe, "--train_file", str(empty), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "holds no conversations" in err and err.count("\n") == 0


def test_base_model_missing_offline_exits_2_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    train = _chat(tmp_path / "t.jsonl", 3)
    done = subprocess.run(
        [
            *(sys.executable, "sft.py", "--config", "recipes/phi3.5-mini_lora_gpu.yaml", "--train_file", str(train)),
            *("--output_dir", str(tmp_path / "o"), *CPU_FLAGS),
        ],
        cwd=TRAINING,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "'microsoft/Phi-3.5-mini-instruct' could not be loaded" in last
    assert "HF_HUB_OFFLINE=0" in last and "local model folder" in last


def test_help_is_quick_and_lists_the_project_fields() -> None:
    done = subprocess.run(
        [sys.executable, "sft.py", "--help"], cwd=TRAINING, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for flag in ("--train_file", "--build_tiny_model", "--manifest_sha256", "--mlflow_tracking_uri", "--use_peft"):
        assert flag in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [r for r in RECIPES if "gpu" in r.stem], ids=lambda p: p.stem)
def test_gpu_recipes_parse_as_written_on_a_gpu(recipe: Path) -> None:
    _, training_args, _ = sft.parse_args(["--config", str(recipe), "--output_dir", "/x"])
    assert training_args.bf16


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        spec = line.split("#")[0].strip().lstrip("- ").strip()
        if "==" in spec:
            name, version = spec.split("==")
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def test_training_environment_pins_match_the_project_constraints() -> None:
    import yaml

    constraints = _pins((REPO_ROOT / "constraints.txt").read_text().splitlines())
    requirements = _pins((TRAINING / "requirements.txt").read_text().splitlines())
    conda = yaml.safe_load((TRAINING / "conda.yml").read_text())
    conda_pins = _pins(next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict)))
    assert requirements == conda_pins
    assert {"torch", "transformers", "trl", "peft", "mlflow"} <= set(requirements)
    assert int(requirements["transformers"].split(".")[0]) >= 5
    for name, version in requirements.items():
        assert constraints.get(name) == version, name


# ------------------------------------------------------------------------------------ tokenizer and chat template
def _tokenizer(special: list[str], **tokens: str):
    """A small byte-level BPE with only the given special tokens (no tiny-model defaults)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    bpe.train_from_iterator(["hello there", "what is LoRA", "low-rank adapters"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)


def test_a_pad_token_equal_to_the_end_token_is_replaced() -> None:
    from tiny_model import build_tokenizer

    tokenizer = build_tokenizer(["hello there", "what is LoRA"], vocab_size=300)
    assert sft.ensure_distinct_pad_token(tokenizer) is None  # the tiny tokenizer's pad is already distinct
    tokenizer.pad_token = "<|end|>"
    assert sft.ensure_distinct_pad_token(tokenizer) == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|end|>")

    # The Azure sample's choice first: the unknown token, where there is one.
    with_unk = _tokenizer(["<unk>", "<|end|>"], unk_token="<unk>", eos_token="<|end|>", pad_token="<|end|>")
    assert sft.ensure_distinct_pad_token(with_unk) == "<unk>"

    # Nothing suitable in the vocabulary: a new <|pad|> token (build_trainer then resizes the embeddings).
    bare = _tokenizer(["<|end|>"], eos_token="<|end|>")
    size = len(bare)
    assert sft.ensure_distinct_pad_token(bare) == "<|pad|>"
    assert len(bare) == size + 1 and bare.pad_token_id not in (None, bare.convert_tokens_to_ids("<|end|>"))


def test_chat_template_problems_are_one_sentence() -> None:
    from tiny_model import build_tokenizer

    tokenizer = build_tokenizer(["hello there", "what is LoRA"], vocab_size=300)
    sft.check_chat_template(tokenizer, "tiny", assistant_only_loss=True)  # the tiny template has the marks
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    sft.check_chat_template(tokenizer, "base", assistant_only_loss=False)
    with pytest.raises(sft.UsageError, match=r"assistant_only_loss needs .* set assistant_only_loss: false"):
        sft.check_chat_template(tokenizer, "base", assistant_only_loss=True)
    tokenizer.chat_template = None
    with pytest.raises(sft.UsageError, match="has no chat template"):
        sft.check_chat_template(tokenizer, "base", assistant_only_loss=False)


def test_a_malformed_data_line_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + '{"prompt": "x"}\n')
    with pytest.raises(sft.UsageError) as caught:
        sft.read_chats(bad, "train_file", None)
    assert f"train_file {bad} line 2 is not a chat row" in str(caught.value)


def test_new_experiments_keep_artifacts_beside_the_sqlite_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    experiment_id = sft.experiment_id(uri, "finetune-phi")
    assert sft.experiment_id(uri, "finetune-phi") == experiment_id  # found, not created twice
    location = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "store" / "artifacts").as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert sft.sqlite_artifact_location("http://127.0.0.1:5000") is None
