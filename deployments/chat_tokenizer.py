"""A model's chat template and tokenizer without transformers (and so without torch): the engine process's HTTP side.

``from transformers import AutoTokenizer`` imports torch (through its configuration module), which costs a
deployment process with an engine process a second torch runtime: 5 s and about 200 MB at each start, for a
process that only renders prompts. :class:`ChatTokenizer` does what ``apply_chat_template(messages,
tokenize=True, add_generation_prompt=True)`` does for a fast tokenizer, with the same two libraries transformers
uses for it: the template is compiled by jinja2 in transformers' sandbox and settings (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII,
``{% generation %}`` blocks rendered as their body), the named special tokens are passed to it as strings, and
the text is encoded by ``tokenizer.json`` with ``add_special_tokens=False``.

The engine process holds transformers' own tokenizer; at start it sends the ids of :data:`PROBE_CONVERSATIONS`,
and the HTTP side uses this class only where its ids are the same (:mod:`deployments.engine_process`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES), which templates read
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# What the two sides render and compare at start: roles, a system turn, multi-byte text, a control token typed by
# a user, leading and trailing whitespace; the second for templates that refuse a system turn or the first's order.
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  Héllo, wörld! 你好 🙂 <|end|> tab\there"},
        {"role": "assistant", "content": "Hi.\n\n- one\n- two "},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [{"role": "user", "content": "Héllo 🙂 <|end|> 2+2?\n"}],
]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken's ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(tokenizer_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The folder's default chat template where transformers' tokenizers look for it: ``chat_template.jinja``, else
    the ``chat_template`` of ``tokenizer_config.json`` (one string, or named templates with a ``default``)."""
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def compile_chat_template(source: str) -> Any:
    """The template compiled as transformers compiles it (``_compile_jinja_template``), less the assistant-mask
    tracking a server does not need."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks the assistant's tokens for training masks; here, its body
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(source)


class ChatTokenizer:
    """``tokenizer.json`` and the chat template of one tokenizer folder (``apply_chat_template``'s shape)."""

    def __init__(self, tokenizer: Any, template: Any, special_tokens: dict[str, str]) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._special_tokens = special_tokens

    @classmethod
    def from_folder(cls, tokenizer_dir: str | Path) -> ChatTokenizer | None:
        """The folder's chat tokenizer; None where it has no ``tokenizer.json`` or no chat template (a slow-only
        tokenizer, say: transformers must load it)."""
        from tokenizers import Tokenizer

        tokenizer_dir = Path(tokenizer_dir)
        config_file = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        source = read_chat_template(tokenizer_dir, config)
        if source is None or not (tokenizer_dir / "tokenizer.json").is_file():
            return None
        special_tokens = {
            name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None
        }
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        return cls(tokenizer, compile_chat_template(source), special_tokens)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the template writes it (keys whose value is None dropped, as transformers does)."""
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._special_tokens,
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        return_dict: bool = False,
    ) -> list[int] | str:
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return text
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return {"input_ids": ids} if return_dict else ids
