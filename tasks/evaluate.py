"""Evaluation: held-out loss and perplexity, and a generation check that replies end.

The same :func:`evaluate_model` runs on the candidate and on the champion, on the same test split, so the gate
compares like with like. A champion's recorded numbers are reused only when they were
computed on the same dataset manifest; otherwise it is evaluated again from its model folder.

The generation check exists because fine-tuned Phi-3 models that never stop generating are the commonest
complaint about the sample: a reply must be non-empty and end with the end-of-turn token
before ``max_new_tokens``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.backends import get_backend
from tasks.backends.base import ModelVersion
from tasks.caching import content_key_fn, evaluation_cache_key
from tasks.config import Settings
from tasks.retry import with_step_retries

# Tags written on a registered model version, so a later run can reuse the numbers on the same data.
TAG_LOSS = "heldout_loss"
TAG_PERPLEXITY = "heldout_perplexity"
TAG_ENDED_SHARE = "heldout_ended_share"
TAG_MANIFEST = "heldout_manifest_sha256"
END_TOKENS = ("<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class GenerationCheck:
    prompt: str
    reply: str
    ended: bool  # an end token came before max_new_tokens
    new_tokens: int
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.ended and bool(self.reply.strip())


@dataclass(frozen=True)
class EvalResult:
    """One model's numbers on one test split."""

    label: str  # "candidate" / "champion v3": for messages
    manifest_sha256: str
    loss: float
    perplexity: float
    examples: int
    tokens: int
    generations: list[GenerationCheck] = field(default_factory=list)
    reused: bool = False  # taken from the registry's tags rather than computed now

    @property
    def ended_share(self) -> float:
        if not self.generations:
            return 1.0 if self.reused else 0.0
        return sum(g.ok for g in self.generations) / len(self.generations)

    @property
    def mean_latency_s(self) -> float:
        return sum(g.latency_s for g in self.generations) / len(self.generations) if self.generations else 0.0

    def metric(self, name: str) -> float:
        return self.perplexity if name == "perplexity" else self.loss

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ended_share"] = self.ended_share
        data["mean_latency_s"] = self.mean_latency_s
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["generations"] = [GenerationCheck(**g) for g in data.get("generations", [])]
        return cls(**known)

    def registry_tags(self) -> dict[str, str]:
        return {
            TAG_LOSS: f"{self.loss:.6f}",
            TAG_PERPLEXITY: f"{self.perplexity:.6f}",
            TAG_ENDED_SHARE: f"{self.ended_share:.4f}",
            TAG_MANIFEST: self.manifest_sha256,
        }


def recorded_result(tags: dict[str, str], manifest_sha256: str, label: str) -> EvalResult | None:
    """The numbers recorded on a model version, if they were computed on this very test split."""
    if tags.get(TAG_MANIFEST) != manifest_sha256:
        return None
    try:
        loss = float(tags[TAG_LOSS])
        perplexity = float(tags[TAG_PERPLEXITY])
    except (KeyError, ValueError):
        return None
    return EvalResult(label, manifest_sha256, loss, perplexity, examples=0, tokens=0, reused=True)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _end_token_ids(tokenizer: Any) -> list[int]:
    ids = []
    vocab = tokenizer.get_vocab()
    for token in END_TOKENS:
        if token in vocab:
            ids.append(vocab[token])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _max_length(tokenizer: Any, model: Any, cap: int = 2048) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or cap
    return int(min(limit, cap, tokenizer.model_max_length or cap))


