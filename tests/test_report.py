"""The error analysis report: which files appear, what they say, and that dataset text stays text."""

from __future__ import annotations

import base64
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gqaru.metrics import HEADLINE_LABEL, compute_metrics, exact_match
from gqaru.report import GALLERY_SIZE, THUMBNAIL_PX, error_analysis, write_report

PLANTED = '<script>alert("x")</script> Какого цвета & «мяч»?'
STRUCTURAL = ["verify", "query", "logical", "choose", "compare"]
SEMANTIC = ["attr", "rel", "obj", "cat", "global"]
DETAILED = ["existRelS", "verifyAttr", "queryAttr"]


def make_records() -> list[dict[str, Any]]:
    """40 questions over 4 images; the pattern repeats every 8 ids (3 right, 5 wrong of 8)."""
    pattern = [
        ("да", "да"),            # right
        ("да", "нет"),           # yes/no inversion да→нет
        ("нет", "да"),           # inversion нет→да
        ("красного", "красный"),  # near-miss
        ("стол", "стул"),        # plain error
        ("нет", "нет"),          # right
        ("слева", "справа"),     # plain error
        ("большим", "Большим."),  # right (case + ASCII punctuation)
    ]
    records = []
    for index in range(40):
        answer, prediction = pattern[index % 8]
        records.append(
            {
                "id": f"q{index:03d}",
                "imageId": f"img{index % 4}",
                "question": PLANTED if index == 1 else f"Вопрос номер {index}?",
                "answer": answer,
                "prediction": prediction,
                "types": {
                    "structural": STRUCTURAL[index % 5],
                    "semantic": SEMANTIC[(index // 5) % 5],
                    "detailed": DETAILED[index % 3],  # 14, 13, 13 questions
                },
            }
        )
    return records


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    records = make_records()
    images = {
        "img0": Image.new("RGB", (640, 480), (200, 30, 30)),
        "img1": Image.new("L", (120, 400), 90),           # greyscale, tall
        "img2": Image.new("RGBA", (300, 300), (0, 0, 255, 128)),
        # img3 missing on purpose: its cards show no thumbnail
    }
    run_dir = tmp_path_factory.mktemp("run")
    paths = write_report(run_dir, records, compute_metrics(records), images, title="Тест <b>отчёт</b>")
    return {"records": records, "paths": paths, "run_dir": run_dir}


def test_report_files_appear(report: dict[str, Any]) -> None:
    run_dir = report["run_dir"]
    assert report["paths"] == {
        "markdown": run_dir / "report.md",
        "html": run_dir / "report.html",
        "chart": run_dir / "accuracy_by_type.png",
    }
    assert sorted(path.name for path in run_dir.iterdir()) == ["accuracy_by_type.png", "report.html", "report.md"]


def test_chart_is_a_valid_png(report: dict[str, Any]) -> None:
    with Image.open(report["paths"]["chart"]) as chart:
        assert chart.format == "PNG"
        chart.verify()
    with Image.open(report["paths"]["chart"]) as chart:
        assert chart.size[0] >= 400 and chart.size[1] >= 200


def test_html_escapes_dataset_text(report: dict[str, Any]) -> None:
    page = report["paths"]["html"].read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; Какого цвета &amp; «мяч»?" in page
    assert "<title>Тест &lt;b&gt;отчёт&lt;/b&gt;</title>" in page


def test_html_is_self_contained_with_chart_and_thumbnails(report: dict[str, Any]) -> None:
    page = report["paths"]["html"].read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/") for source in sources)
    assert "<link" not in page and "http://" not in page and "https://" not in page

    charts = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(charts) == 1
    assert base64.b64decode(charts[0]) == report["paths"]["chart"].read_bytes()

    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert thumbnails
    for encoded in thumbnails:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as thumbnail:
            assert thumbnail.format == "JPEG" and max(thumbnail.size) <= THUMBNAIL_PX
    # The tall greyscale image keeps its aspect ratio: 120x400 -> 48x160.
    sizes = {Image.open(io.BytesIO(base64.b64decode(encoded))).size for encoded in thumbnails}
    assert (48, 160) in sizes and (160, 120) in sizes


def test_gallery_is_bounded_and_marks_missing_images(report: dict[str, Any]) -> None:
    page = report["paths"]["html"].read_text(encoding="utf-8")
    cards = page.count('<div class="card">')
    errors = sum(1 for record in report["records"] if record["answer"].lower() != record["prediction"].lower().rstrip("."))
    assert errors == 25 and cards == GALLERY_SIZE == 24
    analysis = error_analysis(report["records"])
    expected_without_image = sum(1 for example in analysis["gallery"] if example["imageId"] == "img3")
    assert expected_without_image > 0
    assert page.count('<div class="noimg">no image</div>') == expected_without_image


def test_error_analysis_counts(report: dict[str, Any]) -> None:
    analysis = error_analysis(report["records"])
    assert (analysis["n"], analysis["errors"]) == (40, 25)
    assert analysis["yes_no_questions"] == 20
    assert analysis["yes_no_inversions"]["да→нет"]["count"] == 5
    assert analysis["yes_no_inversions"]["нет→да"]["count"] == 5
    assert analysis["near_misses"]["count"] == 5
    assert {example["prediction"] for example in analysis["near_misses"]["examples"]} == {"красный"}
    assert analysis["confusions"][:5] == [
        {"answer": answer, "prediction": prediction, "count": 5}
        for answer, prediction in [
            ("да", "нет"), ("красного", "красный"), ("нет", "да"), ("слева", "справа"), ("стол", "стул")
        ]
    ]
    # The gallery takes turns over structural types, so no type fills it.
    types = [example["structural"] for example in analysis["gallery"]]
    assert len(types) == 24 and set(types) == set(STRUCTURAL)


def test_markdown_report_content(report: dict[str, Any]) -> None:
    text = report["paths"]["markdown"].read_text(encoding="utf-8")
    first_lines = text.splitlines()[:4]
    assert first_lines[0] == "# Тест \\<b\\>отчёт\\</b\\>"
    assert "exact match (lmms-eval gqa\\_ru rule): 37.5%" in first_lines[2]  # 15 / 40
    assert "(15 / 40, 95% CI" in first_lines[2]
    assert "NOT the headline" in text
    assert "![accuracy by type](accuracy_by_type.png)" in text
    assert re.search(r"(?<!\\)<", text) is None  # every "<" is backslash-escaped: shown, never HTML
    assert "\\<script\\>alert(\"x\")\\</script\\> Какого цвета \\& «мяч»?" in text
    assert "gold да → predicted нет: 5" in text


def test_report_without_images(tmp_path: Path) -> None:
    records = make_records()[:8]
    paths = write_report(tmp_path, records, compute_metrics(records), None)
    page = paths["html"].read_text(encoding="utf-8")
    assert "data:image/jpeg" not in page and "data:image/png;base64," in page
    assert page.count('<div class="noimg">no image</div>') == 5
    assert HEADLINE_LABEL in page


def test_detailed_type_table_most_frequent_first(report: dict[str, Any]) -> None:
    records = report["records"]
    expected = {}
    for name in DETAILED:
        mine = [record for record in records if record["types"]["detailed"] == name]
        expected[name] = (len(mine), sum(exact_match(record["prediction"], record["answer"]) for record in mine))
    assert [count for count, _ in expected.values()] == [14, 13, 13]
    metrics = compute_metrics(records)
    assert {name: (group["n"], group["correct"]) for name, group in metrics["detailed"].items()} == expected

    text = report["paths"]["markdown"].read_text(encoding="utf-8")
    table = text.split("### Detailed type")[1].split("\n\n")[1].splitlines()
    # Most frequent first, ties by name: existRelS (14), then queryAttr and verifyAttr (13 each).
    assert [row.split("|")[1].strip() for row in table[2:]] == ["existRelS", "queryAttr", "verifyAttr"]
    count, correct = expected["existRelS"]
    assert table[2].startswith(f"| existRelS | {count} | {correct} | {100 * correct / count:.1f}% |")
    page = report["paths"]["html"].read_text(encoding="utf-8")
    assert "<h3>Detailed type (GQA types.detailed, most frequent first)</h3>" in page
    assert f"<tr><td>existRelS</td><td class=num>{count}</td><td class=num>{correct}</td>" in page


def spread_records() -> list[dict[str, Any]]:
    """60 wrong answers: the first 30 ids all about one image (as GQA's ids cluster by image), the
    other 30 each about its own image; 5 structural and 10 detailed types."""
    return [
        {
            "id": f"q{index:03d}",
            "imageId": "crowded" if index < 30 else f"img{index:03d}",
            "question": f"Вопрос {index}?",
            "answer": "стол",
            "prediction": "стул",
            "types": {"structural": STRUCTURAL[index % 5], "semantic": "obj", "detailed": f"detail{index % 10}"},
        }
        for index in range(60)
    ]


def test_gallery_spans_images_and_types() -> None:
    gallery = error_analysis(spread_records())["gallery"]
    assert len(gallery) == GALLERY_SIZE == 24
    assert len({example["id"] for example in gallery}) == 24
    # Taking the first ids per type showed "crowded" over and over; now every card is another image.
    assert len({example["imageId"] for example in gallery}) == 24
    assert {example["detailed"] for example in gallery} == {f"detail{index}" for index in range(10)}
    per_type = Counter(example["structural"] for example in gallery)
    assert set(per_type) == set(STRUCTURAL) and min(per_type.values()) >= 4


def test_gallery_is_seeded() -> None:
    records = spread_records()
    first = [example["id"] for example in error_analysis(records, seed=0)["gallery"]]
    assert [example["id"] for example in error_analysis(list(reversed(records)), seed=0)["gallery"]] == first
    assert [example["id"] for example in error_analysis(records, seed=1)["gallery"]] != first
