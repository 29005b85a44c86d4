"""The engine process's HTTP side: transformers' own tokenizer loaded without torch, kept only where it renders the
probe conversations as the engine's ``AutoTokenizer`` does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deployments.chat_tokenizer import PROBE_CONVERSATIONS, load_chat_tokenizer, probe_chat, tokenizer_agreeing_with
from deployments.engine import render_chat


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of transformers' LlamaTokenizer (Phi-3.5-mini's class, whose pre-tokenizer v5 builds itself instead
    of reading it from tokenizer.json) with Phi-3's turn tokens and a Phi-3-style template: a small vocabulary of
    characters, so it is made here."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in "▁abcdefghijklmnopqrstuvwxyzHW?!,.+-0123456789\n\téö你好🙂":
        vocab.setdefault(char, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    )
    folder = tmp_path_factory.mktemp("llama-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("which", ["project", "llama"])
def test_the_folder_s_tokenizer_class_loads_without_torch_and_renders_as_auto_tokenizer(
    which: str, tiny_model_dir: Path, llama_tokenizer_dir: Path
) -> None:
    folder = tiny_model_dir if which == "project" else llama_tokenizer_dir
    code = (
        "import sys, json; from functools import partial\n"
        "from deployments.chat_tokenizer import load_chat_tokenizer, probe_chat\n"
        "from deployments.engine import render_chat\n"
        f"tokenizer = load_chat_tokenizer({str(folder)!r})\n"
        "ids = probe_chat(partial(render_chat, tokenizer))\n"
        "print(json.dumps([type(tokenizer).__name__, 'torch' in sys.modules, ids]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    class_name, torch_imported, probe_ids = json.loads(out.stdout.strip().splitlines()[-1])
    reference = AutoTokenizer.from_pretrained(folder)
    assert class_name == type(reference).__name__ == ("TokenizersBackend" if which == "project" else "LlamaTokenizer")
    assert torch_imported is False
    assert all(probe_ids) and probe_ids == probe_chat(partial(render_chat, reference))


def _copy_tokenizer(source: Path, target: Path, **config_changes: object) -> Path:
    target.mkdir(parents=True)
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(source / name, target / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (target / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return target


def test_a_folder_naming_no_loadable_class_is_left_to_auto_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert load_chat_tokenizer(_copy_tokenizer(tiny_model_dir, tmp_path / "none", tokenizer_class=None)) is None
    assert load_chat_tokenizer(_copy_tokenizer(tiny_model_dir, tmp_path / "made-up", tokenizer_class="NoSuch")) is None
    assert load_chat_tokenizer(_copy_tokenizer(tiny_model_dir, tmp_path / "bad", tokenizer_class="os.system")) is None
    assert load_chat_tokenizer(tmp_path / "missing") is None


def test_the_http_side_keeps_that_tokenizer_only_where_the_engine_agrees(tiny_model_dir: Path) -> None:
    chat = load_chat_tokenizer(tiny_model_dir)
    engine_ids = probe_chat(partial(render_chat, AutoTokenizer.from_pretrained(tiny_model_dir)))
    assert tokenizer_agreeing_with(engine_ids, chat, tiny_model_dir) is chat
    different = [[*engine_ids[0], 7], engine_ids[1]]  # an engine whose tokenizer renders one more token
    chosen = tokenizer_agreeing_with(different, chat, tiny_model_dir)
    assert chosen is not chat and render_chat(chosen, PROBE_CONVERSATIONS[1]) == engine_ids[1]
    assert tokenizer_agreeing_with([None, None], chat, tiny_model_dir) is not chat  # nothing to compare
    assert tokenizer_agreeing_with(engine_ids, None, tiny_model_dir) is not None
