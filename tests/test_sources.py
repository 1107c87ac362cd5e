"""GQA-ru sources: the hub-layout reader, the column checks, the seeded selection and the streamed join.

`write_source` builds a tiny local source in the deepvk/GQA-ru hub layout (README.md with a YAML
`configs:` section, parquet files written by `datasets` with an `Image()` column); test_shards.py
reuses it to plant bad input.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from gqaru import sources as sources_module
from gqaru.sources import (
    REJECTION_REASONS,
    Question,
    SourceError,
    SplitReader,
    images_config,
    instructions_config,
    seed_report_rows,
    select_question_ids,
)

TYPES = {"structural": "query", "semantic": "attr", "detailed": "colorQuery"}


def jpeg_bytes(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, size, color if mode != "L" else color[0]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def question_row(
    question_id: str, image_id: str, question: str = "Какого цвета круг?", answer: str = "красного"
) -> dict[str, Any]:
    return {
        "id": question_id,
        "imageId": image_id,
        "question": question,
        "answer": answer,
        "fullAnswer": f"Круг {answer}." if answer.strip() else "",
        "isBalanced": True,
        "types": dict(TYPES),
    }


def write_source(
    root: Path,
    splits: dict[str, tuple[Sequence[dict[str, Any]], Sequence[tuple[str, bytes | None]]]],
    drop_instruction_columns: Sequence[str] = (),
    drop_image_columns: Sequence[str] = (),
) -> Path:
    """A local dir in the hub layout: for each split, its question rows and (image id, bytes) rows."""
    lines = ["---", "configs:"]
    for split, (questions, images) in splits.items():
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        columns = {name: [row[name] for row in questions] for name in questions[0] if name not in drop_instruction_columns}
        Dataset.from_dict(columns).to_parquet(str(data / f"{split}_instructions.parquet"))
        image_columns: dict[str, list[Any]] = {
            "id": [image_id for image_id, _ in images],
            "image": [{"bytes": data_bytes, "path": None} for _, data_bytes in images],
        }
        features = {"id": Value("string"), "image": Image()}
        for name in drop_image_columns:
            image_columns.pop(name)
            features.pop(name)
        Dataset.from_dict(image_columns, features=Features(features)).to_parquet(str(data / f"{split}_images.parquet"))
        for config, file in ((instructions_config(split), "instructions"), (images_config(split), "images")):
            lines += [f"- config_name: {config}", "  data_files:", f"  - split: {split}", f"    path: data/{split}_{file}.parquet"]
    (root / "README.md").write_text("\n".join([*lines, "---", "# test source", ""]), encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------
# Selection


def test_selection_is_pinned_and_platform_independent() -> None:
    """The draw is numpy's PCG64 permutation over sorted ids: pinned so a change cannot pass unnoticed."""
    ids = [f"q{index:03d}" for index in range(20)]
    assert select_question_ids(ids, 5, seed=42) == ["q007", "q009", "q012", "q014", "q015"]
    assert select_question_ids(ids, 5, seed=0) != select_question_ids(ids, 5, seed=42)


def test_selection_depends_only_on_ids_count_and_seed() -> None:
    ids = [str(200000 + index * 7) for index in range(500)]
    chosen = select_question_ids(ids, 40, seed=3)
    assert len(chosen) == 40 and len(set(chosen)) == 40 and set(chosen) <= set(ids)
    assert chosen == sorted(chosen)
    assert select_question_ids(list(reversed(ids)) + ids[:10], 40, seed=3) == chosen  # order, duplicates: no effect
    assert set(chosen) <= set(select_question_ids(ids, 41, seed=3))  # a larger N selects a superset


def test_selection_all_when_asking_for_more(caplog: pytest.LogCaptureFixture) -> None:
    ids = ["b", "a", "c"]
    assert select_question_ids(ids, None, seed=0) == ["a", "b", "c"]
    assert select_question_ids(ids, 3, seed=0) == ["a", "b", "c"]
    assert select_question_ids(ids, 10, seed=0) == ["a", "b", "c"]
    assert "more than the 3 questions available" in caplog.text
    with pytest.raises(ValueError, match="seed"):
        select_question_ids(ids, 2, seed=-1)
    with pytest.raises(ValueError, match="max_samples"):
        select_question_ids(ids, 0, seed=0)


# --------------------------------------------------------------------------------------------
# Reading and joining


