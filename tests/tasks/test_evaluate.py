"""Held-out loss/perplexity and the generation check, on real tiny Phi-3 models (no download).

An untrained model (random weights, the project's own tokenizer and Phi-3 chat template) is the model that never
stops generating (the commonest complaint about fine-tuned Phi-3): the check must catch it, and the gate must
refuse it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tasks.config import GateConfig
from tasks.evaluate import EvalResult, evaluate_model, read_jsonl
from tasks.gate import decide


@pytest.fixture(scope="module")
def untrained_model(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(repo_root / "training"))
    try:
        from tiny_model import build_tiny_model, chat_texts
    finally:
        sys.path.remove(str(repo_root / "training"))
    folder = tmp_path_factory.mktemp("untrained")
    build_tiny_model(folder, chat_texts(repo_root / "data" / "sample" / "chat_sample.jsonl"))
    return folder


@pytest.fixture(scope="module")
def test_split(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = (repo_root / "data" / "sample" / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    path = tmp_path_factory.mktemp("split") / "test.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_untrained_model_scores_near_chance_and_never_ends(untrained_model: Path, test_split: Path) -> None:
    result = evaluate_model(untrained_model, test_split, "m1", label="untrained", num_prompts=3, max_new_tokens=12)
    assert result.examples == len(read_jsonl(test_split))
    assert result.tokens > result.examples
    # Random weights: the loss is close to that of a uniform guess over the vocabulary.
    assert 0.5 * math.log(4096) < result.loss < 1.5 * math.log(4096)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-4)
    assert len(result.generations) == 3
    assert all(not g.ended and g.new_tokens == 12 and g.latency_s > 0 for g in result.generations)
    assert result.ended_share == 0.0
    decision = decide(result, None, GateConfig(min_ended_share=0.5))
    assert not decision.promote and "does not stop" in decision.reason


def test_the_same_model_on_the_same_split_gives_the_same_numbers(untrained_model: Path, test_split: Path) -> None:
    first = evaluate_model(untrained_model, test_split, "m1", label="a", num_prompts=1, max_new_tokens=4)
    second = evaluate_model(untrained_model, test_split, "m1", label="b", num_prompts=1, max_new_tokens=4)
    assert first.loss == second.loss and first.generations[0].reply == second.generations[0].reply
    # The result survives the trip through Prefect's result store (a plain dict) unchanged.
    assert EvalResult.from_dict(first.to_dict()) == first


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path, test_split: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json missing"):
        evaluate_model(tmp_path, test_split, "m1", label="x", num_prompts=1, max_new_tokens=4)
