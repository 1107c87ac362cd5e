"""What the tiny LLaVA learns of each synthetic question type in a given budget (not a speed goal).

The demo's trained tiny model answers at the answer prior (yes/no at 50%); this probe is how that
was taken apart, kept so the next change to the tiny model or the synthetic set can be measured
the same way. It trains on in-memory synthetic questions (no shards, no accelerate: the model, the
collator and `answer_only_loss` are the pipeline's own) and reports, on held-out testdev
questions, the teacher-forced exact match per GQA detailed type: every answer token and the
closing `<end_of_turn>` predicted right, which is what greedy decoding would answer.

Formats, one per stage (`--stages FORMAT:STEPS,...` runs them in order on one model):

* `chat` — the training format: `<image>\\n{question}\\nОтветь одним словом.` in Gemma's turns.
  The image comes first, so the question word that says what to look for («красная») can only
  meet the image inside the language model, and the answer position sits ~10 tokens after it.
* `word` — one hop: `<bos>` + image + the question's colour word, answered at the next token
  (only for templates that name a colour; `verify_exist_color` is the clean case).
* `text` — the control: the chat format with the image replaced by the scene written out in words
  («фон белый; красный круг слева вверху большой; ...»). Perfect perception, so what it cannot
  learn is the language model's part, not the vision path's.
* `copy` — the chat format, but the model answers with the question's own content words (colour,
  shape, size, background and place words, in question order) instead of the answer: a reading
  stage that builds the second hop (the answer position reads the question) without the image and
  without the task's answers. Questions with no such word are left out.
* `caption` — `<bos>` + image + a caption of every object in random order, colour and shape
  words in random order, then side and size; every caption token is trained (LLaVA's stage-1
  kind of data). Held out: each object's shape after its colour word, and its colour after its shape word.

    python benchmarks/learning_probe.py --templates verify_exist_color --stages chat:650 --mode full
    python benchmarks/learning_probe.py --templates verify_exist_color --stages word:400,chat:400 --mode full
    python benchmarks/learning_probe.py --templates verify_exist_color --stages copy:300,chat:600 --mode full
    python benchmarks/learning_probe.py --templates verify_exist_color --stages copy:300,word:400,chat:600 \
        --mode lora --base-stages 2
    python benchmarks/learning_probe.py --stages text:1000 --mode full
    python benchmarks/learning_probe.py --stages caption:2500,chat:650 --mode full --train-questions 80000

Measured numbers are in the README of this directory ("Learning probes").
"""

from __future__ import annotations

import argparse
import dataclasses
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

from gqaru.standins import synth  # noqa: E402
from gqaru.collate import (  # noqa: E402
    IGNORE_INDEX,
    EncodedSequence,
    SequencePlanner,
    TrainingCollator,
    TrainingSequence,
)
from gqaru.config import load_config  # noqa: E402
from gqaru.modeling import answer_only_loss, apply_lora, load_processor  # noqa: E402
from gqaru.standins.pretrain import MODEL_INPUTS, content_words  # noqa: E402
from gqaru.prompts import TokenizedConversation  # noqa: E402

COLOUR_WORDS = {colour.nom["f"] for colour, _ in synth.COLORS}


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


def copy_items(images: list, collator: TrainingCollator, questions_per_sequence: int) -> list[Item]:
    """The chat format with each answer replaced by the question's `content_words`."""
    copied = []
    for image, picture in images:
        rows = [{**row, "answer": " ".join(words)} for row in image.rows if (words := content_words(row["question"]))]
        if rows:
            copied.append((dataclasses.replace(image, rows=rows), picture))
    return chat_items(copied, collator, questions_per_sequence)


def _image_prompt(collator: TrainingCollator, picture: Image.Image) -> tuple[list[int], torch.Tensor]:
    pixel_values = collator.processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0]
    return [collator.tokenizer.bos_token_id] + [collator.image_token_id] * collator.image_tokens, pixel_values


def _words(collator: TrainingCollator, text: str) -> list[int]:
    return collator.tokenizer(text, add_special_tokens=False).input_ids


