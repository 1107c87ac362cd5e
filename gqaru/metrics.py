"""Answer matching and scores for GQA-ru predictions, and the `gqaru score` command.

The headline is the lmms-eval `gqa_ru` rule, so numbers compare with published ones: lower-case
both strings, delete the ASCII punctuation of Python's `string.punctuation`, compare exactly.
Nothing else — no ё→е folding, no whitespace stripping, non-ASCII punctuation («», —, …) kept.
(lmms-eval's task loop strips the *generated* text before it calls the metric; that strip belongs
to whoever produces `prediction`, not to the rule here.)

Also reported, never as the headline:
- yes/no vs other questions (gold answer, normalised, in {да, нет});
- accuracy per `types.structural` and per `types.semantic`;
- GQA's binary/open split (open = structural `query`, binary = every other structural type);
- a lemma-aware Russian match (pymorphy3 normal forms), because GQA-ru answers are inflected
  («красного», «большим») and a model that answers «красный» is not wrong about the colour.
  The first pymorphy3 parse is a guess, not an oracle: «большим» lemmatises to «больший», so
  «большой» still fails; its dictionary folds «елка» into «ёлка», which the headline does not.
Every accuracy carries a 95% Wilson score interval: it stays inside [0, 1] and behaves at the
0% / 100% ends that small per-type groups reach.

Two runs compare on their shared question ids (`paired_comparison`): the difference with a
Newcombe paired interval and the exact McNemar test on the discordant questions.

    records = read_predictions("runs/x/predictions.jsonl")
    metrics = compute_metrics(records)          # a JSON-ready dict
    print(format_metrics(metrics))
"""

from __future__ import annotations

import functools
import json
import math
import os
import string
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HEADLINE_LABEL = "exact match (lmms-eval gqa_ru rule)"
HEADLINE_RULE = (
    "lower-case both strings, remove ASCII punctuation (Python string.punctuation), compare exactly; "
    "no ё→е, no whitespace stripping"
)
END_OF_TURN_LABEL = "exact match, answer cut at the first end-of-turn token — secondary, NOT lmms-eval"
END_OF_TURN_RULE = (
    "the headline rule on prediction_at_end_of_turn: the same generated tokens, also stopped at the first "
    "end-of-turn token of the model's template (<end_of_turn> for Gemma; lmms-eval stops at eos only and "
    "decodes past it)"
)
END_OF_TURN_FIELD = "prediction_at_end_of_turn"
LEMMA_LABEL = "lemma match (pymorphy3 normal forms) — secondary, NOT the headline"
LEMMA_RULE = (
    "the headline normalisation, then split on whitespace and replace each token by the normal form "
    "of its first pymorphy3 parse; match when the lemma sequences are equal"
)
INTERVAL_METHOD = "Wilson score interval, 95%"
PAIRED_INTERVAL_METHOD = "Newcombe hybrid score interval for paired proportions (method 10), 95%"
YES_NO_ANSWERS = frozenset({"да", "нет"})
OPEN_STRUCTURAL_TYPE = "query"
UNKNOWN_TYPE = "unknown"
REQUIRED_FIELDS = ("id", "answer", "prediction")

Z_95 = 1.959963984540054
"""The standard normal quantile for a two-sided 95% interval."""

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


class PredictionsError(ValueError):
    """A predictions file that cannot be scored: names the file, the line and what is wrong."""


# --------------------------------------------------------------------------------------------
# Matching


def normalize_lmms_eval(text: str) -> str:
    """The lmms-eval `gqa_ru` normalisation: lower-case, then delete ASCII punctuation. Nothing else."""
    return text.lower().translate(_PUNCTUATION_TABLE)


def exact_match(prediction: str, answer: str) -> bool:
    """The headline match: equal after `normalize_lmms_eval` on both sides."""
    return normalize_lmms_eval(prediction) == normalize_lmms_eval(answer)


@functools.cache
def _morph_analyzer() -> Any:
    """The pymorphy3 analyzer, built on first use (loading its dictionaries takes about a second)."""
    import pymorphy3

    return pymorphy3.MorphAnalyzer()


@functools.lru_cache(maxsize=65536)
def _lemma(token: str) -> str:
    """Normal form of a token's first (most probable) parse; answers repeat, so it is cached."""
    return _morph_analyzer().parse(token)[0].normal_form