def test_join_gives_each_selected_question_once_with_its_image(tmp_path: Path) -> None:
    images = [(f"img{index}", jpeg_bytes(color=(index * 40, 10, 10))) for index in range(5)]
    questions = [question_row(f"q{index:02d}", f"img{index % 4}") for index in range(12)]  # img4: no questions
    source = write_source(tmp_path / "src", {"testdev": (questions, images)})
    reader = SplitReader(str(source), "testdev")
    items = list(reader)
    assert [item.image_id for item in items] == ["img0", "img1", "img2", "img3"]  # the images' order
    for item in items:
        assert item.image_bytes == dict(images)[item.image_id]
        assert all(question.image_id == item.image_id for question in item.questions)
        assert [question.id for question in item.questions] == sorted(question.id for question in item.questions)
    assert sorted(question.id for item in items for question in item.questions) == [row["id"] for row in questions]
    assert reader.rejections.total() == 0
    assert reader.selection()["available"] == reader.selection()["selected"] == 12
    first = items[0].questions[0].to_json()
    assert first == {
        "id": "q00", "row": 0, "question": "Какого цвета круг?", "answer": "красного", "fullAnswer": "Круг красного.",
        "types": TYPES,
    }


def test_selection_then_grouping_by_image(tmp_path: Path) -> None:
    images = [(f"img{index}", jpeg_bytes()) for index in range(6)]
    questions = [question_row(f"q{index:02d}", f"img{index % 6}") for index in range(60)]
    source = write_source(tmp_path / "src", {"train": (questions, images)})
    reader = SplitReader(str(source), "train", max_samples=7, seed=11)
    selected = sorted(question.id for item in reader for question in item.questions)
    assert selected == select_question_ids([row["id"] for row in questions], 7, seed=11)
    assert reader.selection() | {"rule": None} == {
        "name": "seeded", "max_samples": 7, "seed": 11, "rule": None, "source_rows": 60, "available": 60, "selected": 7,
    }


def test_text_checks_and_join_rejections_are_counted(tmp_path: Path) -> None:
    undecodable_but_unused = b"not an image at all"
    images = [
        ("img0", jpeg_bytes()),
        ("img1", jpeg_bytes()),
        ("img0", jpeg_bytes(color=(0, 0, 255))),
        ("unused", undecodable_but_unused),
    ]
    questions = [
        question_row("q1", "img0"),
        question_row("q1", "img1"),  # duplicate id: the first row wins
        question_row("q2", "img1", question="   "),
        question_row("q3", "img1", answer=" "),
        question_row("", "img1"),
        question_row("q4", "ghost"),  # no such image
        question_row("q5", "img1"),
    ]
    source = write_source(tmp_path / "src", {"testdev": (questions, images)})
    reader = SplitReader(str(source), "testdev")
    items = list(reader)
    assert {item.image_id: [q.id for q in item.questions] for item in items} == {"img0": ["q1"], "img1": ["q5"]}
    assert items[0].image_bytes == images[0][1]  # the first of the duplicate rows is kept
    rejected = reader.rejections.to_json()
    assert set(rejected) == set(REJECTION_REASONS)
    counts = {name: entry["count"] for name, entry in rejected.items() if entry["count"]}
    assert counts == {
        "duplicate_question_id": 1,
        "empty_question": 1,
        "empty_answer": 1,
        "missing_question_id": 1,
        "missing_image": 1,
        "duplicate_image": 1,
    }
    assert rejected["missing_image"]["examples"] == ["q4"]
    assert rejected["empty_question"]["examples"] == ["q2"] and rejected["empty_answer"]["examples"] == ["q3"]
    assert rejected["duplicate_image"]["examples"] == ["img0"]
    assert reader.selection()["available"] == 3  # q1, q4, q5 pass the text checks; q4 is lost at the join
    with pytest.raises(RuntimeError, match="once"):
        list(reader)


