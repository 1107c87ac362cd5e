"""GQA-ru readers: one split's questions joined to its images, streamed, with a seeded selection.

A source is a hub id (`deepvk/GQA-ru`) or a local directory laid out like that hub repo (a
README.md whose YAML `configs:` section maps each config to parquet files). Both go through the
same call, `datasets.load_dataset(SOURCE, CONFIG, split=SPLIT, streaming=True)`, so the offline
tests exercise the code path that reads the hub. `datasets` 5.x runs no dataset scripts at all,
so no code from a source is ever executed (there is no `trust_remote_code` to turn on).

    reader = SplitReader("deepvk/GQA-ru", "testdev", max_samples=300, seed=42)
    for item in reader:               # one ImageQuestions per image that has selected questions
        item.image_id, item.image_bytes, item.questions
    reader.rejections.to_json()       # what was skipped, by reason

Memory stays flat in the size of the source: the instructions (small text) are held, grouped by
image; the images config is read with `Image(decode=False)` in streaming mode, once, in its own
order, and each image's bytes are handed on and dropped. Images nobody asked a question about
are never decoded.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

SPLITS = ("train", "testdev")
INSTRUCTION_COLUMNS = ("id", "imageId", "question", "answer", "fullAnswer", "types")
IMAGE_COLUMNS = ("id", "image")

SELECTION_RULE = (
    "ids = sorted(set(question ids)) in Python str order (Unicode code points); "
    "if max_samples is None or >= len(ids): all ids; "
    "else ids[i] for i in numpy.random.default_rng(seed).permutation(len(ids))[:max_samples]"
)
"""The selection rule in words, stored in every manifest so a reader can redo it elsewhere."""

SEEDED = "seeded"
SEED_REPORT = "seed-report"
SELECTIONS = (SEEDED, SEED_REPORT)
SEED_REPORT_TRAIN_ROWS = 2000
SEED_REPORT_TESTDEV_QUESTIONS = 300
SEED_REPORT_RULE = (
    "row indices of {split}_balanced_instructions in dataset order (every row counted, rejected ones "
    "too): train: range(2000), as select(range(2000)); testdev: rows = list(range(number of rows)); "
    "random.Random(42).shuffle(rows); rows[:300]"
)
"""The seed report's two subsets (its public code, Olyaq/VK_VLM), exactly: row indices, not question ids."""

EXAMPLES_PER_REASON = 5
IMAGE_BATCH_ROWS = 32
"""Image rows converted to Python at a time, with their selected questions: bounds the image bytes
and the question objects held by the reader."""

# Every reason a row can be skipped for: name -> (what is counted, what it means). Shards add the
# image-level reasons found while preparing the image bytes. The manifest lists all of them, zero
# counts included, so "nothing was skipped" is stated rather than implied.
REJECTION_REASONS: dict[str, tuple[str, str]] = {
    "missing_question_id": ("question", "a question row with an empty or null id"),
    "duplicate_question_id": ("question", "a question id seen before (the first row is kept)"),
    "empty_question": ("question", "the question text is empty or whitespace"),
    "empty_answer": ("question", "the answer is empty or whitespace"),
    "missing_image": ("question", "a selected question whose imageId has no image row"),
    "duplicate_image": ("image", "an image id seen before (the first row is kept)"),
    "invalid_image_id": ("image", "an image id that is not a safe webdataset key ([A-Za-z0-9_-], 1-64 chars)"),
    "undecodable_image": ("image", "image bytes that PIL cannot open and decode"),
    "oversized_image": ("image", "an image over PIL's decompression-bomb pixel limit"),
}


class SourceError(ValueError):
    """A source that cannot be read as GQA-ru: names the source, the config and what is wrong."""


def instructions_config(split: str) -> str:
    """The hub config holding a split's questions, e.g. `testdev_balanced_instructions`."""
    _check_split(split)
    return f"{split}_balanced_instructions"


