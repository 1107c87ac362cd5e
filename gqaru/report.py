"""The error analysis report of an evaluation run: report.md, a self-contained report.html, a chart.

    paths = write_report(run_dir, records, compute_metrics(records), images={image_id: PIL.Image})
    paths["html"], paths["markdown"], paths["chart"]

What it shows, headline first: the lmms-eval-rule accuracy with its interval; accuracy per answer
kind, binary/open, structural, semantic and GQA detailed type (tables and a bar chart; detailed
types most frequent first); the most frequent gold → prediction confusions; yes/no inversions
(да ↔ нет); near-misses that only the lemma match accepts; and a gallery of wrong answers with
image thumbnails, spread over question types and images (seeded: the same run gives the same cards).

report.html needs nothing beside it: CSS is inline, the chart and thumbnails are base64 data
URIs, there is no script. Every string that comes from the dataset or the model (questions,
answers, predictions, ids, type names) is escaped, in HTML and in Markdown alike: a question
holding `<script>` is shown, never run.
"""

from __future__ import annotations

import base64
import html
import io
import os
import random
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from gqaru.metrics import (
    HEADLINE_LABEL,
    exact_match,
    lemma_match,
    normalize_lmms_eval,
)

REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
CHART_NAME = "accuracy_by_type.png"
GALLERY_SIZE = 24
GALLERY_SEED = 0
"""Seed of the gallery's draw: a fixed default, so evaluation (which fetches the images) and the
report pick the same cards."""
DETAILED_CHART_TYPES = 30
"""Detailed types drawn in the chart (the most frequent); the table lists them all."""
THUMBNAIL_PX = 160
TOP_CONFUSIONS = 15
EXAMPLES_PER_LIST = 8

