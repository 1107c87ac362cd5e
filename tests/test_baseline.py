"""The blind baseline: the training answer prior by question text, then type, then overall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gqaru.baseline import AnswerPrior, blind_predictions, question_key
from gqaru.cli import main as cli_main
from gqaru.metrics import compute_metrics, exact_match, read_predictions, write_predictions
from gqaru.shards import build_shards, iter_eval_metas

TRAIN = [
    {"question": "Какого цвета круг?", "answer": "красный", "types": {"detailed": "directOf"}},
    {"question": "какого цвета  круг", "answer": "синий", "types": {"detailed": "directOf"}},
    {"question": "Какого цвета круг?", "answer": "синий", "types": {"detailed": "directOf"}},
    {"question": "Есть ли звезда?", "answer": "нет", "types": {"detailed": "exist"}},
    {"question": "Есть ли звезда?", "answer": "да", "types": {"detailed": "exist"}},
    {"question": "Есть ли сердце?", "answer": "да", "types": {"detailed": "exist"}},
]


def test_prior_prefers_the_same_question_then_its_type_then_the_overall_answer() -> None:
    prior = AnswerPrior.from_questions(TRAIN)
    assert prior.questions == 6
    # The key ignores case, ASCII punctuation and runs of spaces: three records, «синий» twice.
    assert question_key("Какого цвета  круг?") == question_key("какого цвета круг") == "какого цвета круг"
    assert prior.predict("КАКОГО цвета круг?") == ("синий", "question")
    # A 1:1 tie goes to the answer that sorts first, so the prior never depends on record order.
    assert prior.predict("Есть ли звезда?") == ("да", "question")
    assert AnswerPrior.from_questions(list(reversed(TRAIN))).predict("Есть ли звезда?") == ("да", "question")
    assert prior.predict("Есть ли квадрат?", {"detailed": "exist"}) == ("да", "type")
    assert prior.predict("Какого цвета квадрат?", {"detailed": "directOf"}) == ("синий", "type")
    # Overall: «синий» 2, «да» 2, «красный» 1, «нет» 1 -> the tie between the first two goes to «да».
    assert prior.predict("Что это?", {"detailed": "never seen"}) == ("да", "overall")
    assert prior.predict("Что это?") == ("да", "overall")
    with pytest.raises(ValueError, match="no training questions"):
        AnswerPrior.from_questions([])


def test_blind_predictions_keep_the_evaluation_records_and_score_like_a_run() -> None:
    prior = AnswerPrior.from_questions(TRAIN)
    questions = [
        {"id": "b", "imageId": "1", "question": "Какого цвета круг?", "answer": "синий", "prediction": "x"},
        {"id": "a", "imageId": "2", "question": "Есть ли квадрат?", "answer": "нет", "prediction": "y",
         "types": {"detailed": "exist", "structural": "verify"}},  # fmt: skip
    ]
    records = blind_predictions(prior, questions)
    assert [(record["id"], record["prediction"], record["prior_level"]) for record in records] == [
        ("b", "синий", "question"),
        ("a", "да", "type"),
    ]
    assert [record["correct"] for record in records] == [True, False]
    assert records[1]["types"]["structural"] == "verify" and records[1]["imageId"] == "2"
    assert compute_metrics(records)["headline"]["correct"] == 1
    with pytest.raises(ValueError, match="'c' has no question text"):
        blind_predictions(prior, [{"id": "c", "answer": "да", "prediction": "да"}])


def test_blind_baseline_command_on_synthetic_shards(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "train"
    testdev = tmp_path / "testdev"
    build_shards(str(synth_dir), split="train", out_dir=train, samples_per_shard=16, verbose=False)
    build_shards(str(synth_dir), split="testdev", out_dir=testdev, samples_per_shard=16, verbose=False)
    # The questions to answer, as an evaluation would have written them (predictions are ignored).
    asked = [
        {"id": qa["id"], "imageId": meta["imageId"], "question": qa["question"], "answer": qa["answer"],
         "prediction": "", "types": qa["types"]}  # fmt: skip
        for meta in iter_eval_metas(testdev)
        for qa in meta["qa"]
    ]
    questions = write_predictions(tmp_path / "run" / "predictions.jsonl", asked)
    out = tmp_path / "blind" / "predictions.jsonl"
    assert cli_main(["blind-baseline", "--train", str(train), "--questions", str(questions), "--out", str(out)]) == 0

    records = read_predictions(out)
    assert sorted(record["id"] for record in records) == sorted(record["id"] for record in asked)
    assert all(record["correct"] == exact_match(record["prediction"], record["answer"]) for record in records)
    accuracy = sum(record["correct"] for record in records) / len(records)
    printed = capsys.readouterr().out
    assert f"{100 * accuracy:.2f}%" in printed and "600 training questions" in printed
    # Synthetic testdev asks the train templates about other scenes: most texts were seen in
    # training, and the text prior beats answering every question with the overall mode.
    levels = [record["prior_level"] for record in records]
    assert levels.count("question") > len(records) / 2
    overall = AnswerPrior.from_shards(train).overall
    assert accuracy > sum(record["answer"] == overall for record in records) / len(records) + 0.1

    # Bad input: named, exit 2, nothing written.
    bad = tmp_path / "no-text.jsonl"
    bad.write_text(json.dumps({"id": "1", "answer": "да", "prediction": "да"}) + "\n", encoding="utf-8")

    def blind(train_dir: Path, questions_file: Path, out_file: Path) -> int:
        arguments = ["--train", str(train_dir), "--questions", str(questions_file), "--out", str(out_file)]
        return cli_main(["blind-baseline", *arguments])

    assert blind(train, bad, tmp_path / "x") == 2
    assert "'1' has no question text" in capsys.readouterr().err
    assert blind(tmp_path, questions, tmp_path / "y") == 2
    assert "not a shard dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
