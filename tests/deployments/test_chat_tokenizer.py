"""The torch-free chat tokenizer of the engine process's HTTP side: the same ids as transformers' own
``apply_chat_template`` for the project's tokenizer and for templates stored each way transformers reads them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from deployments.chat_tokenizer import PROBE_CONVERSATIONS, ChatTokenizer
from deployments.engine import render_chat
from deployments.engine_process import probe_chat, tokenizer_agreeing_with

# A template that uses what transformers' sandbox adds: raise_exception, loopcontrols, tojson of non-ASCII,
# namespace, bos_token from the special tokens.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}"
    "{% if loop.index > 6 %}{% break %}{% endif %}{% set ns.turns = ns.turns + 1 %}"
    "[{{ message['role'] }}]{{ message['content'] | tojson }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant:{{ ns.turns }}]{% endif %}"
)

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}
)
conversation = st.lists(message, min_size=1, max_size=5)


def test_probes_cover_the_project_template(tiny_model_dir: Path) -> None:
    chat = ChatTokenizer.from_folder(tiny_model_dir)
    assert chat is not None
    ids = probe_chat(partial(render_chat, chat))
    assert all(ids) and ids == probe_chat(partial(render_chat, AutoTokenizer.from_pretrained(tiny_model_dir)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversation, generation_prompt=st.booleans())
def test_the_project_tokenizer_gives_transformers_ids(
    tiny_model_dir: Path, messages: list[dict[str, str]], generation_prompt: bool
) -> None:
    chat = ChatTokenizer.from_folder(tiny_model_dir)
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert chat is not None
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert chat.render(messages, add_generation_prompt=generation_prompt) == expected
    assert render_chat(chat, messages) == render_chat(reference, messages)


def _folder_with_template(source: Path, target: Path, where: str) -> Path:
    """A copy of ``source``'s tokenizer whose chat template is :data:`STRICT_TEMPLATE`, stored as ``where`` says."""
    target.mkdir(parents=True)
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}  # as hub files do
    if where == "config string":
        config["chat_template"] = STRICT_TEMPLATE
    elif where == "config list":
        config["chat_template"] = [{"name": "default", "template": STRICT_TEMPLATE}, {"name": "rag", "template": "x"}]
    elif where == "chat_template.jinja":  # which wins over the config's
        config["chat_template"] = "{{ raise_exception('the config template was used') }}"
        (target / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("where", ["config string", "config list", "chat_template.jinja"])
def test_templates_stored_each_way_render_as_transformers_does(
    tiny_model_dir: Path, tmp_path: Path, where: str
) -> None:
    folder = _folder_with_template(tiny_model_dir, tmp_path / "tok", where)
    chat, reference = ChatTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert chat is not None
    conversations = [*PROBE_CONVERSATIONS, [{"role": "user", "content": f"turn {i} é"} for i in range(9)]]
    for messages in conversations:
        rendered = chat.render(messages)
        assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<|endoftext|>[")
        assert render_chat(chat, messages) == render_chat(reference, messages)
    assert "[assistant:6]" in chat.render(conversations[-1])  # the loop broke after six turns
    for tokenizer in (chat, reference):  # the template's own error, raised the same way on both
        with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role"):
            render_chat(tokenizer, [{"role": "tool", "content": "x"}])


def test_a_folder_without_tokenizer_json_or_template_is_left_to_transformers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    no_template = tmp_path / "no-template"
    no_template.mkdir()
    shutil.copy(tiny_model_dir / "tokenizer.json", no_template)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", no_template)
    assert ChatTokenizer.from_folder(no_template) is None
    no_tokenizer_json = tmp_path / "slow-only"
    no_tokenizer_json.mkdir()
    shutil.copy(tiny_model_dir / "chat_template.jinja", no_tokenizer_json)
    assert ChatTokenizer.from_folder(no_tokenizer_json) is None


def test_the_http_side_keeps_the_light_tokenizer_only_where_the_engine_agrees(tiny_model_dir: Path) -> None:
    chat = ChatTokenizer.from_folder(tiny_model_dir)
    engine_ids = probe_chat(partial(render_chat, AutoTokenizer.from_pretrained(tiny_model_dir)))
    assert tokenizer_agreeing_with(engine_ids, chat, tiny_model_dir) is chat
    different = [[*engine_ids[0], 7], engine_ids[1]]  # an engine whose tokenizer renders one more token
    chosen = tokenizer_agreeing_with(different, chat, tiny_model_dir)
    assert not isinstance(chosen, ChatTokenizer) and render_chat(chosen, PROBE_CONVERSATIONS[1]) == engine_ids[1]
    assert not isinstance(tokenizer_agreeing_with([None, None], chat, tiny_model_dir), ChatTokenizer)
    assert not isinstance(tokenizer_agreeing_with(engine_ids, None, tiny_model_dir), ChatTokenizer)


def test_the_chat_tokenizer_imports_neither_torch_nor_transformers(tiny_model_dir: Path) -> None:
    code = (
        "import sys; from deployments.chat_tokenizer import ChatTokenizer, PROBE_CONVERSATIONS\n"
        f"ChatTokenizer.from_folder({str(tiny_model_dir)!r}).apply_chat_template(PROBE_CONVERSATIONS[0])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