def test_join_in_batches_gives_every_field_of_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Questions are converted a batch of images at a time: images spread over many small batches,
    with duplicates across batches, images without questions, null types and null text fields,
    still give each image exactly its questions, with the values of their own rows."""
    monkeypatch.setattr(sources_module, "IMAGE_BATCH_ROWS", 3)
    images = [(f"img{index}", jpeg_bytes(color=(index * 20, 0, 0))) for index in range(11)]
    images.insert(7, ("img2", b"a later duplicate"))
    questions = []
    for index in range(40):
        row = question_row(f"q{(index * 17) % 40:02d}", f"img{(index * 7) % 9}", question=f"Вопрос {index}?")
        if index % 5 == 0:
            row["types"] = None
        elif index % 3 == 0:
            row["types"] = {**TYPES, "detailed": None}
        if index % 4 == 0:
            row["fullAnswer"] = None
        questions.append(row)
    source = write_source(tmp_path / "src", {"train": (questions, images)})
    reader = SplitReader(str(source), "train")
    items = list(reader)
    expected: dict[str, list[Question]] = {}
    for row_index, row in enumerate(questions):
        types = {key: value or "" for key, value in row["types"].items()} if row["types"] is not None else {}
        expected.setdefault(row["imageId"], []).append(
            Question(id=row["id"], image_id=row["imageId"], question=row["question"], answer=row["answer"],
                     full_answer=row["fullAnswer"] or "", types=types, row=row_index)
        )
    assert [item.image_id for item in items] == [f"img{index}" for index in range(9)]  # images' order; 9, 10 unasked
    for item in items:
        assert item.questions == sorted(expected[item.image_id], key=lambda question: question.id)
        assert item.image_bytes == next(data for image_id, data in images if image_id == item.image_id)  # the first row
    assert reader.rejections.count("duplicate_image") == 1 and reader.rejections.total() == 1
    assert {"types": {}, "fullAnswer": ""}.items() <= items[0].questions[0].to_json().items()  # q00: row 0


def test_seed_report_rows_are_the_seed_codes_rows() -> None:
    """Its public code: select(range(2000)) of train; random.Random(42).shuffle over testdev's 12,216
    row indices, first 300. Pinned, so a change of rule cannot pass unnoticed."""
    assert seed_report_rows("train", 40_000) == list(range(2000))
    assert seed_report_rows("train", 600) == list(range(600))
    rows = seed_report_rows("testdev", 12_216)
    assert len(rows) == 300 == len(set(rows)) and rows == sorted(rows)
    assert rows[:8] == [55, 63, 64, 71, 82, 102, 144, 232] and rows[-3:] == [12095, 12103, 12175]
    assert sum(rows) == 1_839_758


def test_seed_report_selection_counts_rows_not_ids(tmp_path: Path) -> None:
    """Rows in dataset order, not sorted ids; a rejected row is counted, never replaced by another."""
    images = [("img0", jpeg_bytes()), ("img1", jpeg_bytes())]
    questions = [question_row(f"z{999 - index:03d}", f"img{index % 2}") for index in range(408)]  # ids run backwards
    questions[4] = question_row("z995", "img0", question=" ")  # empty
    questions[200] = question_row("z999", "img0")  # a duplicate of row 0's id
    source = write_source(tmp_path / "src", {"testdev": (questions, images)})
    wanted = seed_report_rows("testdev", len(questions))
    assert {0, 4, 200} <= set(wanted) and 3 not in wanted
    reader = SplitReader(str(source), "testdev", selection="seed-report")
    by_row = {question.row: question.id for item in reader for question in item.questions}
    expected = {row: questions[row]["id"] for row in wanted if row not in (4, 200)}
    assert by_row == expected
    assert reader.rejections.count("empty_question") == 1 and reader.rejections.count("duplicate_question_id") == 1
    selection = reader.selection()
    assert selection["name"] == "seed-report" and selection["rows"] == 300 and selection["source_rows"] == 408
    assert selection["selected"] == len(expected)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    images = [("img0", jpeg_bytes())]
    questions = [question_row("q1", "img0")]
    source = write_source(tmp_path / "a", {"testdev": (questions, images)}, drop_instruction_columns=("answer", "types"))
    with pytest.raises(SourceError, match=r"testdev_balanced_instructions.*missing required column\(s\) answer, types"):
        SplitReader(str(source), "testdev")
    source = write_source(tmp_path / "b", {"testdev": (questions, images)}, drop_image_columns=("image",))
    with pytest.raises(SourceError, match=r"testdev_balanced_images.*missing required column\(s\) image"):
        SplitReader(str(source), "testdev")


def test_unknown_split_and_config(tmp_path: Path) -> None:
    source = write_source(tmp_path / "src", {"testdev": ([question_row("q1", "img0")], [("img0", jpeg_bytes())])})
    with pytest.raises(SourceError, match="unknown split 'val'"):
        SplitReader(str(source), "val")
    with pytest.raises(SourceError, match="train_balanced_instructions"):
        SplitReader(str(source), "train")


@pytest.mark.parametrize("column", ["struct", "binary"])
def test_images_written_by_plain_pyarrow(tmp_path: Path, column: str) -> None:
    """Parquet without datasets' metadata: the image column is a {bytes, path} struct or raw bytes."""
    questions = [question_row("q1", "a"), question_row("q2", "b")]
    source = write_source(tmp_path / "src", {"testdev": (questions, [("a", b""), ("b", b"")])})
    data = jpeg_bytes()
    if column == "struct":
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        values = pa.array([{"bytes": data, "path": None}] * 2, type=image_type)
    else:
        values = pa.array([data, data], type=pa.binary())
    pq.write_table(pa.table({"id": ["a", "b"], "image": values}), source / "data" / "testdev_images.parquet")
    items = list(SplitReader(str(source), "testdev"))
    assert [(item.image_id, item.image_bytes) for item in items] == [("a", data), ("b", data)]


def test_synthetic_source_joins_completely(synth_dir: Path) -> None:
    for split, expected in (("train", 600), ("testdev", 310)):
        reader = SplitReader(str(synth_dir), split)
        items = list(reader)
        question_ids = [question.id for item in items for question in item.questions]
        assert len(question_ids) == len(set(question_ids)) == expected
        assert all(question.image_id == item.image_id for item in items for question in item.questions)
        assert reader.rejections.total() == 0
