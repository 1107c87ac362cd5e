"""The tiny LLaVA's pretraining: a few CPU minutes that stand in for what the real base brings.

`deepvk/llava-gemma-2b-lora` is fine-tuned from a model that already finds things in an image
from a word, and already reads a question. The tiny LLaVA of `gqaru.standins.tiny` starts from random
weights, and LoRA on a random base learns the answer prior and nothing of the images: the adapters
do not build, from nothing, the attention that goes from «красная» to the red patches
(benchmarks/README.md, "Learning probes"). `gqaru tiny-model --pretrain-steps N` therefore trains
the whole model first, on two kinds of examples.

Grounding, the kind of image-text pairs LLaVA's alignment stage uses: an image, a cue word, and a
description of what the cue points at, every description token trained:

    <bos><image> красная  -> большая слева вверху звезда<eos>
    <bos><image> синяя    -> нет<eos>          (a colour the scene does not have)
    <bos><image> фон      -> белый<eos>

Reading, in the chat format: a question about the image, answered with the question's own words
that name scene content («Какого размера красная фигура?» -> «красная»). It needs neither the
image nor the answer; it puts in place what the answer position must do first, look back at the
question. The last eighth of the steps mix it in (about half of their examples), with a
schedule of their own.

Objects are cued by colour only: cueing them by shape as well («звезда -> красная большая ...»)
halves the steps each cue gets, and in 2,500 steps the colour cue then found an object's size
61% of the time instead of 78% (benchmarks/README.md, "Learning probes").

No answer and no image of a `gqaru synth` split is used (`synth.random_scenes` draws scenes from
a stream of their own), so the fine-tuning that follows still has to teach the answers.

    from gqaru.standins.pretrain import pretrain
    report = pretrain(model, processor, steps=2800, seed=0)   # what `make demo` builds
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from gqaru.collate import IGNORE_INDEX, EncodedSequence, TrainingCollator
from gqaru.modeling import answer_only_loss
from gqaru.prompts import Turn, tokenize_conversation
from gqaru.standins import synth

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")
ABSENT = "нет"
READING_FRACTION = 8  # the last 1/8 of the steps mix reading examples in
QUESTIONS_PER_SCENE = 6  # reading examples per scene


def _forms(adjective: synth.Adjective) -> set[str]:
    return {*adjective.nom.values(), *adjective.gen.values(), adjective.ins}


# Every form of a word that names what a scene holds: what a reading example answers with.
CONTENT_WORDS = frozenset(
    set().union(*(_forms(adjective) for adjective, _ in synth.COLORS + synth.BACKGROUNDS))
    | set().union(*(_forms(adjective) for adjective in synth.SIZES))
    | {form for shape in synth.SHAPES for form in (shape.nom, shape.gen, shape.ins)}
    | {"слева", "справа", "вверху", "внизу", "над", "под"}
)


def content_words(question: str) -> list[str]:
    """The words of `question` that name scene content, lower-cased, in question order."""
    words = (word.strip("?,.").lower() for word in question.split())
    return [word for word in words if word in CONTENT_WORDS]


@dataclasses.dataclass(frozen=True)
class Example:
    """A cue word and the (attribute, word) pairs that describe what it points at."""

    cue: str
    description: tuple[tuple[str, str], ...]
    kind: str  # "colour", "absent colour" or "background": what the cue names


def examples_for_scene(scene: synth.Scene, rng: random.Random) -> list[Example]:
    """Every object described from its colour, then one colour the scene lacks, then the background.

    Colours are cued in the feminine form the questions use for «фигура» («красная»); the words of
    a description agree with the object's own noun («большой круг», «большая звезда»).
    """
    examples = []
    for obj in scene.objects:
        gender = obj.shape.gender
        side, row = synth.place_words(scene, obj)
        size = obj.size.nom[gender]
        examples.append(
            Example(obj.color.nom["f"], (("size", size), ("side", side), ("row", row), ("shape", obj.shape.nom)), "colour")
        )
    present = {obj.color for obj in scene.objects}
    absent = [colour for colour, _ in synth.COLORS if colour not in present]
    if absent:
        examples.append(Example(rng.choice(absent).nom["f"], (("absent", ABSENT),), "absent colour"))
    examples.append(Example("фон", (("background", scene.background.nom["m"]),), "background"))
    return examples


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A pretraining example ready to batch, and where its scored words are."""

    sequence: EncodedSequence
    kind: str  # an `Example.kind`, or "reading"
    spans: tuple[tuple[str, int, int], ...]  # (attribute, start, end) of each scored word or answer


