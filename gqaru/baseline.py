"""The blind baseline: answer every question with what the training set most often answered it.

A model can score well on GQA without looking at the image: many questions have a most likely
answer given their text alone (GQA's own blind baselines reach about 40%). A fine-tuned model is
only worth its number if it beats that, so `gqaru blind-baseline` writes the prior's predictions
for exactly the questions of an evaluation, and `gqaru score RUN --against BLIND` then gives the
paired difference and McNemar test, like any other comparison.

The prior is read from training shards (json members only, no image decoded), in three levels:
1. the most frequent training answer for the same question text (after the headline
   normalisation: lower case, no ASCII punctuation, whitespace collapsed);
2. for a question text never seen in training, the most frequent answer of its GQA detailed
   type (`types.detailed`);
3. otherwise the most frequent training answer overall.
Ties go to the answer that sorts first, so the baseline is a pure function of the shards.

    prior = AnswerPrior.from_shards("shards/gqa-ru-train")
    records = blind_predictions(prior, read_predictions("runs/lora/predictions.jsonl"))
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gqaru.metrics import PredictionsError, exact_match, normalize_lmms_eval, read_predictions, write_predictions


def question_key(question: str) -> str:
    """The prior's key for a question text: the headline normalisation, whitespace collapsed."""
    return " ".join(normalize_lmms_eval(question).split())


def _mode(counts: Counter[str]) -> str:
    """The most frequent answer; among equals, the one that sorts first."""
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0]


@dataclass(frozen=True)
class AnswerPrior:
    """Most frequent training answers by question text, by detailed type, and overall."""

    by_question: Mapping[str, str]
    by_type: Mapping[str, str]
    overall: str
    questions: int
    """Training questions the prior was counted from."""

    @classmethod
    def from_questions(cls, questions: Iterable[Mapping[str, Any]]) -> AnswerPrior:
        """Count `{"question", "answer", "types"?}` records.

        Raises:
            ValueError: no questions.
        """
        by_question: dict[str, Counter[str]] = defaultdict(Counter)
        by_type: dict[str, Counter[str]] = defaultdict(Counter)
        overall: Counter[str] = Counter()
        for qa in questions:
            answer = qa["answer"]
            by_question[question_key(qa["question"])][answer] += 1
            detailed = (qa.get("types") or {}).get("detailed")
            if detailed:
                by_type[detailed][answer] += 1
            overall[answer] += 1
        if not overall:
            raise ValueError("no training questions to count an answer prior from")
        return cls(
            by_question={key: _mode(counts) for key, counts in by_question.items()},
            by_type={key: _mode(counts) for key, counts in by_type.items()},
            overall=_mode(overall),
            questions=sum(overall.values()),
        )

    @classmethod
    def from_shards(cls, shards_dir: str | os.PathLike[str]) -> AnswerPrior:
        """The prior of every question in a shard dir (reads the json members only).

        Raises:
            ShardError: not a shard dir.
            ValueError: the shards hold no questions.
        """
        from gqaru.shards import iter_eval_metas

        return cls.from_questions(qa for meta in iter_eval_metas(shards_dir) for qa in meta["qa"])

    def predict(self, question: str, types: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """(answer, level): the most specific prior that knows this question."""
        answer = self.by_question.get(question_key(question))
        if answer is not None:
            return answer, "question"
        answer = self.by_type.get((types or {}).get("detailed") or "")
        if answer is not None:
            return answer, "type"
        return self.overall, "overall"


def blind_predictions(prior: AnswerPrior, questions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Prediction records (the evaluation's schema plus `prior_level`: "question", "type" or
    "overall", the level of the prior that answered) for `questions`.

    `questions` are evaluation records: id, question, answer and optionally imageId and types,
    e.g. the predictions.jsonl of the run to compare with.

    Raises:
        ValueError: a record has no question text (a predictions file written without one).
    """
    records = []
    for record in questions:
        if not isinstance(record.get("question"), str):
            raise ValueError(f"question {record.get('id')!r} has no question text: the blind baseline needs it")
        prediction, level = prior.predict(record["question"], record.get("types"))
        records.append(
            {
                "id": record["id"],
                **({"imageId": record["imageId"]} if "imageId" in record else {}),
                "question": record["question"],
                "answer": record["answer"],
                "prediction": prediction,
                "correct": exact_match(prediction, record["answer"]),
                "types": record.get("types") or {},
                "prior_level": level,
            }
        )
    return records


def blind_baseline_command(train: str, questions: str, out: str) -> int:
    """`gqaru blind-baseline --train SHARDS --questions PREDICTIONS --out FILE`.

    Returns 0, or 2 with a message on stderr for a bad shard dir or predictions file.
    """
    try:
        prior = AnswerPrior.from_shards(train)
        records = blind_predictions(prior, read_predictions(questions))
        if not records:
            raise PredictionsError(f"{questions}: no questions in the file")
    except ValueError as error:  # ShardError, PredictionsError and an empty prior all are
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_predictions(out, records)
    levels = Counter(record["prior_level"] for record in records)
    correct = sum(record["correct"] for record in records)
    print(
        f"blind baseline from {prior.questions} training questions of {train}: "
        f"{100 * correct / len(records):.2f}% ({correct}/{len(records)}) exact match\n"
        f"answered by the same question text {levels['question']}, by the question type {levels['type']}, "
        f"by the overall most frequent answer «{prior.overall}» {levels['overall']}\n"
        f"wrote {out} (compare: gqaru score RUN/predictions.jsonl --against {out})"
    )
    return 0