def lemmatize(text: str) -> tuple[str, ...]:
    """The lemma sequence of a text after the headline normalisation."""
    return tuple(_lemma(token) for token in normalize_lmms_eval(text).split())


def lemma_match(prediction: str, answer: str) -> bool:
    """The secondary, lemma-aware match: «красного» matches «красный». Never the headline."""
    return exact_match(prediction, answer) or lemmatize(prediction) == lemmatize(answer)


def is_yes_no(answer: str) -> bool:
    """Whether a gold answer is a yes/no answer (да / нет after normalisation)."""
    return normalize_lmms_eval(answer) in YES_NO_ANSWERS


# --------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n."""
    if n <= 0:
        raise ValueError(f"a Wilson interval needs n > 0, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    proportion = successes / n
    z_squared = z * z
    denominator = 1.0 + z_squared / n
    centre = (proportion + z_squared / (2 * n)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / n + z_squared / (4 * n * n)) / denominator
    # At 0 and n the bound is exactly 0 (resp. 1); rounding would leave 1e-17 or 0.9999999999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return low, high


def mcnemar_exact_p(a_right_b_wrong: int, a_wrong_b_right: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test (p = 1/2) on the discordant pairs.

    Exact integer arithmetic (math.comb), so thousands of discordant pairs lose no precision.
    No discordant pairs at all is no evidence of a difference: p = 1.
    """
    if a_right_b_wrong < 0 or a_wrong_b_right < 0:
        raise ValueError("discordant counts must be non-negative")
    discordant = a_right_b_wrong + a_wrong_b_right
    if discordant == 0:
        return 1.0
    smaller = min(a_right_b_wrong, a_wrong_b_right)
    tail = sum(math.comb(discordant, k) for k in range(smaller + 1))
    return min(1.0, 2 * tail / 2**discordant)


def newcombe_paired_interval(
    both_right: int, a_right_b_wrong: int, a_wrong_b_right: int, both_wrong: int, z: float = Z_95
) -> tuple[float, float]:
    """Interval for accuracy(B) - accuracy(A) on paired questions (Newcombe 1998, method 10).

    Built from the Wilson intervals of the two accuracies and the phi correlation of the 2x2
    table; unlike the Wald interval it stays inside [-1, 1] and does not collapse when the
    discordant counts are small.
    """
    n = both_right + a_right_b_wrong + a_wrong_b_right + both_wrong
    if n <= 0:
        raise ValueError("a paired interval needs at least one shared question")
    correct_b = both_right + a_wrong_b_right
    correct_a = both_right + a_right_b_wrong
    accuracy_b, accuracy_a = correct_b / n, correct_a / n
    low_b, high_b = wilson_interval(correct_b, n, z)
    low_a, high_a = wilson_interval(correct_a, n, z)
    # phi, the correlation of the two outcomes, with Newcombe's correction: a positive
    # cross-product difference is reduced by n/2 (and floored at 0), a negative one is kept.
    margins = correct_b * (n - correct_b) * correct_a * (n - correct_a)
    cross = both_right * both_wrong - a_wrong_b_right * a_right_b_wrong
    phi = 0.0
    if margins > 0:
        phi = (max(cross - n / 2, 0.0) if cross >= 0 else cross) / math.sqrt(margins)
    difference = accuracy_b - accuracy_a
    # Square and add the distances from each accuracy to the Wilson bound on the relevant side.
    below_b, above_a = accuracy_b - low_b, high_a - accuracy_a
    above_b, below_a = high_b - accuracy_b, accuracy_a - low_a
    delta = math.sqrt(max(0.0, below_b**2 - 2 * phi * below_b * above_a + above_a**2))
    epsilon = math.sqrt(max(0.0, above_b**2 - 2 * phi * above_b * below_a + below_a**2))
    return max(-1.0, difference - delta), min(1.0, difference + epsilon)


def _group(correct: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n, "interval": [low, high]}


def _groups(outcomes: Mapping[str, list[bool]], order: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """One group per name: the names in `order` first (when present), then the rest sorted."""
    names = [name for name in order if name in outcomes] + sorted(name for name in outcomes if name not in order)
    return {name: _group(sum(outcomes[name]), len(outcomes[name])) for name in names}


# --------------------------------------------------------------------------------------------
# Scores


def _record_types(record: Mapping[str, Any]) -> Mapping[str, Any]:
    types = record.get("types")
    return types if isinstance(types, Mapping) else {}


def _type_name(record: Mapping[str, Any], kind: str) -> str:
    value = _record_types(record).get(kind)
    return value if isinstance(value, str) and value else UNKNOWN_TYPE


def compute_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every score of a set of predictions, as a JSON-ready dict.

    `records` need `answer` and `prediction`; `types` is optional (missing types count under
    "unknown"). Correctness is recomputed from the strings, never taken from a stored `correct`;
    when records carry one, the number that disagree is reported (it should be 0).

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no predictions to score")
    strict = [exact_match(record["prediction"], record["answer"]) for record in records]
    lemma = [lemma_match(record["prediction"], record["answer"]) for record in records]

    yes_no: dict[str, list[bool]] = defaultdict(list)
    structural: dict[str, list[bool]] = defaultdict(list)
    semantic: dict[str, list[bool]] = defaultdict(list)
    detailed: dict[str, list[bool]] = defaultdict(list)
    binary_open: dict[str, list[bool]] = defaultdict(list)
    for record, correct in zip(records, strict):
        yes_no["yes/no" if is_yes_no(record["answer"]) else "other"].append(correct)
        structural_type = _type_name(record, "structural")
        structural[structural_type].append(correct)
        semantic[_type_name(record, "semantic")].append(correct)
        detailed[_type_name(record, "detailed")].append(correct)
        if structural_type == UNKNOWN_TYPE:
            binary_open[UNKNOWN_TYPE].append(correct)
        else:
            binary_open["open" if structural_type == OPEN_STRUCTURAL_TYPE else "binary"].append(correct)

    n = len(records)
    metrics: dict[str, Any] = {
        "headline": {"label": HEADLINE_LABEL, "rule": HEADLINE_RULE, **_group(sum(strict), n)},
        "interval_method": INTERVAL_METHOD,
        "yes_no": _groups(yes_no, order=("yes/no", "other")),
        "binary_open": _groups(binary_open),
        "structural": _groups(structural),
        "semantic": _groups(semantic),
        "detailed": _groups(detailed),  # GQA's fine-grained type (types.detailed)
        "lemma_match": {
            "label": LEMMA_LABEL,
            "rule": LEMMA_RULE,
            **_group(sum(lemma), n),
            "accepted_beyond_headline": sum(1 for by_rule, by_lemma in zip(strict, lemma) if by_lemma and not by_rule),
        },
    }
    if records and all(END_OF_TURN_FIELD in record for record in records):
        at_end_of_turn = sum(exact_match(record[END_OF_TURN_FIELD], record["answer"]) for record in records)
        metrics["end_of_turn_stop"] = {"label": END_OF_TURN_LABEL, "rule": END_OF_TURN_RULE, **_group(at_end_of_turn, n)}
    stored = [(record["correct"], correct) for record, correct in zip(records, strict) if "correct" in record]
    if stored:
        metrics["stored_correct_disagreements"] = sum(1 for given, recomputed in stored if bool(given) != recomputed)
    return metrics


def paired_comparison(
    records_a: Sequence[Mapping[str, Any]],
    records_b: Sequence[Mapping[str, Any]],
    *,
    label_a: str = "A",
    label_b: str = "B",
) -> dict[str, Any]:
    """Compare two runs on the question ids both answered (headline rule), as a JSON-ready dict.

    The difference is accuracy(B) - accuracy(A). Ids answered by one run only are left out and
    counted under `warnings`, as are shared ids whose gold answers differ (different data).

    Raises:
        ValueError: the runs share no question id.
    """
    by_id_a = {str(record["id"]): record for record in records_a}
    by_id_b = {str(record["id"]): record for record in records_b}
    shared = sorted(by_id_a.keys() & by_id_b.keys())
    if not shared:
        raise ValueError(f"{label_a} and {label_b} share no question id: nothing to compare")

    cells = {"both_right": 0, "a_right_b_wrong": 0, "a_wrong_b_right": 0, "both_wrong": 0}
    answer_mismatches: list[str] = []
    for question_id in shared:
        record_a, record_b = by_id_a[question_id], by_id_b[question_id]
        if record_a["answer"] != record_b["answer"]:
            answer_mismatches.append(question_id)
        right_a = exact_match(record_a["prediction"], record_a["answer"])
        right_b = exact_match(record_b["prediction"], record_b["answer"])
        if right_a and right_b:
            cells["both_right"] += 1
        elif right_a:
            cells["a_right_b_wrong"] += 1
        elif right_b:
            cells["a_wrong_b_right"] += 1
        else:
            cells["both_wrong"] += 1

    n = len(shared)
    correct_a = cells["both_right"] + cells["a_right_b_wrong"]
    correct_b = cells["both_right"] + cells["a_wrong_b_right"]
    only_a = sorted(by_id_a.keys() - by_id_b.keys())
    only_b = sorted(by_id_b.keys() - by_id_a.keys())
    warnings = []
    if only_a or only_b:
        warnings.append(
            f"question ids do not fully overlap: compared on {n} shared ids; {len(only_a)} only in {label_a}"
            f"{_examples(only_a)}, {len(only_b)} only in {label_b}{_examples(only_b)}"
        )
    if answer_mismatches:
        warnings.append(
            f"{len(answer_mismatches)} shared ids have different gold answers in the two files"
            f"{_examples(answer_mismatches)}: are they from the same data?"
        )
    low, high = newcombe_paired_interval(
        cells["both_right"], cells["a_right_b_wrong"], cells["a_wrong_b_right"], cells["both_wrong"]
    )
    return {
        "rule": HEADLINE_LABEL,
        "labels": {"a": label_a, "b": label_b},
        "n_shared": n,
        "only_in_a": len(only_a),
        "only_in_b": len(only_b),
        "a": _group(correct_a, n),
        "b": _group(correct_b, n),
        "difference": {
            "b_minus_a": (correct_b - correct_a) / n,
            "interval": [low, high],
            "method": PAIRED_INTERVAL_METHOD,
        },
        **cells,
        "mcnemar_exact_p": mcnemar_exact_p(cells["a_right_b_wrong"], cells["a_wrong_b_right"]),
        "warnings": warnings,
    }


def _examples(ids: Sequence[str], limit: int = 3) -> str:
    if not ids:
        return ""
    shown = ", ".join(ids[:limit])
    return f" (e.g. {shown}{', ...' if len(ids) > limit else ''})"


# --------------------------------------------------------------------------------------------
# Files


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a predictions.jsonl: one JSON object per line with at least id, answer, prediction.

    Blank lines are skipped. `types`, when present, must be an object.

    Raises:
        PredictionsError: the file is missing or unreadable, a line is not UTF-8 or not a JSON
            object, a required field is missing or not a string, or an id repeats. The message
            names the file and the line.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise PredictionsError(f"{path}: predictions file not found") from None
    except OSError as error:
        raise PredictionsError(f"{path}: cannot read the predictions file ({error.strerror or error})") from None

    records: list[dict[str, Any]] = []
    first_line_of: dict[str, int] = {}
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise PredictionsError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise PredictionsError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise PredictionsError(f"{where}: expected a JSON object, got {type(record).__name__}")
            missing = [name for name in REQUIRED_FIELDS if name not in record]
            if missing:
                raise PredictionsError(
                    f"{where}: missing field(s) {', '.join(missing)} (each record needs {', '.join(REQUIRED_FIELDS)})"
                )
            for name in REQUIRED_FIELDS:
                if not isinstance(record[name], str):
                    raise PredictionsError(
                        f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}"
                    )
            if not record["id"]:
                raise PredictionsError(f"{where}: empty id")
            if "types" in record and record["types"] is not None and not isinstance(record["types"], dict):
                raise PredictionsError(f"{where}: field 'types' must be an object, got {type(record['types']).__name__}")
            question_id = record["id"]
            if question_id in first_line_of:
                raise PredictionsError(
                    f"{where}: duplicate id {question_id!r} (first seen on line {first_line_of[question_id]})"
                )
            first_line_of[question_id] = line_number
            records.append(record)
    return records


def write_predictions(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write predictions.jsonl: sorted by id, one JSON object per line, UTF-8 text as is.

    Written to a temporary file and renamed, so a reader never sees half a file.

    Raises:
        ValueError: a record without an id, or a repeated id.
    """
    path = Path(path)
    by_id: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if "id" not in record:
            raise ValueError(f"a prediction record has no id: {dict(record)!r}")
        question_id = str(record["id"])
        if question_id in by_id:
            raise ValueError(f"duplicate prediction id {question_id!r}")
        by_id[question_id] = record
    lines = [json.dumps(dict(by_id[question_id]), ensure_ascii=False) + "\n" for question_id in sorted(by_id)]
    _write_text_atomic(path, "".join(lines))
    return path


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write a metrics JSON (indented, UTF-8 text as is) atomically."""
    path = Path(path)
    _write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden sibling, then rename: a reader sees the old file or the new one, never half.
    (A plain open, not mkstemp, so the file gets the usual umask permissions, not 0600.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with staging.open("w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Text output


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _interval_text(interval: Sequence[float]) -> str:
    return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _table(rows: list[list[str]], right_aligned_from: int = 1) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column >= right_aligned_from else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """A readable table of `compute_metrics` output, headline first."""
    rows = [["", "n", "correct", "accuracy", "95% CI"]]

    def add(name: str, group: Mapping[str, Any]) -> None:
        rows.append(
            [name, str(group["n"]), str(group["correct"]), _percent(group["accuracy"]), _interval_text(group["interval"])]
        )

    add(metrics["headline"]["label"], metrics["headline"])
    sections = (("yes_no", "answer"), ("binary_open", "binary/open"), ("structural", "structural"), ("semantic", "semantic"))
    for section, title in sections:
        for name, group in metrics[section].items():
            add(f"  {title}: {name}", group)
    add(metrics["lemma_match"]["label"], metrics["lemma_match"])
    if "end_of_turn_stop" in metrics:
        add(metrics["end_of_turn_stop"]["label"], metrics["end_of_turn_stop"])
    lines = [_table(rows), f"(intervals: {metrics['interval_method']})"]
    lines.append(
        f"lemma match accepts {metrics['lemma_match']['accepted_beyond_headline']} answers the headline rejects"
    )
    disagreements = metrics.get("stored_correct_disagreements")
    if disagreements:
        lines.append(f"warning: {disagreements} records carry a stored 'correct' that disagrees with the rule")
    return "\n".join(lines)


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """A readable summary of `paired_comparison` output."""
    label_a, label_b = comparison["labels"]["a"], comparison["labels"]["b"]
    difference = comparison["difference"]
    rows = [
        ["", "n", "correct", "accuracy", "95% CI"],
        ["A: " + label_a, str(comparison["n_shared"]), str(comparison["a"]["correct"]),
         _percent(comparison["a"]["accuracy"]), _interval_text(comparison["a"]["interval"])],
        ["B: " + label_b, str(comparison["n_shared"]), str(comparison["b"]["correct"]),
         _percent(comparison["b"]["accuracy"]), _interval_text(comparison["b"]["interval"])],
    ]
    lines = [
        f"paired comparison on {comparison['n_shared']} shared question ids ({comparison['rule']})",
        _table(rows),
        f"difference B - A: {100 * difference['b_minus_a']:+.2f} points, 95% CI "
        f"[{100 * difference['interval'][0]:+.2f}, {100 * difference['interval'][1]:+.2f}]",
        f"discordant: A right/B wrong {comparison['a_right_b_wrong']}, A wrong/B right {comparison['a_wrong_b_right']}"
        f"; exact McNemar p = {comparison['mcnemar_exact_p']:.4g}",
    ]
    lines.extend(f"warning: {warning}" for warning in comparison["warnings"])
    return "\n".join(lines)


def score_command(
    path: str | os.PathLike[str],
    against: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
) -> int:
    """`gqaru score PREDICTIONS [--against OTHER] [--out JSON]`: print the metrics, optionally compare.

    With `against`, PREDICTIONS is A and OTHER is B (difference = B - A). The JSON written to
    `out` is the metrics of PREDICTIONS, plus "comparison" when `against` is given.
    Returns 0, or 2 (with a message naming the file and line on stderr) for bad input.
    """
    try:
        records = read_predictions(path)
        if not records:
            raise PredictionsError(f"{path}: no predictions in the file")
        metrics = compute_metrics(records)
        comparison = None
        if against is not None:
            other = read_predictions(against)
            if not other:
                raise PredictionsError(f"{against}: no predictions in the file")
            # The file scored first is the run under test: report it minus the one it is compared against.
            comparison = paired_comparison(other, records, label_a=str(against), label_b=str(path))
    except (PredictionsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"predictions: {path}")
    print(format_metrics(metrics))
    payload: dict[str, Any] = {"predictions": str(path), **metrics}
    if comparison is not None:
        print()
        print(format_comparison(comparison))
        payload["comparison"] = comparison
    if out is not None:
        try:
            write_json(out, payload)
        except OSError as error:
            print(f"error: cannot write {out}: {error.strerror or error}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
    return 0