def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Mean next-token cross-entropy over whole formatted conversations, and the number of tokens scored."""
    import torch

    max_length = _max_length(tokenizer, model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
            if hasattr(ids, "keys"):  # some tokenizers answer a BatchEncoding
                ids = ids["input_ids"]
            ids = list(ids)[:max_length]
            if len(ids) < 2:
                continue
            tensor = torch.tensor([ids])
            out = model(input_ids=tensor, labels=tensor)
            scored = len(ids) - 1
            total += float(out.loss) * scored
            count += scored
    if count == 0:
        raise ValueError("the test split has no conversation long enough to score; prepare the data again")
    return total / count, count


def generation_check(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], num_prompts: int, max_new_tokens: int
) -> list[GenerationCheck]:
    """Greedy replies to the first user turns of ``num_prompts`` test conversations."""
    import torch

    end_ids = _end_token_ids(tokenizer)
    checks = []
    for row in rows[:num_prompts]:
        messages = [m for m in row["messages"] if m["role"] == "system"][:1]
        user = next(m for m in row["messages"] if m["role"] == "user")
        messages.append(user)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        tensor = torch.tensor([list(ids)])
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_ids or None,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end_ids or [0])[0],
            )
        latency = time.perf_counter() - started
        new = output[0][tensor.shape[1] :].tolist()
        ended = any(t in end_ids for t in new)
        if ended:
            new = new[: next(i for i, t in enumerate(new) if t in end_ids)]
        reply = tokenizer.decode(new, skip_special_tokens=True)
        checks.append(GenerationCheck(user["content"], reply, ended, len(new), round(latency, 4)))
    return checks


def evaluate_model(
    model_dir: str | Path,
    test_path: str | Path,
    manifest_sha256: str,
    *,
    label: str,
    num_prompts: int,
    max_new_tokens: int,
) -> EvalResult:
    """Load a Hugging Face model folder and measure it on the test split (CPU-friendly, batch of one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir} (config.json missing); was the training job's output kept?")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    rows = read_jsonl(test_path)
    if not rows:
        raise ValueError(f"the test split {test_path} is empty; prepare the data with a larger test share")
    loss, tokens = heldout_loss(model, tokenizer, rows)
    generations = generation_check(model, tokenizer, rows, num_prompts, max_new_tokens)
    perplexity = math.exp(min(loss, 50.0))
    return EvalResult(label, manifest_sha256, round(loss, 6), round(perplexity, 6), len(rows), tokens, generations)


def evaluate_version(settings: Settings, version: ModelVersion, dataset: dict[str, Any], label: str) -> dict[str, Any]:
    """:func:`evaluate_model` of a registered version's folder on the dataset's test split, as a plain dict."""
    folder = get_backend(settings).model_folder(version)
    result = evaluate_model(
        folder,
        dataset["test_path"],
        dataset["sha256"],
        label=label,
        num_prompts=settings.evaluation.num_prompts,
        max_new_tokens=settings.evaluation.max_new_tokens,
    )
    return result.to_dict()


@task(name="evaluate-candidate", cache_key_fn=content_key_fn, persist_result=True)
def evaluate_candidate_task(
    settings: Settings, version: ModelVersion, dataset: dict[str, Any], content_key: str
) -> dict[str, Any]:
    return evaluate_version(settings, version, dataset, f"candidate v{version.version}")


@task(name="evaluate-champion", cache_policy=NO_CACHE, persist_result=False)
def evaluate_champion_task(
    settings: Settings, champion: ModelVersion | None, candidate: ModelVersion, dataset: dict[str, Any]
) -> dict[str, Any] | None:
    """The champion's numbers on this test split: recorded ones if computed on the same manifest, else fresh. None
    when there is no champion, or the champion is the candidate itself (nothing to compare it with)."""
    if champion is None or champion.version == candidate.version:
        return None
    label = f"champion v{champion.version}"
    recorded = recorded_result(champion.tags, dataset["sha256"], label)
    if recorded is not None:
        get_run_logger().info("reusing %s's numbers recorded on the same test split", label)
        return recorded.to_dict()
    return evaluate_version(settings, champion, dataset, label)


@task(name="record-evaluation", cache_policy=NO_CACHE, persist_result=False)
def record_evaluation_task(settings: Settings, job_id: str, evaluation: dict[str, Any]) -> ModelVersion:
    """Write the held-out numbers on the model version, so a later run on the same data can reuse them."""
    tags = EvalResult.from_dict(evaluation).registry_tags()
    return get_backend(settings).register_model(job_id, tags)


def evaluate_candidate_step(
    settings: Settings, job_id: str, version: ModelVersion, dataset: dict[str, Any]
) -> tuple[dict[str, Any], ModelVersion]:
    """The flow's evaluation step: the candidate's numbers (cached on its job, the test split and the evaluation
    settings) and its version with them recorded (a cached evaluation's numbers are there already)."""
    key = evaluation_cache_key(settings, job_id, dataset["sha256"])
    state = evaluate_candidate_task(settings, version, dataset, key, return_state=True)
    candidate = state.result()
    if state.name != "Cached":
        version = with_step_retries(record_evaluation_task, settings.retry)(settings, job_id, candidate)
    return candidate, version


__all__ = [
    "EvalResult",
    "GenerationCheck",
    "evaluate_candidate_step",
    "evaluate_candidate_task",
    "evaluate_champion_task",
    "evaluate_model",
    "evaluate_version",
    "generation_check",
    "heldout_loss",
    "record_evaluation_task",
    "recorded_result",
]
