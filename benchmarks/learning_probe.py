"""What the tiny LLaVA learns of each synthetic question type in a given budget (not a speed goal).

The demo's trained tiny model answers at the answer prior (yes/no at 50%); this probe is how that
was taken apart, kept so the next change to the tiny model or the synthetic set can be measured
the same way. It trains on in-memory synthetic questions (no shards, no accelerate: the model, the
collator and `answer_only_loss` are the pipeline's own) and reports, on held-out testdev
questions, the teacher-forced exact match per GQA detailed type: every answer token and the
closing `<end_of_turn>` predicted right, which is what greedy decoding would answer.

Two prompt formats:

* `chat` — the training format: `<image>\\n{question}\\nОтветь одним словом.` in Gemma's turns.
  The image comes first, so the question word that says what to look for («красная») can only
  meet the image inside the language model, and the answer position sits ~10 tokens after it.
* `word` — one hop: `<bos>` + image + the question's colour word, answered at the next token
  (only for templates that name a colour; `verify_exist_color` is the clean case).

    python benchmarks/learning_probe.py --templates verify_exist_color --format chat --mode full
    python benchmarks/learning_probe.py --templates verify_exist_color --format word --mode full
    python benchmarks/learning_probe.py --templates verify_exist_color --format word --then-chat 400 --mode full

Measured numbers are in the README of this directory ("Learning probes").
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, get_cosine_schedule_with_warmup

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from gqaru import synth  # noqa: E402
from gqaru.collate import (  # noqa: E402
    IGNORE_INDEX,
    EncodedSequence,
    SequencePlanner,
    TrainingCollator,
    TrainingSequence,
)
from gqaru.config import load_config  # noqa: E402
from gqaru.modeling import answer_only_loss, apply_lora, load_processor  # noqa: E402

COLOUR_WORDS = {colour.nom["f"] for colour, _ in synth.COLORS}
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass(frozen=True)
class Item:
    """One training or test sequence, encoded as the trainer's collator does, and its answers' types."""

    encoded: EncodedSequence
    types: tuple[tuple[str, str], ...]  # (detailed type, "yes/no" | "other") of each answer, in order


def synthetic_images(split: str, questions: int, templates: list[str] | None, seed: int) -> list[tuple[Any, Image.Image]]:
    """(SyntheticImage, decoded RGB image) pairs, as `gqaru synth` would write them."""
    return [
        (image, Image.open(io.BytesIO(synth.draw_scene(image.scene))).convert("RGB"))
        for image in synth.generate_split(split, questions, seed=seed, templates=templates)
    ]


def _types(row: dict[str, Any]) -> tuple[str, str]:
    return row["types"]["detailed"], "yes/no" if row["answer"] in ("да", "нет") else "other"


def chat_items(images: list, collator: TrainingCollator, questions_per_sequence: int) -> list[Item]:
    planner = SequencePlanner(collator.tokenizer, questions_per_sequence, max_seq_len=512)
    items = []
    for image, picture in images:
        for questions, tokens in planner.plan(image.rows):
            encoded = collator.encode(TrainingSequence(image.image_id, picture, questions, tokens))
            types = tuple(_types(question) for question in questions)
            items.append(Item(encoded, types))
    return items


def word_items(images: list, collator: TrainingCollator) -> list[Item]:
    """`<bos>` + image + the colour word of the question -> its answer, one question per sequence."""
    tokenizer = collator.tokenizer
    items = []
    for image, picture in images:
        pixel_values = collator.processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0]
        for row in image.rows:
            words = [word for word in row["question"].rstrip("?").split() if word.lower() in COLOUR_WORDS]
            if len(words) != 1:
                raise ValueError(f"--format word needs one colour word per question; got {row['question']!r}")
            prompt = [tokenizer.bos_token_id] + [collator.image_token_id] * collator.image_tokens
            prompt += tokenizer(" " + words[0].lower(), add_special_tokens=False).input_ids
            answer = tokenizer(" " + row["answer"], add_special_tokens=False).input_ids
            labels = [IGNORE_INDEX] * len(prompt) + answer
            encoded = EncodedSequence(prompt + answer, labels, pixel_values, (row["id"],), collator.image_tokens)
            items.append(Item(encoded, (_types(row),)))
    return items


def pad(items: list[Item], collator: TrainingCollator) -> dict[str, torch.Tensor]:
    batch = collator.pad([item.encoded for item in items])
    return {key: batch[key] for key in MODEL_INPUTS}


@torch.no_grad()
def exact_match(
    model: torch.nn.Module, items: list[Item], collator: TrainingCollator, batch_size: int = 32
) -> dict[str, dict[str, float]]:
    """Teacher-forced exact match per detailed type, for yes/no vs other answers, and overall."""
    model.eval()
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = pad(chunk, collator)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        predicted = model(**inputs, use_cache=False).logits.argmax(-1)[:, :-1]
        targets = batch["labels"][:, 1:]
        for row, item in enumerate(chunk):
            labelled = (targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
            # Split the labelled positions into answers: consecutive runs, one per question.
            runs: list[list[int]] = []
            for position in labelled:
                if runs and position == runs[-1][-1] + 1:
                    runs[-1].append(position)
                else:
                    runs.append([position])
            for (detailed, kind), run in zip(item.types, runs):
                correct = bool((predicted[row, run] == targets[row, run]).all())
                for key in (detailed, f"_{kind}", "_all"):
                    tally[key][0] += correct
                    tally[key][1] += 1
    model.train()
    return {key: {"accuracy": hits / total, "n": total} for key, (hits, total) in sorted(tally.items())}


def train(
    model: torch.nn.Module, items: list[Item], steps: int, lr: float, batch_size: int, collator: TrainingCollator, seed: int,
    log_every: int = 100, test: list[Item] | None = None, label: str = "",
) -> list[dict[str, Any]]:
    """AdamW + cosine schedule with 5% warmup, clip 1.0, answer-only loss; returns the log."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    rng = random.Random(seed)
    order: list[int] = []
    log, window, started = [], [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(items)), len(items))
        batch = pad([items[order.pop()] for _ in range(batch_size)], collator)
        loss_sum, count = answer_only_loss(model, batch)
        optimizer.zero_grad()
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss_sum.item() / count)
        if step % log_every == 0 or step == steps:
            entry = {"stage": label, "step": step, "loss": sum(window) / len(window),
                     "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
            if test is not None:
                entry["held_out"] = exact_match(model, test, collator)["_all"]["accuracy"]
            print(json.dumps(entry), flush=True)
            log.append(entry)
            window = []
    return log


def probe(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    processor = load_processor(args.model)
    collator = TrainingCollator(processor)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    if args.mode == "lora":
        model = apply_lora(model, load_config(REPO_ROOT / "configs/demo_train.yaml").lora)
    templates = args.templates.split(",") if args.templates else None
    train_images = synthetic_images("train", args.train_questions, templates, args.seed)
    test_images = synthetic_images("testdev", args.test_questions, templates, args.seed)

    def items(images: list, fmt: str) -> list[Item]:
        return word_items(images, collator) if fmt == "word" else chat_items(images, collator, args.questions_per_sequence)

    stages = [(args.format, args.steps)] + ([("chat", args.then_chat)] if args.then_chat else [])
    log = []
    for fmt, steps in stages:
        test = items(test_images, fmt)
        log += train(model, items(train_images, fmt), steps, args.lr, args.batch_size, collator, args.seed,
                     test=test, label=fmt)  # fmt: skip
    return {"settings": vars(args), "log": log, "held_out": exact_match(model, test, collator)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny-llava", help="a tiny model from `gqaru tiny-model`")
    parser.add_argument("--templates", default="", help="comma-separated synth template names (default: all)")
    parser.add_argument("--format", choices=["chat", "word"], default="chat")
    parser.add_argument("--then-chat", type=int, default=0, metavar="STEPS", help="a second stage in chat format")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora", help="lora: the demo's LoRA section")
    parser.add_argument("--steps", type=int, default=650)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3 for lora, 1e-3 for full")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions-per-sequence", type=int, default=1)
    parser.add_argument("--train-questions", type=int, default=20000)
    parser.add_argument("--test-questions", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-3 if args.mode == "lora" else 1e-3
    torch.set_num_threads(args.threads)
    result = probe(args)
    for key, value in result["held_out"].items():
        print(f"{key:22s} {value['n']:6d} {value['accuracy']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
