#!/usr/bin/env python3
"""Write the shipped sample chat dataset, ``data/sample/chat_sample.jsonl``, deterministically.

    python3 data/sample/make_sample.py            # rewrite chat_sample.jsonl (same bytes every time)
    python3 data/sample/make_sample.py --check    # exit 1 if the committed file differs from what this writes

One topic: the finetune-phi project and its toolchain. Each fact has one short answer and several
paraphrased questions that all map to that same answer, so a tiny model trained for a few minutes on a
CPU has something it can learn. Rows follow UltraChat 200k's format (``prompt``, ``prompt_id``,
``messages``); about one in seven conversations opens with a system message and some have two
user/assistant exchanges. ``prompt_id`` is the sha256 of the whole conversation rather than of the prompt
alone (UltraChat hashes the prompt), so two conversations that open with the same question keep
distinct ids. The text is the project's own, under CC0-1.0 (see README.md beside this file).

Standard library only, so it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "chat_sample.jsonl"
SEED = 20261125

# Templates for topics that have a noun-phrase subject; each topic uses three of them, chosen in turn.
TEMPLATES = (
    "What is {s}?",
    "Can you explain {s}?",
    "Explain {s} in one or two sentences.",
    "Tell me about {s}.",
    "Quick question: what is {s}?",
    "I'm new to this. What is {s}?",
)
TEMPLATES_PER_TOPIC = 3

SYSTEM_PROMPTS = (
    "You are the finetune-phi assistant. Answer briefly and accurately.",
    "You answer questions about the finetune-phi project in one to three sentences.",
    "You are a helpful assistant for engineers who use finetune-phi.",
)

# (key, subject for the templates or None, hand-written questions, the one answer)
TOPICS: tuple[tuple[str, str | None, tuple[str, ...], str], ...] = (
    (
        "greeting",
        None,
        (
            "Hello! Who are you?",
            "Hi, who am I talking to?",
            "Hey there, what can you do?",
            "Good morning! What are you?",
            "Hello, what do you know about?",
            "Who are you and what can you help me with?",
        ),
        "I am the finetune-phi assistant, a small model fine-tuned on this project's own notes. "
        "Ask me about Prefect, MLflow, LoRA, the /score endpoint or the rollout.",
    ),
    (
        "project",
        "finetune-phi",
        ("What does finetune-phi do?", "What is this project for?", "Give me a one-line summary of finetune-phi."),
        "finetune-phi takes Phi-3 or Phi-3.5-mini from a chat dataset to a fine-tuned model behind an online "
        "endpoint, in one Prefect 3 flow run, on a local or an Azure ML backend.",
    ),
    (
        "prefect_flow",
        "a Prefect flow",
        ("What is a Prefect flow?", "How do I define a flow in Prefect?", "What does the @flow decorator do?"),
        "A Prefect flow is a Python function decorated with @flow. It orchestrates tasks, and each flow run is "
        "tracked with its state, logs and artifacts.",
    ),
    (
        "prefect_task",
        "a Prefect task",
        ("What does the @task decorator do?", "How is a task different from a flow in Prefect?"),
        "A Prefect task is a function decorated with @task: one step of a flow, with its own retries, timeout, "
        "caching and state.",
    ),
    (
        "retries",
        "a task retry in Prefect",
        ("How do retries work in Prefect?", "What happens when a task has retries=3?", "Which faults are retried?"),
        "A task with retries=3 runs again up to three times after a failure, waiting retry_delay_seconds between "
        "tries. finetune-phi retries only transient faults such as timeouts and HTTP 429.",
    ),
    (
        "caching",
        "task caching in Prefect",
        ("How does Prefect skip work that was already done?", "What is a cache key?"),
        "Prefect skips a task when its cache key matches an earlier run. finetune-phi builds keys from content "
        "hashes of the data and the recipe, never from Python objects.",
    ),
    (
        "artifacts",
        "a Prefect artifact",
        ("Where can I see the dataset report and metrics of a run?", "What does the flow publish to the Prefect UI?"),
        "An artifact is a table, markdown page or image attached to a flow run. finetune-phi publishes the dataset "
        "report, the training metrics and the rollout decisions as artifacts.",
    ),
    (
        "transaction",
        "a Prefect transaction",
        ("What does on_rollback do in Prefect?", "How does the flow undo a failed step?"),
        "A Prefect transaction groups tasks; if a later step fails, their on_rollback hooks run. The rollout uses "
        "them to move traffic back to the previous deployment.",
    ),
    (
        "mlflow",
        "MLflow",
        ("What is MLflow used for here?", "Where are runs and metrics tracked?"),
        "MLflow tracks runs, parameters and metrics, and keeps a model registry. Locally finetune-phi uses a SQLite "
        "store in .finetune-phi/mlflow.",
    ),
    (
        "registry",
        "the MLflow model registry",
        ("What is a registered model version?", "How are trained models stored and versioned?"),
        "The MLflow model registry keeps numbered versions of a named model, each linked back to the run and the "
        "dataset manifest that produced it.",
    ),
    (
        "alias",
        "an MLflow alias",
        ("What is models:/finetune-phi@champion?", "How does promotion work in the registry?"),
        "An alias is a movable name on a model version, such as champion or candidate. Deployments load "
        "models:/finetune-phi@champion, so promoting a model means moving the alias.",
    ),
    (
        "champion",
        "the champion model",
        ("What is the difference between the champion and the candidate?", "What is the candidate model?"),
        "The candidate is the newly trained version; the champion is the one serving users. The candidate becomes "
        "champion only if it passes the gate.",
    ),
    (
        "gate",
        "the promotion gate",
        ("When is a new model promoted?", "How does the gate decide?"),
        "The gate evaluates the candidate and the champion on the same test set. It promotes the candidate when its "
        "eval loss is at most 2% worse, and logs the numbers behind its decision.",
    ),
    (
        "evaluation",
        "the evaluation step",
        ("How is a fine-tuned model evaluated?", "What does evaluation measure?"),
        "Evaluation computes the eval loss on the held-out test split and generates answers to a few test prompts, "
        "checking that each reply ends.",
    ),
    (
        "lora",
        "LoRA",
        (
            "What does LoRA stand for?",
            "How does low-rank adaptation work?",
            "Why use LoRA instead of full fine-tuning?",
        ),
        "LoRA, low-rank adaptation, freezes the base model and trains small low-rank matrices added to chosen "
        "layers, so fine-tuning needs far less memory.",
    ),
    (
        "lora_r",
        "lora_r",
        ("What does lora_alpha do?", "How do I choose the LoRA rank?"),
        "lora_r is the rank of the adapter matrices: higher gives more capacity and uses more memory. lora_alpha "
        "scales the update and is usually twice lora_r.",
    ),
    (
        "qlora",
        "QLoRA",
        ("How is QLoRA different from LoRA?", "Can I fine-tune with a 4-bit base model?"),
        "QLoRA is LoRA on top of a base model quantised to 4 bits, which cuts memory further so larger models fit "
        "on one GPU.",
    ),
    (
        "full_ft",
        "full fine-tuning",
        ("Does finetune-phi support full fine-tuning?", "Full fine-tuning or LoRA: which should I use?"),
        "Full fine-tuning updates every weight and needs much more memory; LoRA trains only small adapters. "
        "finetune-phi supports both through its recipes.",
    ),
    (
        "recipe",
        "a training recipe",
        ("Where do I set the learning rate and epochs?", "How do I start a new experiment?"),
        "A recipe is a YAML file of training settings such as model, learning rate, epochs and LoRA rank. A new "
        "experiment is a new recipe; the training script stays the same.",
    ),
    (
        "training_job",
        "the training job",
        ("Where does training run?", "How is the training script launched?"),
        "Locally the training script runs as a subprocess with streamed logs; on Azure ML the same script runs as "
        "a command job on a GPU cluster.",
    ),
    (
        "phi3",
        "Phi-3",
        ("What is Phi-3.5-mini?", "Which base model does this project fine-tune?", "How big is Phi-3.5-mini?"),
        "Phi-3 and Phi-3.5-mini are small language models from Microsoft. Phi-3.5-mini has about 3.8 billion "
        "parameters and a chat template with <|user|>, <|assistant|> and <|end|> tokens.",
    ),
    (
        "end_token",
        "the end token",
        ("Why does my fine-tuned model never stop generating?", "Why does <|end|> matter?"),
        "The model must learn to emit <|end|> after each answer, or it never stops generating. Training keeps the "
        "end token and the smoke test checks that replies end.",
    ),
    (
        "sft",
        "TRL's SFTTrainer",
        ("How does supervised fine-tuning work?", "What library trains the model?"),
        "TRL's SFTTrainer does supervised fine-tuning on chat data: it applies the chat template to each "
        "conversation and trains the model to produce the assistant turns.",
    ),
    (
        "packing",
        "packing",
        ("Why pack training examples?", "Can packed examples see each other?"),
        "Packing joins several short examples into one sequence to waste less padding. finetune-phi uses "
        "position-id packing so examples cannot attend to each other.",
    ),
    (
        "format",
        "the dataset format",
        ("What does a training row look like?", "Which fields does each row need?"),
        "Each row has prompt, prompt_id and messages, a list of turns with role and content, as in UltraChat 200k. "
        "The roles are system, user and assistant.",
    ),
    (
        "validation",
        "data validation",
        ("Which rows does prepare-data drop?", "What happens to invalid rows?"),
        "The prepare-data step drops rows with bad roles, empty content or turns that do not alternate, counts each "
        "reason, and fails if fewer than 90% of the rows are valid.",
    ),
    (
        "split",
        "the train/test split",
        ("How is the data split?", "Is the split reproducible?"),
        "The data is split 80/20 into train and test with a fixed seed, so the same input and seed always give "
        "byte-identical files.",
    ),
    (
        "manifest",
        "the dataset manifest",
        ("What is in manifest.json?", "What is the manifest hash used for?"),
        "The manifest lists the row counts, rejected rows by reason, the source and the sha256 of each file. Its own "
        "hash is the cache key that later steps use.",
    ),
    (
        "bluegreen",
        "a blue/green rollout",
        ("How is a new model deployed without downtime?", "Does a deploy delete the endpoint?"),
        "A blue/green rollout deploys the new model next to the live one, tests it, then shifts traffic in steps. "
        "The old deployment stays until the new one is proven.",
    ),
    (
        "traffic",
        "the traffic shift",
        ("How does traffic move to a new deployment?", "What are the traffic steps?"),
        "Traffic moves to the new deployment in steps of 10%, 50% and 100%. After each step the rollout sends test "
        "requests and checks the error rate.",
    ),
    (
        "rollback",
        "a rollback",
        ("What happens if the new deployment fails?", "How does the rollout recover from errors?"),
        "If errors appear during the rollout, traffic goes back to the previous deployment at once and the new one "
        "is removed, so users see no downtime.",
    ),
    (
        "score",
        "the /score endpoint",
        ("How do I call the model over HTTP?", "What body does /score accept?", "What does /score return?"),
        'POST /score takes {"input_data": [question], "params": {...}} and returns a JSON list with one generated '
        "text per input, like the Azure ML sample.",
    ),
    (
        "auth",
        "endpoint authentication",
        ("How do I send the endpoint key?", "What happens with a wrong key?"),
        "Send the key as Authorization: Bearer <key>. A wrong or missing key gets 401, and the key never appears "
        "in a log.",
    ),
    (
        "pin_header",
        "the azureml-model-deployment header",
        ("How do I call one specific deployment?", "Can I bypass the traffic split?"),
        "Add the header azureml-model-deployment: <name> to send a request to that deployment, whatever the "
        "traffic split.",
    ),
    (
        "openai",
        "the OpenAI-compatible API",
        ("Can I use the OpenAI client with the endpoint?", "Does the endpoint support streaming?"),
        "The endpoint also serves POST /v1/chat/completions, with streaming, and GET /v1/models, so any OpenAI "
        "client can talk to the model.",
    ),
    (
        "promptflow",
        "Prompt flow",
        ("What is flow_chat?", "How does Prompt flow talk to the model?"),
        "Prompt flow is Microsoft's tool for building LLM apps as flows of nodes. finetune-phi ships a chat flow in "
        "flow_chat/ that calls the endpoint with the chat history.",
    ),
    (
        "pf_serve",
        None,
        (
            "How do I chat with the model through Prompt flow?",
            "How do I serve the chat flow?",
            "Which command starts the Prompt flow chat?",
            "How do I run pf flow serve?",
            "How do I open the chat UI?",
        ),
        "Run pf flow serve --source flow_chat --port 8080 --host localhost to chat with the model through Prompt "
        "flow.",
    ),
    (
        "pf_retirement",
        "Prompt flow's retirement",
        ("Is Prompt flow still maintained?", "What happens when Prompt flow is retired?"),
        "Prompt flow's feature development ended in April 2026 and it turns read-only in April 2027, so the "
        "endpoint is OpenAI-compatible and users can switch clients.",
    ),
    (
        "local_backend",
        "the local backend",
        ("Can I run everything on my laptop?", "Do I need a GPU or the cloud?"),
        "The local backend runs everything on one machine: a subprocess training job, MLflow on SQLite and an "
        "endpoint server on 127.0.0.1, with no cloud and no GPU needed.",
    ),
    (
        "azureml_backend",
        "the azureml backend",
        ("How does finetune-phi run on Azure?", "What does the Azure ML backend do?"),
        "The azureml backend runs the same steps with azure-ai-ml: a command job on a compute cluster, the Azure ML "
        "registry and a managed online endpoint.",
    ),
    (
        "state_dir",
        "the state folder",
        ("Where does finetune-phi keep its files?", "What is .finetune-phi?", "How do I start from scratch?"),
        "All local state lives in .finetune-phi/: data, jobs, the MLflow store and the endpoint's deployments and "
        "keys. Delete it to start fresh.",
    ),
    (
        "secrets",
        "secret handling",
        ("Where do the endpoint keys go?", "Can I put the API key in the config file?"),
        "Keys never go in config files. They come from the environment, a Prefect Secret block or a 0600 file in "
        "the state folder.",
    ),
    (
        "identity",
        "the managed identity",
        ("How does the flow sign in to Azure?", "Are passwords stored for Azure?"),
        "On Azure the endpoint uses a user-assigned managed identity, and the flow signs in with "
        "DefaultAzureCredential, so no passwords are stored.",
    ),
    (
        "run_cmd",
        None,
        (
            "How do I run the whole pipeline?",
            "How do I start finetune-phi?",
            "What is the command to run everything locally?",
            "How do I get started with finetune-phi?",
            "Which command trains and deploys the model?",
        ),
        "Run python3 scripts/dev.py run. It creates .venv, installs the pinned stack and runs the whole pipeline on "
        "the local backend.",
    ),
    (
        "test_cmd",
        None,
        (
            "How do I run the tests?",
            "How do I run the test suite?",
            "What does CI run?",
            "Which command checks that everything works?",
            "How do I test finetune-phi?",
        ),
        "Run python3 scripts/dev.py test. It sets up the environment and runs the whole test suite, as CI does.",
    ),
    (
        "prepare_cmd",
        None,
        (
            "How do I prepare the dataset alone?",
            "How do I run only the data step?",
            "Which command prints the dataset report?",
            "How do I check my dataset before training?",
            "What does finetune-phi prepare-data do?",
        ),
        "Run finetune-phi prepare-data --config configs/local.yaml. It prints the row counts, the rejected rows by "
        "reason and the manifest hash.",
    ),
    (
        "config",
        "the configuration",
        ("Where are the settings?", "How do I override a setting?", "How do I change the endpoint port?"),
        "Settings live in configs/local.yaml or configs/azureml.yaml. Override any field with --set "
        "section.field=value or FINETUNE_PHI__SECTION__FIELD.",
    ),
    (
        "smoke",
        "the smoke test",
        ("How do I know the deployment works?", "What does the smoke test check?"),
        "The smoke test sends a few prompts to the live endpoint and checks that each reply arrives within the "
        "latency budget and ends properly.",
    ),
    (
        "throttle",
        "HTTP 429",
        ("What happens when the endpoint is overloaded?", "Why did I get a 429?"),
        "Each deployment accepts a limited number of concurrent requests, 3 by default as in the Azure sample. "
        "Beyond its queue it answers 429, and clients should retry with backoff.",
    ),
    (
        "quota",
        "the quota check",
        ("Why check quota before deploying?", "What if my Azure subscription lacks cores?"),
        "Before deploying on Azure, finetune-phi checks the VM quota, so a deployment does not fail halfway for "
        "lack of cores.",
    ),
)

# Follow-ups that belong together: (first topic, second topic). Each pair yields two two-exchange chats.
FOLLOW_UPS = (
    ("greeting", "project"),
    ("prefect_flow", "prefect_task"),
    ("prefect_task", "retries"),
    ("caching", "manifest"),
    ("mlflow", "registry"),
    ("registry", "alias"),
    ("alias", "champion"),
    ("champion", "gate"),
    ("gate", "evaluation"),
    ("lora", "lora_r"),
    ("lora", "qlora"),
    ("full_ft", "recipe"),
    ("recipe", "training_job"),
    ("phi3", "end_token"),
    ("sft", "packing"),
    ("format", "validation"),
    ("validation", "split"),
    ("bluegreen", "traffic"),
    ("traffic", "rollback"),
    ("score", "auth"),
    ("auth", "pin_header"),
    ("promptflow", "pf_serve"),
    ("promptflow", "pf_retirement"),
    ("local_backend", "state_dir"),
    ("azureml_backend", "identity"),
    ("run_cmd", "test_cmd"),
)
CHATS_PER_FOLLOW_UP = 2
SYSTEM_EVERY = 7  # one single-exchange chat in seven opens with a system message


def questions(topic_index: int) -> list[str]:
    """The topic's hand-written questions plus three template questions (rotating), without repeats."""
    _, subject, hand, _ = TOPICS[topic_index]
    found = list(hand)
    if subject is not None:
        for k in range(TEMPLATES_PER_TOPIC):
            found.append(TEMPLATES[(topic_index + k) % len(TEMPLATES)].format(s=subject))
    return list(dict.fromkeys(found))