def encode(example: Example, pixel_values: torch.Tensor, collator: TrainingCollator) -> Encoded:
    """`<bos>` + the image slot + the cue, then the description and `<eos>` as the trained labels.

    Words are tokenized one by one: the tiny tokenizer never merges across a "▁" boundary, so this
    equals tokenizing the whole text and gives each word's token span.
    """
    tokenizer = collator.tokenizer

    def words(text: str) -> list[int]:
        return tokenizer(" " + text, add_special_tokens=False).input_ids

    context = [tokenizer.bos_token_id] + [collator.image_token_id] * collator.image_tokens + words(example.cue)
    target: list[int] = []
    spans = []
    for attribute, word in example.description:
        start = len(context) + len(target)
        target += words(word)
        spans.append((attribute, start, len(context) + len(target)))
    target.append(tokenizer.eos_token_id)
    sequence = EncodedSequence(
        context + target, [IGNORE_INDEX] * len(context) + target, pixel_values, (example.cue,), collator.image_tokens
    )
    return Encoded(sequence, example.kind, tuple(spans))


def encode_reading(question: str, pixel_values: torch.Tensor, collator: TrainingCollator) -> Encoded | None:
    """`question` in the training chat format, answered with its `content_words`; None if it has none."""
    words = content_words(question)
    if not words:
        return None
    tokens = tokenize_conversation(collator.tokenizer, [Turn(question, " ".join(words))])
    input_ids, labels = collator.expand(tokens)
    start = next(index for index, label in enumerate(labels) if label != IGNORE_INDEX)
    (answer_start, answer_end), = tokens.answer_spans  # the words and their end of turn, not the stop after them
    sequence = EncodedSequence(input_ids, labels, pixel_values, (question,), collator.image_tokens)
    return Encoded(sequence, "reading", (("words", start, start + answer_end - answer_start),))


def pretraining_data(
    scenes: Sequence[synth.Scene], collator: TrainingCollator, seed: int
) -> tuple[list[Encoded], list[Encoded]]:
    """(grounding, reading) examples of `scenes`, each scene drawn as `gqaru synth` does (JPEG) and
    preprocessed once."""
    rng = random.Random(seed)
    grounding, reading = [], []
    for scene in scenes:
        picture = Image.open(io.BytesIO(synth.draw_scene(scene))).convert("RGB")
        pixel_values = collator.processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0]
        grounding += [encode(example, pixel_values, collator) for example in examples_for_scene(scene, rng)]
        for question in synth.scene_questions(scene, rng, QUESTIONS_PER_SCENE):
            if (encoded := encode_reading(question, pixel_values, collator)) is not None:
                reading.append(encoded)
    return grounding, reading


def _batch(items: Sequence[Encoded], collator: TrainingCollator) -> dict[str, torch.Tensor]:
    padded = collator.pad([item.sequence for item in items])
    return {key: padded[key] for key in MODEL_INPUTS}


@torch.no_grad()
def word_accuracy(model: torch.nn.Module, items: Sequence[Encoded], collator: TrainingCollator) -> dict[str, float]:
    """Teacher-forced accuracy of each description word, by what the cue names and what the word says
    («colour → side»: the side of the object a colour word points at), and over all grounding
    words; a reading example is right when its whole answer is («reading → words»)."""
    was_training = model.training
    model.eval()
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        batch = _batch(chunk, collator)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        predicted = model(**inputs, use_cache=False).logits.argmax(-1)
        for row, item in enumerate(chunk):
            labels = batch["labels"][row]
            for attribute, begin, end in item.spans:
                # Position t predicts token t + 1.
                correct = bool((predicted[row, begin - 1 : end - 1] == labels[begin:end]).all())
                keys = [f"{item.kind} → {attribute}"] + (["all words"] if item.kind != "reading" else [])
                for key in keys:
                    tally[key][0] += correct
                    tally[key][1] += 1
    model.train(was_training)
    return {key: hits / total for key, (hits, total) in sorted(tally.items())}


GROUNDING_ROUND_FRACTION = 4
"""An extra grounding round, when the held-out level is not reached yet, is a quarter of the planned steps."""