def images_config(split: str) -> str:
    """The hub config holding a split's images, e.g. `testdev_balanced_images`."""
    _check_split(split)
    return f"{split}_balanced_images"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def select_question_ids(ids: Iterable[str], max_samples: int | None, seed: int) -> list[str]:
    """The seeded question selection shared by `shards build` and evaluation.

    The draw depends on nothing but the set of ids, `max_samples` and `seed`: the ids are
    de-duplicated and sorted (Python str order, i.e. by code point, no locale), then
    `numpy.random.default_rng(seed).permutation(len(ids))[:max_samples]` picks positions.
    PCG64 and the permutation are platform-independent, so the same arguments give the same
    questions on every machine, and a larger `max_samples` with the same seed selects a superset.
    `max_samples=None`, or more than there are ids, selects all of them (logged).

    Returns the selected ids, sorted.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy's default_rng rejects negative seeds), got {seed}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}")
    unique_ids = sorted(set(ids))
    if max_samples is None:
        return unique_ids
    if max_samples >= len(unique_ids):
        if max_samples > len(unique_ids):
            logger.warning(
                "max_samples=%d is more than the %d questions available: selecting all of them",
                max_samples,
                len(unique_ids),
            )
        return unique_ids
    positions = np.random.default_rng(seed).permutation(len(unique_ids))[:max_samples]
    return sorted(unique_ids[int(position)] for position in positions)


def seed_report_rows(split: str, total_rows: int) -> list[int]:
    """The row indices (dataset order) of the seed report's subset of `split`, sorted.

    train: its first 2,000 rows (`select(range(2000))`); testdev: the 300 rows of
    `random.Random(42).shuffle(list(range(total_rows)))[:300]`, over all 12,216 rows of the real split.
    """
    _check_split(split)
    if split == "train":
        return list(range(min(SEED_REPORT_TRAIN_ROWS, total_rows)))
    rows = list(range(total_rows))
    random.Random(42).shuffle(rows)
    return sorted(rows[:SEED_REPORT_TESTDEV_QUESTIONS])


@dataclass(frozen=True)
class Question:
    """One GQA-ru question, with the fields the shards keep."""

    id: str
    image_id: str
    question: str
    answer: str
    full_answer: str
    types: dict[str, str]
    row: int
    """Row index in the instructions config, dataset order (what the seed report's subsets name)."""

    def to_json(self) -> dict[str, Any]:
        """The question as it is stored in a shard sample's `json` (`qa` list entry)."""
        return {
            "id": self.id,
            "row": self.row,
            "question": self.question,
            "answer": self.answer,
            "fullAnswer": self.full_answer,
            "types": dict(self.types),
        }


@dataclass
class ImageQuestions:
    """An image (raw bytes as stored in the source) with its selected questions, sorted by id."""

    image_id: str
    image_bytes: bytes | None
    questions: list[Question]


@dataclass
class _Reason:
    count: int = 0
    questions_lost: int = 0
    examples: list[str] = field(default_factory=list)


class Rejections:
    """Counts of skipped rows by reason, with up to five example ids each.

    For image-level reasons, `questions_lost` counts the selected questions that went with the
    image, so selected = written + missing_image + sum of questions_lost, exactly.
    """

    def __init__(self) -> None:
        self._reasons = {name: _Reason() for name in REJECTION_REASONS}

    def add(self, reason: str, example_id: str, questions_lost: int = 0) -> None:
        if reason not in self._reasons:
            raise KeyError(f"unknown rejection reason {reason!r}: known are {', '.join(self._reasons)}")
        entry = self._reasons[reason]
        entry.count += 1
        entry.questions_lost += questions_lost
        if len(entry.examples) < EXAMPLES_PER_REASON:
            entry.examples.append(example_id)

    def count(self, reason: str) -> int:
        return self._reasons[reason].count

    def total(self) -> int:
        return sum(entry.count for entry in self._reasons.values())

    def to_json(self) -> dict[str, dict[str, Any]]:
        """{reason: {count, unit, questions_lost (image reasons), examples, meaning}} for the manifest."""
        result: dict[str, dict[str, Any]] = {}
        for name, entry in self._reasons.items():
            unit, meaning = REJECTION_REASONS[name]
            record: dict[str, Any] = {"count": entry.count, "unit": unit}
            if unit == "image":
                record["questions_lost"] = entry.questions_lost
            record["examples"] = list(entry.examples)
            record["meaning"] = meaning
            result[name] = record
        return result

    def summary(self) -> str:
        """`reason N, reason N` for the non-zero reasons, or `none`."""
        parts = [f"{name} {entry.count}" for name, entry in self._reasons.items() if entry.count]
        return ", ".join(parts) if parts else "none"


def _open_config(source: str, config: str, split: str, required: tuple[str, ...]) -> Any:
    """Open one config of the source as a streaming dataset of its required columns, checked up front.

    Only the required columns are read (parquet skips the others on disk: the instructions'
    `semantic` and `annotations` are most of their bytes). With `columns=`, datasets drops absent
    columns from `features` silently, so they are compared here and a missing one is an error.
    """
    import datasets

    def load(columns: list[str] | None) -> Any:
        try:
            return datasets.load_dataset(str(source), config, split=split, streaming=True, columns=columns)
        except (OSError, ValueError) as error:  # no such dir or config, hub unreachable (OSError)
            raise SourceError(f"cannot open config {config!r} split {split!r} of source {source!r}: {error}") from error

    dataset = load(list(required))
    if dataset.features is not None and set(required) <= set(dataset.features):
        return dataset
    everything = load(None)  # only to name what is there (or when features are unknown up front)
    columns = list(everything.features) if everything.features is not None else list(next(iter(everything)))
    missing = [name for name in required if name not in columns]
    if missing:
        raise SourceError(
            f"source {source!r}, config {config!r}: missing required column(s) {', '.join(missing)} "
            f"(has: {', '.join(columns)})"
        )
    return dataset


def _read_table(dataset: Any, columns: tuple[str, ...]) -> pa.Table:
    """A (small, text) streaming dataset as one arrow table, read in batches."""
    batches = list(dataset.with_format("arrow").iter(batch_size=4096))
    if not batches:
        return pa.table({name: pa.array([], type=pa.string()) for name in columns})
    return pa.concat_tables(batches, promote_options="default")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _texts(values: pa.Array | pa.ChunkedArray) -> list[str]:
    """`_text` of every value; a string column without nulls is that already (`str` of a str is itself)."""
    if values.null_count == 0 and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return values.to_pylist()
    return [_text(value) for value in values.to_pylist()]


class SplitReader:
    """One split of a GQA-ru source: its valid questions, the selection, and the streamed join.

    Construction opens both configs (a missing column is a `SourceError` before any work), reads
    the questions and applies the text checks — each row is skipped under exactly one reason,
    checked in this order: missing_question_id, duplicate_question_id (the first row with an id
    wins, whatever its content), empty_question, empty_answer — then selects: `select_question_ids`
    over the questions that passed (`selection="seeded"`), or the seed report's rows
    (`selection="seed-report"`, `seed_report_rows`; max_samples and seed are not used).
    Iterating streams the images once and yields one `ImageQuestions` per image that has selected
    questions, in the images' order. Questions lost afterwards (text checks,
    image missing, or rejected by the shard writer) are counted, not replaced, so the selection
    stays a function of (ids, max_samples, seed), or of the row count, alone.
    """

    def __init__(
        self, source: str, split: str, max_samples: int | None = None, seed: int = 0, selection: str = SEEDED
    ) -> None:
        if selection not in SELECTIONS:
            raise SourceError(f"unknown selection {selection!r}: expected one of {', '.join(SELECTIONS)}")
        self.source = str(source)
        self.split = split
        self.selection_name = selection
        self.max_samples = None if selection == SEED_REPORT else max_samples
        self.seed = seed
        self.rejections = Rejections()
        instructions = _open_config(self.source, instructions_config(split), split, INSTRUCTION_COLUMNS)
        self._images = _open_config(self.source, images_config(split), split, IMAGE_COLUMNS)
        table = _read_table(instructions, INSTRUCTION_COLUMNS)
        self.source_rows = table.num_rows
        if selection == SEED_REPORT:
            self.named_rows = seed_report_rows(split, table.num_rows)
            valid_rows, valid_ids = self._text_checks(table, rows=self.named_rows)
            selected = set(valid_ids)
        else:
            self.named_rows = None
            valid_rows, valid_ids = self._text_checks(table)
            selected = set(select_question_ids(valid_ids, max_samples, seed))
        self.available_questions = len(valid_ids)
        image_ids = table.column("imageId").to_pylist()
        chosen = sorted(
            (_text(image_ids[row]), question_id, row)
            for row, question_id in zip(valid_rows, valid_ids, strict=True)
            if question_id in selected
        )
        self.selected_questions = len(chosen)
        # The selected questions, grouped by image and sorted by id, held as one arrow table (a few
        # hundred bytes a question, ~5x less than Python objects); each image owns a row range.
        self._rows = pa.array([row for _, _, row in chosen], type=pa.int64())
        self._questions = table.take(self._rows)
        self._ranges: dict[str, tuple[int, int]] = {}
        for position, (image_id, _, _) in enumerate(chosen):
            first = self._ranges.get(image_id, (position, position))[0]
            self._ranges[image_id] = (first, position + 1)
        self._iterated = False

    @property
    def selected_images(self) -> int:
        """Images referenced by the selected questions (some may turn out missing)."""
        return len(self._ranges)

    def selection(self) -> dict[str, Any]:
        """The selection record stored in the manifest."""
        if self.selection_name == SEED_REPORT:
            return {
                "name": SEED_REPORT,
                "rule": SEED_REPORT_RULE.format(split=self.split),
                "source_rows": self.source_rows,
                "rows": len(self.named_rows),
                "available": self.available_questions,
                "selected": self.selected_questions,
            }
        return {
            "name": SEEDED,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "rule": SELECTION_RULE,
            "source_rows": self.source_rows,
            "available": self.available_questions,
            "selected": self.selected_questions,
        }

    def _text_checks(self, table: pa.Table, rows: list[int] | None = None) -> tuple[list[int], list[str]]:
        """Rows (and their ids) that pass the text checks; the others are counted by reason.

        `rows` limits the checks to those row indices (a named selection); the duplicate check
        still sees every earlier row, so the first row with an id wins whatever is selected.
        """
        ids, image_ids = table.column("id").to_pylist(), table.column("imageId").to_pylist()
        questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
        wanted = None if rows is None else set(rows)
        kept_rows: list[int] = []
        kept_ids: list[str] = []
        seen_ids: set[str] = set()
        for row, raw_id in enumerate(ids):
            if wanted is not None and row not in wanted:
                seen_ids.add(_text(raw_id))
                continue
            question_id = _text(raw_id)
            if not question_id.strip():
                self.rejections.add("missing_question_id", f"imageId={_text(image_ids[row])}")
                continue
            if question_id in seen_ids:
                self.rejections.add("duplicate_question_id", question_id)
                continue
            seen_ids.add(question_id)
            if not _text(questions[row]).strip():
                self.rejections.add("empty_question", question_id)
                continue
            if not _text(answers[row]).strip():
                self.rejections.add("empty_answer", question_id)
                continue
            kept_rows.append(row)
            kept_ids.append(question_id)
        return kept_rows, kept_ids

    def _questions_of(self, image_ids: list[str]) -> list[list[Question]]:
        """The questions of each of `image_ids` (one batch of images), in the same order.

        One arrow `take` and one conversion to Python per column for the whole batch: an arrow slice
        and a row-wise `to_pylist` per image paid arrow's per-call overhead for ~13 questions at a time
        (the join took ~95 us an image, now ~50). Only the batch's questions become Python objects,
        so memory stays flat in the source size.
        """
        ranges = [self._ranges[image_id] for image_id in image_ids]
        positions = pa.array([position for first, stop in ranges for position in range(first, stop)], type=pa.int64())
        taken = self._questions.take(positions)
        ids, texts, answers, full_answers = (
            _texts(taken.column(name)) for name in ("id", "question", "answer", "fullAnswer")
        )
        types = [
            {str(key): _text(value) for key, value in (row or {}).items()} for row in taken.column("types").to_pylist()
        ]
        rows = self._rows.take(positions).to_pylist()
        grouped: list[list[Question]] = []
        start = 0
        for image_id, (first, stop) in zip(image_ids, ranges, strict=True):
            end = start + stop - first
            grouped.append(
                [
                    Question(
                        id=ids[index],
                        image_id=image_id,
                        question=texts[index],
                        answer=answers[index],
                        full_answer=full_answers[index],
                        types=types[index],
                        row=rows[index],
                    )
                    for index in range(start, end)
                ]
            )
            start = end
        return grouped

    def __iter__(self) -> Iterator[ImageQuestions]:
        """Stream the images once; yield each image that has selected questions.

        Duplicate image rows are counted (the first is kept); when the stream ends, the selected
        questions whose image never came are counted as missing_image.
        """
        if self._iterated:
            raise RuntimeError("a SplitReader streams its source once; make a new one to read it again")
        self._iterated = True
        import datasets

        images = self._images.cast_column("image", datasets.Image(decode=False))
        seen_images: set[str] = set()
        for batch in images.iter(batch_size=IMAGE_BATCH_ROWS):
            wanted: list[tuple[str, dict[str, Any]]] = []  # (image id, image) of the batch's images to yield
            for raw_id, image in zip(batch["id"], batch["image"], strict=True):
                image_id = _text(raw_id)
                if image_id in seen_images:
                    self.rejections.add("duplicate_image", image_id)
                    continue
                seen_images.add(image_id)
                if image_id in self._ranges:  # else no selected question about it: its bytes are never touched
                    wanted.append((image_id, image or {}))
            if not wanted:
                continue
            questions = self._questions_of([image_id for image_id, _ in wanted])
            for (image_id, image), image_questions in zip(wanted, questions, strict=True):
                yield ImageQuestions(image_id=image_id, image_bytes=image.get("bytes"), questions=image_questions)
        for image_id, (first, stop) in self._ranges.items():
            if image_id not in seen_images:
                for question_id in self._questions.column("id").slice(first, stop - first).to_pylist():
                    self.rejections.add("missing_image", _text(question_id))