def _row(messages: list[dict[str, str]]) -> dict[str, object]:
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    # UltraChat's key order inside a turn: content, then role.
    turns = [{"content": m["content"], "role": m["role"]} for m in messages]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(canonical.encode()).hexdigest(), "messages": turns}


def conversations() -> list[dict[str, object]]:
    rng = random.Random(SEED)
    by_key = {key: index for index, (key, *_rest) in enumerate(TOPICS)}
    rows: list[dict[str, object]] = []
    serial = 0
    for index, (_, _, _, answer) in enumerate(TOPICS):
        for question in questions(index):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if serial % SYSTEM_EVERY == SYSTEM_EVERY - 1:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[serial % len(SYSTEM_PROMPTS)]})
            rows.append(_row(messages))
            serial += 1
    for first, second in FOLLOW_UPS:
        a, b = by_key[first], by_key[second]
        qa, qb = questions(a), questions(b)
        picks = {(rng.randrange(len(qa)), rng.randrange(len(qb))) for _ in range(CHATS_PER_FOLLOW_UP * 4)}
        for ia, ib in sorted(picks)[:CHATS_PER_FOLLOW_UP]:
            messages = [
                {"role": "user", "content": qa[ia]},
                {"role": "assistant", "content": TOPICS[a][3]},
                {"role": "user", "content": qb[ib]},
                {"role": "assistant", "content": TOPICS[b][3]},
            ]
            rows.append(_row(messages))
    rng.shuffle(rows)
    return rows


def render() -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in conversations())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python3 data/sample/make_sample.py", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    tmp = OUTPUT.with_name(f".{OUTPUT.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    tmp.replace(OUTPUT)  # rename: a crash never leaves half a file
    rows = text.count("\n")
    print(f"wrote {OUTPUT} ({rows} conversations, {len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
