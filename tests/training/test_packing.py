"""Padding-free packing (the GPU recipes' `packing: true`, bfd, sdpa) keeps the examples of a row apart.

transformers 5 turns position ids that restart at 0 into a block-diagonal mask when no attention mask is given and
no cache is passed; if that stopped happening, a packed example would see the ones before it and its logits would
change. Both tests compare a packed row with each example run on its own, on the tiny Phi-3 model in float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINING = REPO_ROOT / "training"
GPU_RECIPE = TRAINING / "recipes" / "phi3.5-mini_full_gpu.yaml"
sys.path.insert(0, str(TRAINING))

import sft  # noqa: E402  (training/ is a code snapshot, not a package)
from tiny_model import build_tiny_model, chat_texts  # noqa: E402

TOLERANCE = 1e-4
# Small enough for a forward in milliseconds; 4 heads of 16 keep the attention shapes of a real model.
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


def _segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: a new one starts wherever the position id is 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


def _max_gap_per_example(
    packed: Any, alone: list[Any], segments: list[tuple[int, int]], *, shifted: bool = False
) -> list[float]:
    """Largest absolute difference between the packed row's values and each example's own, per example.

    ``shifted``: values scored against the next token (log-probabilities of the labels), one fewer per example;
    the packed row's value at an example's last token scores the next example's first one and is left out."""
    cut = 1 if shifted else 0
    pairs = zip(segments, alone, strict=True)
    return [float((packed[0, a : b - cut] - own[0]).abs().max()) for (a, b), own in pairs]


@pytest.fixture(scope="module")
def tiny_sdpa_model(tmp_path_factory: pytest.TempPathFactory, sample_split) -> tuple[Any, Any]:
    """The project's tiny Phi-3 model, loaded by the script's loader with the GPU recipe's attention."""
    from transformers import AutoTokenizer
    from trl import ModelConfig

    attention = yaml.safe_load(GPU_RECIPE.read_text())["attn_implementation"]
    assert attention == "sdpa", "this test runs the recipe's kernel on CPU; flash-attn needs a GPU test instead"
    folder = build_tiny_model(
        tmp_path_factory.mktemp("tiny-packing"), list(chat_texts(sample_split.train_path)), **SMALL
    )
    model_args = ModelConfig(model_name_or_path=str(folder), dtype="float32", attn_implementation=attention)
    model = sft.load_model(str(folder), model_args, sft.FinetuneSFTConfig(output_dir=str(folder), use_cpu=True))
    assert model.config._attn_implementation == "sdpa"
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _chat_ids(tokenizer: Any, path: Path, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:count]]
    return [tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False) for row in rows]


def test_packed_row_gives_each_example_its_own_logits(tiny_sdpa_model, sample_split) -> None:
    import torch

    model, tokenizer = tiny_sdpa_model
    examples = _chat_ids(tokenizer, sample_split.train_path, 3)
    assert len({len(ids) for ids in examples}) > 1, "examples of different lengths catch an off-by-one boundary"
    # Batch size 1, no padding, no attention mask: the layout TRL's padding-free collator produces.
    input_ids = torch.tensor([[token for ids in examples for token in ids]])
    restarting = torch.tensor([[p for ids in examples for p in range(len(ids))]])
    segments = _segments(restarting[0].tolist())
    with torch.no_grad():
        # use_cache=False as SFTTrainer.compute_loss passes it: with a cache transformers skips the packed mask.
        packed = model(input_ids=input_ids, position_ids=restarting, use_cache=False).logits
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits for ids in examples]
        # Control: the same row with running positions is one long causal sequence, so the later examples see the
        # earlier ones. If this matched too, the comparison above could not detect contamination.
        running = model(input_ids=input_ids, position_ids=torch.arange(input_ids.shape[1])[None], use_cache=False)
    gaps = _max_gap_per_example(packed, alone, segments)
    assert max(gaps) < TOLERANCE, gaps
    assert min(_max_gap_per_example(running.logits, alone, segments)[1:]) > 100 * TOLERANCE


def test_the_scripts_collator_and_loss_path_keep_packed_examples_apart(tmp_path: Path, sample_split) -> None:
    """The GPU recipe as the script builds it (CPU, float32, tiny width): TRL's padding-free collator output goes
    through SFTTrainer.compute_loss, and each token's log-probability matches the example's own."""
    import torch

    argv = [
        *("--config", str(GPU_RECIPE), "--output_dir", str(tmp_path), "--train_file", str(sample_split.train_path)),
        *("--eval_file", str(sample_split.test_path)),
        *("--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--max_length", "256"),
        *("--build_tiny_model", "true", "--tiny_hidden_size", "64", "--tiny_num_layers", "2"),
        *("--tiny_intermediate_size", "128"),
    ]
    trainer, _, _ = sft.build_trainer(*sft.parse_args(argv))
    assert trainer.model.config._attn_implementation == "sdpa" and trainer.padding_free
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[0]])  # one packed row: batch size 1 after flattening
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    segments = _segments(batch["position_ids"][0].tolist())
    assert len(segments) >= 2, "the first packed row should hold several conversations"

    def log_probs(inputs: dict[str, Any]) -> Any:
        """Per-token log-probabilities of the labels from the forward that SFTTrainer.compute_loss makes (its
        fused LM head gives no logits), caught with a hook so the test calls compute_loss exactly as training does."""
        seen: list[Any] = []
        hook = model.register_forward_hook(lambda _module, _args, output: seen.append(output))
        try:
            with torch.no_grad():
                trainer.compute_loss(model, dict(inputs))
        finally:
            hook.remove()
        return seen[-1].log_probs

    packed = log_probs(batch)
    alone = []
    for start, end in segments:
        one = {"input_ids": batch["input_ids"][0, start:end].tolist(), "seq_lengths": [end - start]}
        alone.append(log_probs(trainer.data_collator([one])))
    gaps = _max_gap_per_example(packed, alone, segments, shifted=True)
    assert max(gaps) < TOLERANCE, gaps
