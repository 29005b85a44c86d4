"""training/tiny_model.py: a normal Hugging Face folder with a Phi-3 chat template that stops on <|end|>."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_cli_builds_a_folder_that_loads_offline_and_chats(tmp_path: Path, sample_split) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    done = subprocess.run(
        [
            sys.executable,
            "training/tiny_model.py",
            "--train_file",
            str(sample_split.train_path),
            "--output_dir",
            str(tmp_path / "tiny"),
            "--num_layers",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "tiny"
    assert (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "phi3" and model.config.vocab_size == len(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != end
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert end in GenerationConfig.from_pretrained(folder).eos_token_id

    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "What is LoRA?"},
        {"role": "assistant", "content": "Low-rank adapters."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nWhat is LoRA?<|end|>\n<|assistant|>\nLow-rank adapters.<|end|>\n<|endoftext|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    marked = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    learnt = [i for i, m in zip(marked["input_ids"], marked["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(learnt) == "Low-rank adapters.<|end|>"


def test_missing_train_file_exits_2(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "training"))
    import tiny_model

    assert tiny_model.main(["--train_file", str(tmp_path / "no.jsonl"), "--output_dir", str(tmp_path)]) == 2