def pretrain(
    model: torch.nn.Module,
    processor: Any,
    steps: int,
    seed: int = 0,
    *,
    target_word_accuracy: float | None = None,
    max_steps: int | None = None,
    scenes: int | None = None,
    held_out_scenes: int = 150,
    batch_size: int = 16,
    lr: float = 1e-3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every weight of `model`: grounding, then (the last eighth of `steps`) grounding and
    reading mixed. Returns a report of the run.

    Each phase has its own AdamW and cosine schedule (5% warmup); gradient clipping at 1.0, the
    pipeline's collator and answer-only loss. Deterministic for a given seed and thread count.
    `scenes` (default: about one pass of the steps at ~9 examples a scene, at most 3,000) are drawn
    for training and `held_out_scenes` more for the report: the held-out word accuracy
    (`word_accuracy`), the first and last loss and the time taken.

    `target_word_accuracy`: the held-out level («all words») grounding must reach before the mixed
    phase. Below it, grounding goes on in rounds of a quarter of `steps` (each with its own
    schedule) while the total stays within `max_steps` (default twice `steps`); the report says
    whether the level was reached. A weak draw of the seed is caught and said instead of becoming a
    weak demo.
    """
    if steps < 1:
        raise ValueError(f"pretraining needs at least one step, got {steps}")
    max_steps = 2 * steps if max_steps is None else max_steps
    if max_steps < steps:
        raise ValueError(f"the step ceiling ({max_steps}) is below the planned steps ({steps})")
    if scenes is None:
        scenes = min(3000, max(100, steps * batch_size // 9))
    started = time.perf_counter()
    torch.manual_seed(seed)
    collator = TrainingCollator(processor)
    drawn = synth.random_scenes(scenes + held_out_scenes, seed=seed)
    grounding, reading = pretraining_data(drawn[:scenes], collator, seed)
    held_out = [item for part in pretraining_data(drawn[scenes:], collator, seed + 1) for item in part]
    held_out_grounding = [item for item in held_out if item.kind != "reading"]
    mixed_steps = steps // READING_FRACTION

    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    rng = random.Random(seed)
    losses: list[float] = []
    bar = tqdm(total=steps, desc="pretraining the tiny model", unit="step", mininterval=1.0, disable=not progress)

    def train_phase(pool: Sequence[Encoded], phase_steps: int) -> None:
        # Each phase and round has its own optimizer and schedule: the mixed phase at the tail of one
        # long cosine schedule runs at too small a learning rate to learn reading (1% held out, not 29%).
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        schedule = get_cosine_schedule_with_warmup(optimizer, max(1, phase_steps // 20), phase_steps)
        order: list[int] = []
        for _ in range(phase_steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(pool)), len(pool))
            batch = _batch([pool[order.pop()] for _ in range(batch_size)], collator)
            loss_sum, count = answer_only_loss(model, batch)
            loss = loss_sum / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", refresh=False)

    rounds = [steps - mixed_steps]
    if rounds[0]:
        train_phase(grounding, rounds[0])
    levels: list[float] = []
    if target_word_accuracy is not None:
        extra = max(1, steps // GROUNDING_ROUND_FRACTION)
        while True:
            levels.append(round(word_accuracy(model, held_out_grounding, collator)["all words"], 4))
            model.train()
            if levels[-1] >= target_word_accuracy or sum(rounds) + extra + mixed_steps > max_steps:
                break
            logger.info("held-out grounding %.3f < %.3f after %d steps: %d more", levels[-1], target_word_accuracy,
                        sum(rounds), extra)  # fmt: skip
            rounds.append(extra)
            bar.total += extra
            train_phase(grounding, extra)
    if mixed_steps:
        train_phase(grounding + reading, mixed_steps)
    bar.close()
    model.eval()
    total = sum(rounds) + mixed_steps
    window = max(1, min(50, total // 10))
    report = {
        "steps": total,
        "planned_steps": steps,
        "seed": seed,
        "scenes": scenes,
        "grounding_examples": len(grounding),
        "reading_examples": len(reading),
        "grounding_rounds": rounds,
        "mixed_steps": mixed_steps,
        "batch_size": batch_size,
        "lr": lr,
        "loss_first": round(sum(losses[:window]) / window, 4),
        "loss_last": round(sum(losses[-window:]) / window, 4),
        "held_out_word_accuracy": {key: round(value, 4) for key, value in word_accuracy(model, held_out, collator).items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if target_word_accuracy is not None:
        report["grounding_target"] = {
            "word_accuracy": target_word_accuracy,
            "max_steps": max_steps,
            "after_each_round": levels,
            "reached": levels[-1] >= target_word_accuracy,
        }
        if not report["grounding_target"]["reached"]:
            logger.warning("held-out grounding %.3f stayed below %.3f within %d steps: a weak base, said in "
                           "tiny_model.json", levels[-1], target_word_accuracy, max_steps)  # fmt: skip
    logger.info("pretrained in %.0f s: held-out word accuracy %.3f", report["seconds"],
                report["held_out_word_accuracy"]["all words"])  # fmt: skip
    return report
