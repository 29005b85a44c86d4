"""A tiny Phi-3-architecture model with its own tokenizer, built from the training data (no download).

    python training/tiny_model.py --train_file data/sample/chat_sample.jsonl --output_dir /tmp/tiny-phi

The folder is an ordinary Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer files,
``generation_config.json``), loadable with ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained(folder)``
offline, so the same code serves it and the real Phi-3.5-mini. The tokenizer is a byte-level BPE trained on the
given texts; its chat template is Phi-3's (``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``), with
``{% generation %}`` marks around the assistant's reply for TRL's ``assistant_only_loss``.

``<|end|>`` closes every turn and is the token generation stops on (``generation_config.eos_token_id``);
``<|endoftext|>`` ends a whole conversation and is the pad token, so padding is never confused with the end of a
turn, as in Phi-3.5-mini.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

END_OF_TEXT = "<|endoftext|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (END_OF_TEXT, *ROLE_TOKENS, END_OF_TURN)

# Phi-3.5-mini-instruct's template (an empty system message is skipped), plus the generation marks TRL needs for
# assistant-only loss. The `<|end|>` after the reply sits inside the marks, so it is learnt in either loss mode.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable, so no unknown token
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    output_dir: Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 4096,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised Phi-3 model and a tokenizer trained on ``texts`` to ``output_dir``.

    ``vocab_size`` is an upper bound: a small corpus yields fewer merges, and the embedding matrix is sized to
    the tokenizer actually trained (a smaller matrix trains faster). Returns ``output_dir``.
    """
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        original_max_position_embeddings=max_position_embeddings,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    # Stop at the end of the assistant's turn, as Phi-3.5-mini does; <|endoftext|> stays a stop token too.
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[end_of_turn, end_of_text],
        pad_token_id=end_of_text,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def chat_texts(jsonl_path: Path) -> Iterator[str]:
    """The turn contents of a chat JSONL file (``messages: [{role, content}, ...]`` per line): tokenizer food."""
    with open(jsonl_path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            for message in row.get("messages") or []:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str) and content:
                    yield content


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_file", type=Path, required=True, help="chat JSONL whose turns train the tokenizer")
    parser.add_argument("--output_dir", type=Path, required=True, help="where the model folder is written")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.train_file.is_file():
        print(f"error: training file {args.train_file} does not exist; pass a chat JSONL file", file=sys.stderr)
        return 2
    folder = build_tiny_model(
        args.output_dir,
        list(chat_texts(args.train_file)),
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    print(f"tiny model written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
