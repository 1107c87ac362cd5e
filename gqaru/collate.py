"""LLaVA collators: image-grouped training sequences with answer-only labels, and generation batches.

Training, per image (one shard sample: an image and its questions):

    SequencePlanner.plan(questions)     -> groups of <= questions_per_sequence questions whose text
                                           fits train.max_seq_len; too-long questions dropped, counted
    TrainingCollator([Sequence, ...])   -> input_ids / attention_mask / labels / pixel_values

Image tokens are added on top of the text budget and are never cut: `max_seq_len` bounds only
the text. A group that would exceed it is split into more sequences for the same image, and a
question that alone exceeds it is dropped and counted under `question_too_long`.

Labels are -100 everywhere except each answer's tokens, the `<end_of_turn>` that closes it, and the
stop that ends the conversation (`\n<eos>` for Gemma: see `gqaru.prompts`).
Right padding for training; left padding for generation.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from gqaru.prompts import IMAGE_TOKEN, TokenizedConversation, Turn, tokenize_conversation

IGNORE_INDEX = -100


def image_token_count(processor: ProcessorMixin, height: int, width: int) -> int:
    """Image tokens the vision tower yields for a (height, width) input, from the processor's config.

    N = (H // patch) * (W // patch) + num_additional_image_tokens, minus 1 for the "default"
    strategy (which drops CLIP's class token): 576 for 336 px with patch 14.
    """
    patch = processor.patch_size
    if not patch:
        raise ValueError("the processor has no patch_size: load it with gqaru.modeling.load_processor")
    count = (height // patch) * (width // patch) + (processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def processor_image_size(processor: ProcessorMixin) -> tuple[int, int]:
    """(height, width) of the pixel_values the processor's image processor produces."""
    image_processor = processor.image_processor
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or image_processor.size
    if hasattr(size, "height") and getattr(size, "height", None):
        return int(size.height), int(size.width)
    if isinstance(size, dict):
        if "height" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    shortest = getattr(size, "shortest_edge", None)
    if shortest:
        return int(shortest), int(shortest)
    raise ValueError(f"cannot tell the image size of {type(image_processor).__name__} (size={size!r})")


@dataclass(frozen=True)
class TrainingSequence:
    """One training sequence: an image and the questions (with answers) packed with it."""

    image_id: str
    image: Image.Image
    questions: tuple[dict[str, Any], ...]
    tokens: TokenizedConversation


@dataclass
class DropCounter:
    """Questions that could not be trained, by reason (reported at the end of a run)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, question_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(question_id)

    def total(self) -> int:
        return sum(self.counts.values())


class SequencePlanner:
    """Packs the questions of one image into sequences that respect both limits.

    Greedy, in the given order: a question joins the current sequence while it has fewer than
    `questions_per_sequence` questions and the text stays within `max_seq_len`; otherwise it
    starts a new sequence. Deterministic, and the same whether or not images are decoded, so the
    trainer can count each rank's sequences up front from the questions alone.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, questions_per_sequence: int, max_seq_len: int):
        if questions_per_sequence < 1 or max_seq_len < 1:
            raise ValueError("questions_per_sequence and max_seq_len must be positive")
        self.tokenizer = tokenizer
        self.questions_per_sequence = questions_per_sequence
        self.max_seq_len = max_seq_len
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # Text tokens a first turn has and a later turn lacks (bos, the newline after `<image>`).
        probe = {"question": "?", "answer": "?"}
        self.first_turn_overhead = 2 * self.text_length(self.tokenize([probe])) - self.text_length(
            self.tokenize([probe, probe])
        )

    def tokenize(self, questions: Sequence[dict[str, Any]]) -> TokenizedConversation:
        turns = [Turn(question["question"], question["answer"]) for question in questions]
        return tokenize_conversation(self.tokenizer, turns)

    def text_length(self, tokens: TokenizedConversation) -> int:
        """Text tokens only: the single `<image>` placeholder is not text."""
        return len(tokens.input_ids) - tokens.input_ids.count(self.image_token_id)

    def plan(
        self, questions: Sequence[dict[str, Any]], drops: DropCounter | None = None
    ) -> list[tuple[tuple[dict[str, Any], ...], TokenizedConversation]]:
        """Groups of questions with their tokens; dropped questions are added to `drops`.

        Fast path: each question is tokenized once, alone; a later turn costs its own length minus
        what only a first turn carries (bos, the image slot). Each planned group is then tokenized
        once and checked; a template or tokenizer for which lengths do not add up falls back to
        `plan_exactly` for that group, so the result is always the exact greedy plan.
        """
        alone = [self.tokenize([question]) for question in questions]
        overhead = self.first_turn_overhead
        groups: list[list[int]] = []
        current: list[int] = []
        length = 0
        for index, tokens in enumerate(alone):
            first = self.text_length(tokens)
            if current and len(current) < self.questions_per_sequence and length + first - overhead <= self.max_seq_len:
                current.append(index)
                length += first - overhead
                continue
            if current:
                groups.append(current)
            if first > self.max_seq_len:
                if drops is not None:
                    drops.add("question_too_long", str(questions[index].get("id")))
                current, length = [], 0
                continue
            current, length = [index], first
        if current:
            groups.append(current)

        planned: list[tuple[tuple[dict[str, Any], ...], TokenizedConversation]] = []
        for group in groups:
            members = tuple(questions[index] for index in group)
            tokens = alone[group[0]] if len(group) == 1 else self.tokenize(members)
            if self.text_length(tokens) == sum(self.text_length(alone[i]) for i in group) - overhead * (len(group) - 1):
                planned.append((members, tokens))
            else:
                planned += self.plan_exactly(members, drops)
        return planned

    def plan_exactly(
        self, questions: Sequence[dict[str, Any]], drops: DropCounter | None = None
    ) -> list[tuple[tuple[dict[str, Any], ...], TokenizedConversation]]:
        """The same greedy plan, re-tokenizing the growing conversation at every step (slow, exact)."""
        groups: list[tuple[tuple[dict[str, Any], ...], TokenizedConversation]] = []
        current: list[dict[str, Any]] = []
        current_tokens: TokenizedConversation | None = None
        for question in questions:
            if len(current) < self.questions_per_sequence and current:
                candidate = self.tokenize([*current, question])
                if self.text_length(candidate) <= self.max_seq_len:
                    current.append(question)
                    current_tokens = candidate
                    continue
            if current:
                groups.append((tuple(current), current_tokens))
            alone = self.tokenize([question])
            if self.text_length(alone) > self.max_seq_len:
                if drops is not None:
                    drops.add("question_too_long", str(question.get("id")))
                current, current_tokens = [], None
                continue
            current, current_tokens = [question], alone
        if current:
            groups.append((tuple(current), current_tokens))
        return groups

    def sequences(
        self, samples: Iterable[dict[str, Any]], drops: DropCounter | None = None
    ) -> Iterator[TrainingSequence]:
        """Shard samples ({"key", "image", "meta"}) -> training sequences."""
        for sample in samples:
            for questions, tokens in self.plan(sample["meta"]["qa"], drops):
                yield TrainingSequence(sample["key"], sample["image"], questions, tokens)


def group_by_length(
    items: Iterable[Any], length: Callable[[Any], int], batch_size: int, buffer_batches: int, seed: str | int
) -> Iterator[Any]:
    """The same items, reordered so that each run of `batch_size` holds items of similar length.

    Less padding when batches are cut from the stream in order. A bounded buffer of
    `buffer_batches * batch_size` items is sorted by length (stable), cut into batches of
    `batch_size`, and the batches are yielded in an order shuffled by `random.Random(seed)` (one
    generator for the whole stream). Only the last buffer can hold a short batch; it comes last,
    so a consumer taking `batch_size` at a time cuts exactly these batches. Nothing is dropped or
    added, and the order is a pure function of the input order and the seed: the step plan's
    counts and an exact resume (re-read the stream, skip what was trained) both still hold.
    """
    if batch_size < 1 or buffer_batches < 1:
        raise ValueError(f"group_by_length: batch_size {batch_size} and buffer_batches {buffer_batches} must be >= 1")
    rng = random.Random(seed)
    capacity = batch_size * buffer_batches
    buffer: list[Any] = []

    def flush() -> Iterator[Any]:
        ordered = sorted(buffer, key=length)
        batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
        short = [batches.pop()] if len(batches[-1]) < batch_size else []
        rng.shuffle(batches)
        for batch in batches + short:
            yield from batch
        buffer.clear()

    for item in items:
        buffer.append(item)
        if len(buffer) == capacity:
            yield from flush()
    if buffer:
        yield from flush()


@dataclass(frozen=True)
class EncodedSequence:
    """A training sequence ready to batch: ids with the image slot expanded, labels, pixels."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (3, H, W)
    question_ids: tuple[str, ...]
    image_tokens: int


class TrainingCollator:
    """Sequences -> a right-padded batch with the image slot expanded and answer-only labels.

    Two halves, so that the expensive one can run in DataLoader workers: `encode` (image
    preprocessing and id expansion, per sequence) and `pad` (stacking, cheap, in the main process).
    Calling the collator does both.

    A batch holds input_ids, attention_mask, labels (B, T), pixel_values (B, 3, H, W), the trained
    question ids, and plain-int statistics for the progress bar: questions, text_tokens,
    image_tokens, padding_tokens.
    """

    def __init__(self, processor: ProcessorMixin):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        height, width = processor_image_size(processor)
        self.image_tokens = image_token_count(processor, height, width)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token")

    def expand(self, tokens: TokenizedConversation) -> tuple[list[int], list[int]]:
        """Input ids with `<image>` repeated `image_tokens` times, and the matching labels."""
        input_ids: list[int] = []
        labels: list[int] = []
        label_mask = [False] * len(tokens.input_ids)
        for start, end in tokens.label_spans:
            label_mask[start:end] = [True] * (end - start)
        for token, labelled in zip(tokens.input_ids, label_mask):
            if token == self.image_token_id:
                input_ids += [token] * self.image_tokens
                labels += [IGNORE_INDEX] * self.image_tokens
            else:
                input_ids.append(token)
                labels.append(token if labelled else IGNORE_INDEX)
        return input_ids, labels

    def encode(self, sequence: TrainingSequence) -> EncodedSequence:
        input_ids, labels = self.expand(sequence.tokens)
        pixel_values = self.processor.image_processor(images=[sequence.image], return_tensors="pt")["pixel_values"]
        return EncodedSequence(
            input_ids=input_ids,
            labels=labels,
            pixel_values=pixel_values[0],
            question_ids=tuple(str(question["id"]) for question in sequence.questions),
            image_tokens=input_ids.count(self.image_token_id),
        )

    def pad(self, encoded: Sequence[EncodedSequence]) -> dict[str, Any]:
        if not encoded:
            raise ValueError("TrainingCollator got an empty batch")
        length = max(len(item.input_ids) for item in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, item in enumerate(encoded):
            input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            labels[row, : len(item.labels)] = torch.tensor(item.labels)
            attention_mask[row, : len(item.input_ids)] = 1
        real_tokens = int(attention_mask.sum())
        image_tokens = sum(item.image_tokens for item in encoded)
        question_ids = [question_id for item in encoded for question_id in item.question_ids]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([item.pixel_values for item in encoded]),
            "question_ids": question_ids,
            "questions": len(question_ids),
            "image_tokens": image_tokens,
            "text_tokens": real_tokens - image_tokens,
            "padding_tokens": input_ids.numel() - real_tokens,
        }

    def __call__(self, sequences: Sequence[TrainingSequence]) -> dict[str, Any]:
        return self.pad([self.encode(sequence) for sequence in sequences])


def generation_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """One question's prompt for generation, `<image>` still a single token."""
    return tokenize_conversation(tokenizer, [Turn(question)], add_generation_prompt=True).input_ids


class GenerationCollator:
    """Questions (each with its image) -> a left-padded batch ready for `generate`.

    Items are dicts {"image", "question", ...}; the batch keeps their order. Left padding puts
    every prompt's last token in the last column, where generation continues.
    """

    def __init__(self, processor: ProcessorMixin):
        self.training = TrainingCollator(processor)
        self.tokenizer = processor.tokenizer
        self.processor = processor

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        image_token_id = self.training.image_token_id
        rows = []
        for item in items:
            ids = []
            for token in generation_prompt_ids(self.tokenizer, item["question"]):
                ids += [token] * self.training.image_tokens if token == image_token_id else [token]
            rows.append(ids)
        length = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), length), self.training.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        pixel_values = self.processor.image_processor(
            images=[item["image"] for item in items], return_tensors="pt"
        )["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