def _labelled_after(
    context: list[int], target: list[int], pixel_values: torch.Tensor, sequence_id: str, collator: TrainingCollator
) -> EncodedSequence:
    """`context` + `target`, with labels on the target tokens only; `sequence_id` is the question
    (or, for a caption, the image) the sequence is counted as."""
    labels = [IGNORE_INDEX] * len(context) + target
    return EncodedSequence(context + target, labels, pixel_values, (sequence_id,), collator.image_tokens)


def word_items(images: list, collator: TrainingCollator) -> list[Item]:
    """`<bos>` + image + the colour word of the question -> its answer, one question per sequence."""
    items = []
    for image, picture in images:
        prompt, pixel_values = _image_prompt(collator, picture)
        for row in image.rows:
            words = [word for word in row["question"].rstrip("?").split() if word.lower() in COLOUR_WORDS]
            if len(words) != 1:
                raise ValueError(f"the word format needs one colour word per question; got {row['question']!r}")
            context = prompt + _words(collator, " " + words[0].lower())
            encoded = _labelled_after(context, _words(collator, " " + row["answer"]), pixel_values, row["id"], collator)
            items.append(Item(encoded, (_types(row),)))
    return items


def _object_words(scene: Any, obj: Any) -> tuple[str, str, str, str, str]:
    """Colour, shape, side, row and size of an object as the questions word them."""
    gender = obj.shape.gender
    side, row = synth.place_words(scene, obj)
    return obj.color.nom[gender], obj.shape.nom, side, row, obj.size.nom[gender]


def scene_text(scene: Any) -> str:
    """What the image shows, in words: the background, then each object (top to bottom, left to right)."""
    objects = sorted(scene.objects, key=lambda obj: (obj.row, obj.column))
    return "; ".join([f"фон {scene.background.nom['m']}"] + [" ".join(_object_words(scene, obj)) for obj in objects])


NO_IMAGE = torch.zeros(0)


def text_items(images: list, collator: TrainingCollator, questions_per_sequence: int) -> list[Item]:
    """The chat format with the `<image>` slot replaced by `scene_text` (the control: no vision)."""
    planner = SequencePlanner(collator.tokenizer, questions_per_sequence, max_seq_len=512)
    items = []
    for image, _ in images:
        description = collator.tokenizer(scene_text(image.scene), add_special_tokens=False).input_ids
        for questions, tokens in planner.plan(image.rows):
            slot = tokens.input_ids.index(collator.image_token_id)
            shift = len(description) - 1
            ids = tokens.input_ids[:slot] + description + tokens.input_ids[slot + 1 :]
            spans = [(start + shift, end + shift) for start, end in tokens.answer_spans]
            stop = tokens.stop_span and (tokens.stop_span[0] + shift, tokens.stop_span[1] + shift)
            input_ids, labels = collator.expand(TokenizedConversation(ids, spans, stop))
            question_ids = tuple(question["id"] for question in questions)
            encoded = EncodedSequence(input_ids, labels, NO_IMAGE, question_ids, 0)
            items.append(Item(encoded, tuple(_types(question) for question in questions)))
    return items


def caption_items(images: list, collator: TrainingCollator, seed: int, per_image: int = 2) -> list[Item]:
    """`<bos>` + image + «фон X.» + each object «colour shape side row size;» (object order and
    colour/shape order random); every caption token is labelled."""
    rng = random.Random(seed)
    items = []
    for image, picture in images:
        prompt, pixel_values = _image_prompt(collator, picture)
        for _ in range(per_image):
            caption = f" фон {image.scene.background.nom['m']}."
            for obj in rng.sample(image.scene.objects, len(image.scene.objects)):
                colour, shape, *rest = _object_words(image.scene, obj)
                first = [colour, shape] if rng.random() < 0.5 else [shape, colour]
                caption += " " + " ".join(first + rest) + ";"
            ids = _words(collator, caption) + [collator.tokenizer.eos_token_id]
            items.append(Item(_labelled_after(prompt, ids, pixel_values, image.image_id, collator), ()))
    return items