_SECTIONS = (
    ("yes_no", "Answer kind (yes/no = gold да/нет)"),
    ("binary_open", "GQA binary / open (open = structural query)"),
    ("structural", "Structural type"),
    ("semantic", "Semantic type"),
)
_DETAILED_TITLE = "Detailed type (GQA types.detailed, most frequent first)"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.headline{font-size:1.15em}.big{font-size:2.2em;font-weight:600;margin:.1em 0}
.note{color:#666;font-size:.9em}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:.88em}
.card img{display:block;max-width:160px;max-height:160px;margin:0 auto 6px}
.noimg{width:160px;height:60px;margin:0 auto 6px;background:#eee;color:#888;display:flex;
align-items:center;justify-content:center}
.gold{color:#11691a}.pred{color:#a01818}
"""


# --------------------------------------------------------------------------------------------
# Analysis


def _example(record: Mapping[str, Any]) -> dict[str, str]:
    types = record.get("types") if isinstance(record.get("types"), Mapping) else {}
    return {
        "id": str(record.get("id", "")),
        "imageId": str(record.get("imageId", "") or ""),
        "question": str(record.get("question", "") or ""),
        "answer": str(record["answer"]),
        "prediction": str(record["prediction"]),
        "structural": str(types.get("structural", "") or ""),
        "detailed": str(types.get("detailed", "") or ""),
    }


def _gallery_selection(errors: Sequence[Mapping[str, Any]], limit: int, seed: int) -> list[Mapping[str, Any]]:
    """Up to `limit` errors that span the run: structural types take turns (one frequent type does
    not fill the gallery) and each turn picks the error whose image, then whose detailed type, has
    been shown least so far, ties broken in a seeded random order. Picking by id instead showed the
    first ids, which in GQA are the same few images. Deterministic for a seed."""
    rng = random.Random(seed)
    by_type: dict[str, list[dict[str, str]]] = defaultdict(list)
    for record in sorted(errors, key=lambda item: str(item.get("id", ""))):
        example = _example(record)
        by_type[example["structural"]].append(example)
    queues = [by_type[name] for name in sorted(by_type)]
    for queue in queues:
        rng.shuffle(queue)
    images_shown: Counter[str] = Counter()
    detailed_shown: Counter[str] = Counter()
    chosen: list[dict[str, str]] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if not queue or len(chosen) >= limit:
                continue
            best = min(
                range(len(queue)),
                key=lambda index: (images_shown[queue[index]["imageId"]], detailed_shown[queue[index]["detailed"]], index),
            )
            example = queue.pop(best)
            images_shown[example["imageId"]] += 1
            detailed_shown[example["detailed"]] += 1
            chosen.append(example)
    return chosen


def error_analysis(
    records: Sequence[Mapping[str, Any]],
    *,
    top_confusions: int = TOP_CONFUSIONS,
    examples_per_list: int = EXAMPLES_PER_LIST,
    gallery_size: int = GALLERY_SIZE,
    seed: int = GALLERY_SEED,
) -> dict[str, Any]:
    """The error lists of the report, JSON-ready. Correctness is the headline rule, recomputed.

    - confusions: the most frequent (gold, prediction) pairs among errors, both normalised;
    - yes_no_inversions: gold да answered нет, and gold нет answered да (counts and examples);
    - near_misses: errors the lemma match accepts (an inflection away from the gold answer);
    - gallery: up to `gallery_size` errors for the picture gallery, spread over types and images
      (`seed` fixes the draw).
    """
    errors = [record for record in records if not exact_match(record["prediction"], record["answer"])]
    confusion_counts = Counter(
        (normalize_lmms_eval(record["answer"]), normalize_lmms_eval(record["prediction"])) for record in errors
    )
    confusions = [
        {"answer": answer, "prediction": prediction, "count": count}
        for (answer, prediction), count in sorted(confusion_counts.items(), key=lambda item: (-item[1], item[0]))
    ][:top_confusions]

    inversions: dict[str, dict[str, Any]] = {}
    for gold, predicted in (("да", "нет"), ("нет", "да")):
        matching = [
            record
            for record in errors
            if normalize_lmms_eval(record["answer"]) == gold and normalize_lmms_eval(record["prediction"]) == predicted
        ]
        inversions[f"{gold}→{predicted}"] = {
            "count": len(matching),
            "examples": [_example(record) for record in matching[:examples_per_list]],
        }
    yes_no_questions = sum(1 for record in records if normalize_lmms_eval(record["answer"]) in ("да", "нет"))

    near = [record for record in errors if lemma_match(record["prediction"], record["answer"])]
    return {
        "rule": HEADLINE_LABEL,
        "n": len(records),
        "errors": len(errors),
        "confusions": confusions,
        "yes_no_questions": yes_no_questions,
        "yes_no_inversions": inversions,
        "near_misses": {"count": len(near), "examples": [_example(record) for record in near[:examples_per_list]]},
        "gallery": _gallery_selection(errors, gallery_size, seed),
    }


# --------------------------------------------------------------------------------------------
# Images


def detailed_groups(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Accuracy per GQA detailed type, the most frequent type first (ties by name)."""
    groups = metrics.get("detailed") or {}
    return {name: groups[name] for name in sorted(groups, key=lambda name: (-groups[name]["n"], name))}


def _type_tables(metrics: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(title, groups) of every accuracy-by-type table, in report order: the sections, then the
    detailed types most frequent first."""
    tables = [(title, metrics.get(section) or {}) for section, title in _SECTIONS]
    return tables + [(_DETAILED_TITLE, detailed_groups(metrics))]


def _bars(axes: Any, groups: Mapping[str, Mapping[str, Any]], title: str, headline: float) -> None:
    """Horizontal accuracy bars with the 95% intervals as error bars, the overall accuracy dashed."""
    names = list(groups)
    accuracies = [100 * groups[name]["accuracy"] for name in names]
    lower = [max(0.0, 100 * (groups[name]["accuracy"] - groups[name]["interval"][0])) for name in names]
    upper = [max(0.0, 100 * (groups[name]["interval"][1] - groups[name]["accuracy"])) for name in names]
    positions = list(range(len(names)))
    axes.barh(positions, accuracies, xerr=[lower, upper], color="#4c78a8", ecolor="#333", capsize=3)
    axes.set_yticks(positions, [f"{name} (n={groups[name]['n']})" for name in names])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy, % (95% Wilson interval)")
    axes.set_title(title)
    axes.axvline(headline, color="#e45756", linestyle="--", linewidth=1)


def _chart_png(metrics: Mapping[str, Any]) -> bytes:
    """Accuracy per structural and per semantic type side by side, and below them per detailed type
    (the DETAILED_CHART_TYPES most frequent), with the 95% intervals as error bars."""
    # The object-oriented API with an explicit Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    headline = 100 * metrics["headline"]["accuracy"]
    detailed = detailed_groups(metrics)
    shown = dict(list(detailed.items())[:DETAILED_CHART_TYPES])
    detailed_height = max(2.0, 0.28 * len(shown) + 1.0)
    figure = Figure(figsize=(10, 4 + detailed_height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplot_mosaic(
        [["structural", "semantic"], ["detailed", "detailed"]], height_ratios=[4, detailed_height]
    )
    _bars(panels["structural"], metrics.get("structural") or {}, "Structural type", headline)
    _bars(panels["semantic"], metrics.get("semantic") or {}, "Semantic type", headline)
    title = "Detailed type (GQA types.detailed)"
    if len(shown) < len(detailed):
        title += f": the {len(shown)} most frequent of {len(detailed)}"
    _bars(panels["detailed"], shown, title, headline)
    figure.suptitle(f"{HEADLINE_LABEL}: overall {headline:.1f}% (dashed)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _thumbnail_jpeg(image: Image.Image) -> bytes:
    thumbnail = image.copy()
    if thumbnail.mode != "RGB":
        thumbnail = thumbnail.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# --------------------------------------------------------------------------------------------
# Rendering


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&#])")


def _md(text: Any) -> str:
    """Markdown-safe text: special characters backslash-escaped (CommonMark shows them literally,
    so `<script>` stays text), line breaks folded so a table row stays one row."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _interval(group: Mapping[str, Any]) -> str:
    low, high = group["interval"]
    return f"{100 * low:.1f}–{100 * high:.1f}"


def _markdown(metrics: Mapping[str, Any], analysis: Mapping[str, Any], title: str) -> str:
    headline = metrics["headline"]
    lemma = metrics["lemma_match"]
    lines = [
        f"# {_md(title)}",
        "",
        f"**{_md(HEADLINE_LABEL)}: {_percent(headline['accuracy'])}** "
        f"({headline['correct']} / {headline['n']}, 95% CI {_interval(headline)})",
        "",
        f"Rule: {_md(headline['rule'])}.",
        "",
        f"{_md(lemma['label'])}: {_percent(lemma['accuracy'])} ({lemma['correct']} / {lemma['n']}, "
        f"95% CI {_interval(lemma)}); it accepts {lemma['accepted_beyond_headline']} answers the headline rejects.",
        "",
    ]
    if "end_of_turn_stop" in metrics:
        stop = metrics["end_of_turn_stop"]
        lines += [
            f"{_md(stop['label'])}: {_percent(stop['accuracy'])} ({stop['correct']} / {stop['n']}, "
            f"95% CI {_interval(stop)}).",
            "",
        ]
    lines += [
        "## Accuracy by question type",
    ]
    for section_title, groups in _type_tables(metrics):
        lines += ["", f"### {_md(section_title)}", "", "| group | n | correct | accuracy | 95% CI |", "|---|---:|---:|---:|---:|"]
        for name, group in groups.items():
            lines.append(
                f"| {_md(name)} | {group['n']} | {group['correct']} | {_percent(group['accuracy'])} | {_interval(group)} |"
            )
    lines += ["", f"![accuracy by type]({CHART_NAME})", "", "## Most frequent confusions (gold → prediction)", ""]
    if analysis["confusions"]:
        lines += ["| gold | prediction | count |", "|---|---|---:|"]
        lines += [f"| {_md(c['answer'])} | {_md(c['prediction'])} | {c['count']} |" for c in analysis["confusions"]]
    else:
        lines.append("No errors.")
    lines += ["", "## Yes/no inversions", "", f"Of {analysis['yes_no_questions']} yes/no questions:", ""]
    for name, inversion in analysis["yes_no_inversions"].items():
        lines.append(f"- gold {_md(name.replace('→', ' → predicted '))}: {inversion['count']}")
    for name, inversion in analysis["yes_no_inversions"].items():
        if inversion["examples"]:
            lines += ["", f"Examples {_md(name)}:", ""] + _markdown_examples(inversion["examples"])
    near = analysis["near_misses"]
    lines += [
        "",
        "## Near-misses (the lemma match accepts, the headline rejects)",
        "",
        f"{near['count']} errors are an inflection away from the gold answer.",
    ]
    if near["examples"]:
        lines += [""] + _markdown_examples(near["examples"])
    lines += ["", f"## Error examples ({len(analysis['gallery'])}; thumbnails in {REPORT_HTML})", ""]
    lines += _markdown_examples(analysis["gallery"]) if analysis["gallery"] else ["No errors."]
    return "\n".join(lines) + "\n"


def _markdown_examples(examples: Sequence[Mapping[str, str]]) -> list[str]:
    rows = ["| id | image | type | question | gold | prediction |", "|---|---|---|---|---|---|"]
    for example in examples:
        rows.append(
            f"| {_md(example['id'])} | {_md(example['imageId'])} | {_md(_type_label(example))} | "
            f"{_md(example['question'])} | {_md(example['answer'])} | {_md(example['prediction'])} |"
        )
    return rows


def _type_label(example: Mapping[str, str]) -> str:
    """`structural / detailed` (the detailed type left out when the record has none)."""
    return " / ".join(part for part in (example["structural"], example["detailed"]) if part)


def _html_group_table(groups: Mapping[str, Mapping[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_h(name)}</td><td class=num>{group['n']}</td><td class=num>{group['correct']}</td>"
        f"<td class=num>{_percent(group['accuracy'])}</td><td class=num>{_interval(group)}</td></tr>"
        for name, group in groups.items()
    )
    return f"<table><tr><th>group</th><th>n</th><th>correct</th><th>accuracy</th><th>95% CI</th></tr>{rows}</table>"


def _html_examples(examples: Sequence[Mapping[str, str]]) -> str:
    rows = "".join(
        f"<tr><td>{_h(e['id'])}</td><td>{_h(e['imageId'])}</td><td>{_h(_type_label(e))}</td><td>{_h(e['question'])}</td>"
        f"<td class=gold>{_h(e['answer'])}</td><td class=pred>{_h(e['prediction'])}</td></tr>"
        for e in examples
    )
    return (
        "<table><tr><th>id</th><th>image</th><th>type</th><th>question</th><th>gold</th><th>prediction</th></tr>"
        f"{rows}</table>"
    )


def _html(
    metrics: Mapping[str, Any],
    analysis: Mapping[str, Any],
    title: str,
    chart_png: bytes,
    thumbnails: Mapping[str, bytes],
) -> str:
    headline = metrics["headline"]
    lemma = metrics["lemma_match"]
    parts = [
        "<!doctype html>",
        '<html lang="ru"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_h(title)}</h1>",
        '<section class="headline">',
        f'<p class="big">{_percent(headline["accuracy"])}</p>',
        f"<p><b>{_h(HEADLINE_LABEL)}</b> — {headline['correct']} / {headline['n']} correct, "
        f"95% CI {_interval(headline)}</p>",
        f'<p class="note">Rule: {_h(headline["rule"])}.</p>',
        f"<p>{_h(lemma['label'])}: {_percent(lemma['accuracy'])} ({lemma['correct']} / {lemma['n']}, "
        f"95% CI {_interval(lemma)}); it accepts {lemma['accepted_beyond_headline']} answers the headline rejects.</p>",
    ]
    if "end_of_turn_stop" in metrics:
        stop = metrics["end_of_turn_stop"]
        parts.append(
            f"<p>{_h(stop['label'])}: {_percent(stop['accuracy'])} ({stop['correct']} / {stop['n']}, "
            f"95% CI {_interval(stop)})</p>"
        )
    parts += [
        "</section>",
        "<h2>Accuracy by question type</h2>",
    ]
    for section_title, groups in _type_tables(metrics):
        parts += [f"<h3>{_h(section_title)}</h3>", _html_group_table(groups)]
    parts.append(
        f'<p><img alt="accuracy by structural, semantic and detailed type" src="{_data_uri(chart_png, "image/png")}" '
        'style="max-width:100%"></p>'
    )

    parts.append("<h2>Most frequent confusions (gold → prediction)</h2>")
    if analysis["confusions"]:
        rows = "".join(
            f"<tr><td class=gold>{_h(c['answer'])}</td><td class=pred>{_h(c['prediction'])}</td>"
            f"<td class=num>{c['count']}</td></tr>"
            for c in analysis["confusions"]
        )
        parts.append(f"<table><tr><th>gold</th><th>prediction</th><th>count</th></tr>{rows}</table>")
    else:
        parts.append("<p>No errors.</p>")

    parts += ["<h2>Yes/no inversions</h2>", f"<p>Of {analysis['yes_no_questions']} yes/no questions:</p><ul>"]
    for name, inversion in analysis["yes_no_inversions"].items():
        gold, predicted = name.split("→")
        parts.append(f"<li>gold <b>{_h(gold)}</b> → predicted <b>{_h(predicted)}</b>: {inversion['count']}</li>")
    parts.append("</ul>")
    for name, inversion in analysis["yes_no_inversions"].items():
        if inversion["examples"]:
            parts += [f"<h3>Examples {_h(name)}</h3>", _html_examples(inversion["examples"])]

    near = analysis["near_misses"]
    parts += [
        "<h2>Near-misses (the lemma match accepts, the headline rejects)</h2>",
        f"<p>{near['count']} errors are an inflection away from the gold answer.</p>",
    ]
    if near["examples"]:
        parts.append(_html_examples(near["examples"]))

    parts.append(f"<h2>Error examples ({len(analysis['gallery'])})</h2>")
    if analysis["gallery"]:
        cards = []
        for example in analysis["gallery"]:
            thumbnail = thumbnails.get(example["imageId"])
            picture = (
                f'<img alt="image {_h(example["imageId"])}" src="{_data_uri(thumbnail, "image/jpeg")}">'
                if thumbnail is not None
                else '<div class="noimg">no image</div>'
            )
            cards.append(
                f'<div class="card">{picture}<div>{_h(example["question"])}</div>'
                f'<div>gold: <b class="gold">{_h(example["answer"])}</b></div>'
                f'<div>predicted: <b class="pred">{_h(example["prediction"])}</b></div>'
                f'<div class="note">{_h(_type_label(example))} · image {_h(example["imageId"])} · id {_h(example["id"])}'
                "</div></div>"
            )
        parts.append(f'<div class="gallery">{"".join(cards)}</div>')
    else:
        parts.append("<p>No errors.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden sibling, then rename (a plain open: usual umask permissions, not 0600)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_report(
    run_dir: str | os.PathLike[str],
    records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    images: Mapping[str, Image.Image] | None = None,
    *,
    title: str = "GQA-ru evaluation report",
    seed: int = GALLERY_SEED,
) -> dict[str, Path]:
    """Write report.md, report.html and accuracy_by_type.png into `run_dir`.

    `metrics` is `compute_metrics(records)`. `images` maps imageId to a PIL image for the
    gallery's thumbnails; it may be None or lack ids (those cards show no picture).
    Returns {"markdown": path, "html": path, "chart": path}.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    analysis = error_analysis(records, seed=seed)

    thumbnails: dict[str, bytes] = {}
    for example in analysis["gallery"]:
        image_id = example["imageId"]
        if images is not None and image_id in images and image_id not in thumbnails:
            thumbnails[image_id] = _thumbnail_jpeg(images[image_id])

    chart_png = _chart_png(metrics)
    paths = {"markdown": run_dir / REPORT_MARKDOWN, "html": run_dir / REPORT_HTML, "chart": run_dir / CHART_NAME}
    _write_bytes_atomic(paths["chart"], chart_png)
    _write_bytes_atomic(paths["markdown"], _markdown(metrics, analysis, title).encode("utf-8"))
    _write_bytes_atomic(paths["html"], _html(metrics, analysis, title, chart_png, thumbnails).encode("utf-8"))
    return paths
