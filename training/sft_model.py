"""The base model and tokenizer: loading them with a clear error, the pad token, the chat template's checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sft_args import FinetuneSFTConfig, UsageError
from trl import ModelConfig


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


__all__ = [
    "END_OF_TURN",
    "GENERATION_MARK",
    "PAD_FALLBACK",
    "check_chat_template",
    "end_of_turn_id",
    "ensure_distinct_pad_token",
    "load_model",
    "load_tokenizer",
]