def caption_test_items(images: list, collator: TrainingCollator) -> list[Item]:
    """Per object: «фон X. {colour}» -> its shape, and «фон X. {shape}» -> its colour."""
    items = []
    for image, picture in images:
        prompt, pixel_values = _image_prompt(collator, picture)
        background = image.scene.background.nom["m"]
        for obj in image.scene.objects:
            colour, shape, *_ = _object_words(image.scene, obj)
            for given, asked, kind in ((colour, shape, "shape after colour"), (shape, colour, "colour after shape")):
                context = prompt + _words(collator, f" фон {background}. {given}")
                target = _words(collator, " " + asked)
                encoded = _labelled_after(context, target, pixel_values, image.image_id, collator)
                items.append(Item(encoded, ((kind, "other"),)))
    return items


def pad(items: list[Item], collator: TrainingCollator) -> dict[str, torch.Tensor]:
    batch = collator.pad([item.encoded for item in items])
    keys = MODEL_INPUTS if any(item.encoded.image_tokens for item in items) else MODEL_INPUTS[:-1]
    return {key: batch[key] for key in keys}


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
    templates = args.templates.split(",") if args.templates else None
    train_images = synthetic_images("train", args.train_questions, templates, args.seed)
    test_images = synthetic_images("testdev", args.test_questions, templates, args.seed)

    def items(images: list, fmt: str, held_out: bool) -> list[Item]:
        if fmt == "word":
            return word_items(images, collator)
        if fmt == "text":
            return text_items(images, collator, args.questions_per_sequence)
        if fmt == "copy":
            return copy_items(images, collator, args.questions_per_sequence)
        if fmt == "caption":
            return caption_test_items(images, collator) if held_out else caption_items(images, collator, args.seed)
        return chat_items(images, collator, args.questions_per_sequence)

    log, stages = [], []
    for index, (fmt, steps) in enumerate(args.stages):
        lora = args.mode == "lora" and index >= args.base_stages
        if lora and index == args.base_stages:
            model = apply_lora(model, load_config(REPO_ROOT / "configs/demo_train.yaml").lora)
        lr = args.lr if args.lr is not None else (2e-3 if lora else 1e-3)
        test = items(test_images, fmt, held_out=True)
        log += train(model, items(train_images, fmt, held_out=False), steps, lr, args.batch_size, collator,
                     args.seed, test=test, label=fmt)  # fmt: skip
        stages.append({"format": fmt, "steps": steps, "held_out": exact_match(model, test, collator)})
    return {"settings": vars(args), "log": log, "stages": stages}


FORMATS = ("chat", "word", "text", "copy", "caption")


def _stages(text: str) -> list[tuple[str, int]]:
    """«word:400,chat:400» -> [("word", 400), ("chat", 400)]."""
    stages = []
    for part in text.split(","):
        fmt, _, steps = part.partition(":")
        if fmt not in FORMATS or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not FORMAT:STEPS with FORMAT one of {', '.join(FORMATS)}")
        stages.append((fmt, int(steps)))
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny-llava", help="a tiny model from `gqaru tiny-model`")
    parser.add_argument("--templates", default="", help="comma-separated synth template names (default: all)")
    parser.add_argument(
        "--stages", type=_stages, default=[("chat", 650)], metavar="FORMAT:STEPS,...",
        help=f"training stages in order, each a format ({', '.join(FORMATS)}) and its steps (default chat:650)",
    )
    parser.add_argument("--mode", choices=["lora", "full"], default="lora", help="lora: the demo's LoRA section")
    parser.add_argument(
        "--base-stages", type=int, default=0, metavar="N",
        help="with --mode lora: the first N stages train the whole model (a pretrained base), the rest LoRA",
    )
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-3 for LoRA stages, 1e-3 for full ones")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions-per-sequence", type=int, default=1)
    parser.add_argument("--train-questions", type=int, default=20000)
    parser.add_argument("--test-questions", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if not 0 <= args.base_stages <= len(args.stages):
        parser.error(f"--base-stages {args.base_stages}: there are {len(args.stages)} stages")
    torch.set_num_threads(args.threads)
    result = probe(args)
    for stage in result["stages"]:
        print(f"held out after {stage['format']}:{stage['steps']}")
        for key, value in stage["held_out"].items():
            print(f"  {key:22s} {value['n']:6d} {value['accuracy']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
