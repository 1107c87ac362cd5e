"""Metrics: the lmms-eval gqa_ru match, the scores and intervals, the paired test, `gqaru score`.

The headline rule is checked case by case and against the operations lmms-eval itself runs
(numpy's char.lower / char.translate over string.punctuation, then ==); the statistics against
values worked by hand or published with other implementations.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gqaru.cli import main as cli_main
from gqaru.metrics import (
    HEADLINE_LABEL,
    LEMMA_LABEL,
    PredictionsError,
    compute_metrics,
    exact_match,
    lemma_match,
    lemmatize,
    mcnemar_exact_p,
    newcombe_paired_interval,
    normalize_lmms_eval,
    paired_comparison,
    read_predictions,
    score_command,
    wilson_interval,
    write_predictions,
)


def record(
    question_id: str, answer: str, prediction: str, structural: str | None = None, semantic: str | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": question_id, "imageId": "img1", "question": "Что это?", "answer": answer, "prediction": prediction,
    }
    if structural is not None:
        item["types"] = {"structural": structural, "semantic": semantic, "detailed": "x"}
    return item


# --------------------------------------------------------------------------------------------
# The headline rule


def test_lower_casing() -> None:
    assert normalize_lmms_eval("Да") == "да"
    assert exact_match("ДА", "да")
    assert exact_match("Красного", "красного")


def test_ascii_punctuation_is_removed() -> None:
    assert normalize_lmms_eval("да.") == "да"
    assert normalize_lmms_eval('из-за "стола"!') == "изза стола"
    assert exact_match("нет!", "нет")
    assert exact_match("(справа)", "справа")


def test_non_ascii_punctuation_is_kept() -> None:
    assert normalize_lmms_eval("«да»") == "«да»"
    assert not exact_match("«да»", "да")
    assert not exact_match("да…", "да")
    assert not exact_match("серо—синий", "серосиний")


def test_yo_stays_distinct_from_ye() -> None:
    assert normalize_lmms_eval("Ёлка") == "ёлка"
    assert not exact_match("елка", "ёлка")


def test_no_whitespace_stripping() -> None:
    assert normalize_lmms_eval(" да\n") == " да\n"
    assert not exact_match(" да", "да")
    assert not exact_match("да ", "да")
    assert not exact_match("из  ткани", "из ткани")
    # Whitespace left behind by removed punctuation stays too: "да ." -> "да ".
    assert not exact_match("да .", "да")
    assert exact_match("из ткани.", "Из ткани")


def test_rule_equals_the_numpy_operations_lmms_eval_runs() -> None:
    """lmms-eval's exact_match, called per question with one prediction and one reference:
    np.char.lower, np.char.translate(string.punctuation table), then ==."""
    pairs = [
        ("Да", "да"), ("«да»", "да"), ("нет.", "нет"), ("ёлка", "елка"), (" да", "да"), ("Из ткани", "из ткани!"),
        ("деревянный", "деревянного"), ("A-B", "ab"), ("слева", "Слева?"), ("2", "два"), ("", "."),
        ("серо—синий", "серосиний"), ("да\t", "да"), ("ДА!", "да"),
    ]
    table = str.maketrans("", "", string.punctuation)
    expected = []
    for prediction, answer in pairs:
        normalised_prediction = np.char.translate(np.char.lower(np.asarray([prediction])), table=table)
        normalised_answer = np.char.translate(np.char.lower(np.asarray([answer])), table=table)
        expected.append(bool((normalised_prediction == normalised_answer)[0]))
    assert [exact_match(prediction, answer) for prediction, answer in pairs] == expected
    assert any(expected) and not all(expected)


# --------------------------------------------------------------------------------------------
# The lemma match


def test_lemma_match_accepts_inflections_and_is_labelled() -> None:
    assert lemmatize("Красного") == ("красный",)
    assert lemma_match("красный", "красного")
    assert not exact_match("красный", "красного")
    assert lemma_match("из ткань", "из ткани")
    assert not lemma_match("стул", "стол")
    assert "NOT the headline" in LEMMA_LABEL


def test_lemma_match_real_pymorphy3_behaviour() -> None:
    # pymorphy3's first parse of «большим» is the comparative «больший», so these do NOT match;
    # and its dictionary folds «елка» into «ёлка», so the lemma match (unlike the headline) does.
    assert lemmatize("большим") == ("больший",)
    assert lemmatize("большой") == ("большой",)
    assert not lemma_match("большой", "большим")
    assert lemma_match("елка", "ёлка")


# --------------------------------------------------------------------------------------------
# Statistics


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.236593, abs=1e-6) and high == pytest.approx(0.763407, abs=1e-6)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.841459 / 13.841459, abs=1e-6))
    assert wilson_interval(10, 10) == (pytest.approx(10 / 13.841459, abs=1e-6), 1.0)


def test_wilson_interval_sanity() -> None:
    for successes, n in [(0, 1), (1, 1), (3, 7), (171, 300), (12000, 12216)]:
        low, high = wilson_interval(successes, n)
        assert 0.0 <= low <= successes / n <= high <= 1.0
    # More data, narrower interval at the same proportion.
    width_large = wilson_interval(300, 1000)[1] - wilson_interval(300, 1000)[0]
    width_small = wilson_interval(30, 100)[1] - wilson_interval(30, 100)[0]
    assert width_large < width_small
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_p_known_values() -> None:
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(1, 6) == pytest.approx(2 * (1 + 7) / 128)  # 0.125
    assert mcnemar_exact_p(3, 12) == pytest.approx(2 * sum(math.comb(15, k) for k in range(4)) / 2**15)
    # Thousands of discordant pairs: exact integers, no overflow, and a symmetric test.
    assert 0.0 < mcnemar_exact_p(3000, 3200) < 0.05
    assert mcnemar_exact_p(3000, 3200) == mcnemar_exact_p(3200, 3000)


def test_newcombe_paired_interval_matches_published_implementation() -> None:
    # The 2x2 table [[59, 6], [16, 80]] (Cavo et al. 2012), whose Newcombe square-and-add interval
    # the R package contingencytables tests as -0.0621 (-0.1186 to -0.0046). There the difference
    # is first - second classification; here it is B - A, so B is the first: B right & A wrong = 6.
    low, high = newcombe_paired_interval(both_right=59, a_right_b_wrong=16, a_wrong_b_right=6, both_wrong=80)
    assert low == pytest.approx(-0.1186, abs=5e-5)
    assert high == pytest.approx(-0.0046, abs=5e-5)
    # Swapping the runs mirrors the interval.
    mirrored = newcombe_paired_interval(both_right=59, a_right_b_wrong=6, a_wrong_b_right=16, both_wrong=80)
    assert mirrored == (pytest.approx(-high), pytest.approx(-low))


# --------------------------------------------------------------------------------------------
# compute_metrics


HAND_MADE = [
    record("1", "да", "да", "verify", "rel"),           # right
    record("2", "да", "нет", "verify", "attr"),         # wrong (yes/no inversion)
    record("3", "нет", "Нет.", "logical", "obj"),       # right (case + ASCII punctuation)
    record("4", "красного", "красный", "query", "attr"),  # wrong; lemma match right
    record("5", "стол", "стол", "query", "cat"),        # right
    record("6", "слева", "справа", "choose", "rel"),    # wrong
    record("7", "ёлка", "елка", "query", "obj"),        # wrong; lemma match right (pymorphy folds ё)
    record("8", "да", "да", "compare", "attr"),         # right
]


def test_compute_metrics_hand_made_numbers() -> None:
    metrics = compute_metrics(HAND_MADE)
    headline = metrics["headline"]
    assert headline["label"] == HEADLINE_LABEL == "exact match (lmms-eval gqa_ru rule)"
    assert (headline["n"], headline["correct"], headline["accuracy"]) == (8, 4, 0.5)
    assert headline["interval"] == pytest.approx(list(wilson_interval(4, 8)))

    assert {name: (g["n"], g["correct"]) for name, g in metrics["yes_no"].items()} == {"yes/no": (4, 3), "other": (4, 1)}
    assert list(metrics["yes_no"]) == ["yes/no", "other"]
    assert {name: (g["n"], g["correct"]) for name, g in metrics["binary_open"].items()} == {"binary": (5, 3), "open": (3, 1)}
    assert {name: (g["n"], g["correct"]) for name, g in metrics["structural"].items()} == {
        "choose": (1, 0), "compare": (1, 1), "logical": (1, 1), "query": (3, 1), "verify": (2, 1),
    }
    assert {name: (g["n"], g["correct"]) for name, g in metrics["semantic"].items()} == {
        "attr": (3, 1), "cat": (1, 1), "obj": (2, 1), "rel": (2, 1),
    }
    assert metrics["structural"]["query"]["accuracy"] == pytest.approx(1 / 3)
    assert metrics["structural"]["query"]["interval"] == pytest.approx(list(wilson_interval(1, 3)))

    lemma = metrics["lemma_match"]
    assert "NOT the headline" in lemma["label"]
    assert (lemma["n"], lemma["correct"], lemma["accepted_beyond_headline"]) == (8, 6, 2)
    assert "stored_correct_disagreements" not in metrics
    json.dumps(metrics)  # JSON-ready


def test_compute_metrics_without_types_and_stored_correct() -> None:
    records = [record("1", "да", "да"), record("2", "стол", "стул")]
    records[0]["correct"] = True
    records[1]["correct"] = True  # wrong on purpose: the rule says False
    metrics = compute_metrics(records)
    assert metrics["headline"]["correct"] == 1
    assert metrics["structural"] == {
        "unknown": {"n": 2, "correct": 1, "accuracy": 0.5, "interval": pytest.approx(list(wilson_interval(1, 2)))}
    }
    assert list(metrics["binary_open"]) == ["unknown"]
    assert metrics["stored_correct_disagreements"] == 1
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics([])


# --------------------------------------------------------------------------------------------
# paired_comparison


def test_paired_comparison_uses_only_shared_ids() -> None:
    run_a = [record(str(i), "да", "да" if i < 5 else "нет") for i in range(10)]  # right on 0-4
    run_b = [record(str(i), "да", "да" if i < 8 else "нет") for i in range(2, 12)]  # ids 2-11, right on 2-7
    comparison = paired_comparison(run_a, run_b, label_a="a.jsonl", label_b="b.jsonl")
    assert comparison["n_shared"] == 8  # ids 2..9
    assert (comparison["only_in_a"], comparison["only_in_b"]) == (2, 2)
    assert comparison["a"]["correct"] == 3 and comparison["b"]["correct"] == 6  # on the shared ids only
    assert comparison["a"]["accuracy"] == pytest.approx(3 / 8)
    assert (comparison["a_right_b_wrong"], comparison["a_wrong_b_right"]) == (0, 3)
    assert (comparison["both_right"], comparison["both_wrong"]) == (3, 2)
    assert comparison["difference"]["b_minus_a"] == pytest.approx(3 / 8)
    low, high = comparison["difference"]["interval"]
    assert low < 3 / 8 < high
    assert comparison["mcnemar_exact_p"] == pytest.approx(2 / 8)
    assert len(comparison["warnings"]) == 1 and "do not fully overlap" in comparison["warnings"][0]


def test_paired_comparison_full_overlap_has_no_warning_and_flags_different_answers() -> None:
    run_a = [record("1", "да", "да"), record("2", "нет", "да")]
    run_b = [record("1", "да", "да"), record("2", "нет", "нет")]
    assert paired_comparison(run_a, run_b)["warnings"] == []
    run_b[1]["answer"] = "стол"
    assert "different gold answers" in paired_comparison(run_a, run_b)["warnings"][0]
    with pytest.raises(ValueError, match="share no question id"):
        paired_comparison(run_a, [record("9", "да", "да")])


# --------------------------------------------------------------------------------------------
# Files and `gqaru score`


def test_write_then_read_predictions(tmp_path: Path) -> None:
    path = write_predictions(tmp_path / "run" / "predictions.jsonl", list(reversed(HAND_MADE)))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [str(i) for i in range(1, 9)]
    assert "красного" in lines[3]  # UTF-8 as is, not \u escapes
    assert read_predictions(path) == HAND_MADE
    with pytest.raises(ValueError, match="duplicate"):
        write_predictions(tmp_path / "dup.jsonl", [HAND_MADE[0], HAND_MADE[0]])


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_score_command_prints_headline_first_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_predictions(tmp_path / "predictions.jsonl", HAND_MADE)
    out = tmp_path / "scores" / "metrics.json"
    assert score_command(path, out=out) == 0
    printed = capsys.readouterr().out
    table = printed.splitlines()
    assert table[2].startswith(HEADLINE_LABEL) and "50.00%" in table[2]
    assert "NOT the headline" in printed
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["headline"]["correct"] == 4 and written["lemma_match"]["correct"] == 6


def test_score_command_against_prints_the_paired_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path_a = write_predictions(tmp_path / "a.jsonl", HAND_MADE)
    improved = [dict(item, prediction=item["answer"]) for item in HAND_MADE[:6]]  # right on 1-6, ids 7-8 missing
    path_b = write_predictions(tmp_path / "b.jsonl", improved)
    out = tmp_path / "cmp.json"
    assert cli_main(["score", str(path_a), "--against", str(path_b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paired comparison on 6 shared question ids" in printed
    assert "exact McNemar p" in printed and "do not fully overlap" in printed
    comparison = json.loads(out.read_text(encoding="utf-8"))["comparison"]
    # A is the --against run, B the scored file: the difference reads "scored minus against".
    assert (comparison["a_right_b_wrong"], comparison["a_wrong_b_right"]) == (3, 0)
    assert comparison["labels"]["b"] == str(path_a) and comparison["difference"]["b_minus_a"] < 0
    assert comparison["mcnemar_exact_p"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"id": "1", "answer": "да", "prediction": "да"}', "{not json"], ":2: not valid JSON"),
        (['{"id": "1", "answer": "да"}'], ":1: missing field(s) prediction"),
        (['{"id": "1", "answer": "да", "prediction": 3}'], ":1: field 'prediction' must be a string"),
        (["[1, 2]"], ":1: expected a JSON object"),
        (
            ['{"id": "1", "answer": "да", "prediction": "да"}', "", '{"id": "1", "answer": "нет", "prediction": "да"}'],
            ":3: duplicate id '1' (first seen on line 1)",
        ),
        ([], "no predictions in the file"),
    ],
)
def test_score_command_bad_input_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], expected: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    assert score_command(path) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert f"{path}" in captured.err and expected in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_score_command_missing_file_and_bad_against(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert cli_main(["score", str(missing)]) == 2
    assert f"{missing}: predictions file not found" in capsys.readouterr().err

    good = write_predictions(tmp_path / "good.jsonl", HAND_MADE)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "1", "answer": "\xff", "prediction": "x"}\n')
    assert score_command(good, against=bad) == 2
    assert f"{bad}:1: not UTF-8" in capsys.readouterr().err


def test_read_predictions_raises_a_typed_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ['{"id": "1", "answer": "да", "prediction": "да", "types": "query"}'])
    with pytest.raises(PredictionsError, match=r"p\.jsonl:1: field 'types' must be an object"):
        read_predictions(path)
