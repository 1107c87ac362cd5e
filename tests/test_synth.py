"""The synthetic GQA-ru: hub layout and schema, exact counts, answers that need the image.

Every read goes through `datasets.load_dataset(DIR, CONFIG, split=...)`, the call that reads
`deepvk/GQA-ru`, so these tests also prove the offline default is a drop-in source.
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import datasets
import pytest
from datasets import Image, List, Value
from PIL import Image as PILImage

from gqaru.cli import main as cli_main
from gqaru.standins import synth

datasets.disable_progress_bars()

SPLITS = ("train", "testdev")
STRUCTURAL = {"verify", "query", "choose", "logical", "compare"}
SEMANTIC = {"obj", "attr", "cat", "rel", "global"}
YES_NO = {"да", "нет"}


def _load(directory: Path, config: str, split: str) -> datasets.Dataset:
    return datasets.load_dataset(str(directory), config, split=split)


@pytest.fixture(scope="module")
def loaded(synth_dir: Path) -> dict[str, dict[str, datasets.Dataset]]:
    """Both configs of both splits of the session's synthetic set (600 train / 310 testdev questions)."""
    return {
        split: {
            "instructions": _load(synth_dir, f"{split}_balanced_instructions", split),
            "images": _load(synth_dir, f"{split}_balanced_images", split),
        }
        for split in SPLITS
    }


def _rows(loaded: dict[str, dict[str, datasets.Dataset]], split: str) -> list[dict[str, Any]]:
    return list(loaded[split]["instructions"])


def test_instructions_have_the_gqa_ru_schema(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    pointer = List({"objectId": Value("string"), "value": Value("string")})
    expected = {
        "id": Value("string"),
        "imageId": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "fullAnswer": Value("string"),
        "isBalanced": Value("bool"),
        "groups": {"global": Value("string"), "local": Value("string")},
        "entailed": Value("string"),
        "equivalent": Value("string"),
        "types": {"structural": Value("string"), "semantic": Value("string"), "detailed": Value("string")},
        "annotations": {"question": pointer, "answer": pointer, "fullAnswer": pointer},
        "semantic": List(
            {"operation": Value("string"), "argument": Value("string"), "dependencies": List(Value("int32"))}
        ),
        "semanticStr": Value("string"),
    }
    for split in SPLITS:
        instructions = loaded[split]["instructions"]
        assert list(instructions.features) == list(expected)
        assert dict(instructions.features) == expected
        row = instructions[0]
        assert row["isBalanced"] is True
        assert row["question"] and row["answer"] and row["fullAnswer"]
        assert row["semanticStr"].startswith(row["semantic"][0]["operation"])
        # entailed/equivalent are stringified lists of question ids (parsed as data, never eval'd)
        for stringified in (row["entailed"], row["equivalent"]):
            assert re.fullmatch(r"\[('[0-9]+'(, '[0-9]+')*)?\]", stringified), stringified
        assert row["id"] in row["equivalent"]


def test_images_decode_to_pil_jpeg_at_gqa_sizes(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    for split in SPLITS:
        images = loaded[split]["images"]
        assert dict(images.features) == {"id": Value("string"), "image": Image()}
        for row in images.select(range(min(5, len(images)))):
            picture = row["image"]
            assert isinstance(picture, PILImage.Image)
            assert picture.format == "JPEG" and picture.mode == "RGB"
            assert picture.size in synth.IMAGE_SIZES


def test_exact_counts_and_every_question_has_its_image(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    assert len(loaded["train"]["instructions"]) == 600
    assert len(loaded["testdev"]["instructions"]) == 310
    image_ids: dict[str, list[str]] = {}
    for split in SPLITS:
        image_ids[split] = list(loaded[split]["images"]["id"])
        assert len(set(image_ids[split])) == len(image_ids[split]), f"duplicate image ids in {split}"
        assert set(list(loaded[split]["instructions"]["imageId"])) == set(image_ids[split])
    assert not set(image_ids["train"]) & set(image_ids["testdev"])
    assert all(re.fullmatch(r"[0-9]+", image_id) for image_id in image_ids["train"])
    assert all(re.fullmatch(r"n[0-9]+", image_id) for image_id in image_ids["testdev"])
    question_ids = list(loaded["train"]["instructions"]["id"]) + list(loaded["testdev"]["instructions"]["id"])
    assert len(set(question_ids)) == len(question_ids)
    # several questions per image, as in GQA (≈13 per train image, ≈31 per testdev image)
    assert 9 <= 600 / len(image_ids["train"]) <= 17
    assert 24 <= 310 / len(image_ids["testdev"]) <= 36


@pytest.mark.parametrize(("train", "testdev"), [(1, 1), (14, 37), (101, 62)])
def test_question_counts_are_exact(tmp_path: Path, train: int, testdev: int) -> None:
    summary = synth.write_synthetic_gqa(tmp_path / "out", train_questions=train, testdev_questions=testdev, seed=3)
    assert summary["train"]["questions"] == train and summary["testdev"]["questions"] == testdev
    for split, count in (("train", train), ("testdev", testdev)):
        assert len(_load(tmp_path / "out", f"{split}_balanced_instructions", split)) == count
        assert len(_load(tmp_path / "out", f"{split}_balanced_images", split)) == summary[split]["images"]


def test_hub_layout_with_several_image_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "IMAGES_PER_PARQUET_FILE", 4)
    out = tmp_path / "gqa-ru"
    summary = synth.write_synthetic_gqa(out, train_questions=120, testdev_questions=40, seed=0)
    train_image_files = sorted(p.name for p in (out / "train_balanced_images").iterdir())
    expected_files = -(-summary["train"]["images"] // 4)
    assert expected_files >= 2
    assert train_image_files == [f"train-{i:05d}-of-{expected_files:05d}.parquet" for i in range(expected_files)]
    assert sorted(p.name for p in (out / "testdev_balanced_instructions").iterdir()) == [
        "testdev-00000-of-00001.parquet"
    ]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n")
    for split in SPLITS:
        for kind in ("images", "instructions"):
            assert f"path: {split}_balanced_{kind}/{split}-*" in readme
    images = _load(out, "train_balanced_images", "train")
    assert len(images) == summary["train"]["images"]  # every file was read
    assert set(list(images["id"])) == set(list(_load(out, "train_balanced_instructions", "train")["imageId"]))


def test_all_question_types_present(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    for split in SPLITS:
        types = list(loaded[split]["instructions"]["types"])
        assert {t["structural"] for t in types} == STRUCTURAL
        assert {t["semantic"] for t in types} == SEMANTIC
        structural = Counter(t["structural"] for t in types)
        assert min(structural.values()) >= 0.03 * len(types), structural


def test_yes_no_balanced_per_question_type(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    for split in SPLITS:
        answers: dict[str, Counter[str]] = defaultdict(Counter)
        for row in _rows(loaded, split):
            if row["answer"] in YES_NO:
                answers[row["types"]["detailed"]][row["answer"]] += 1
        assert answers, "no yes/no questions"
        for detailed, counts in answers.items():
            # the generator balances each template to ±1; a detailed type spans ≤ 3 templates
            assert abs(counts["да"] - counts["нет"]) <= 3, (split, detailed, counts)
        yes = sum(c["да"] for c in answers.values())
        total = sum(sum(c.values()) for c in answers.values())
        assert 0.3 <= total / len(loaded[split]["instructions"]) <= 0.6
        assert abs(yes / total - 0.5) <= 0.02


def test_answers_are_not_guessable_from_the_question(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    train, testdev = _rows(loaded, "train"), _rows(loaded, "testdev")
    # A blind model: the majority train answer of the same question text (else of its detailed type).
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    for row in train:
        by_text[row["question"]][row["answer"]] += 1
        by_type[row["types"]["detailed"]][row["answer"]] += 1
    blind_hits = sum(
        (by_text.get(row["question"]) or by_type[row["types"]["detailed"]]).most_common(1)[0][0] == row["answer"]
        for row in testdev
    )
    assert blind_hits / len(testdev) < 0.5  # measured ≈0.35–0.43; with the image it is answerable
    # Open answers are spread: no template's most common answer dominates.
    open_answers: dict[str, Counter[str]] = defaultdict(Counter)
    for row in train + testdev:
        if row["answer"] not in YES_NO:
            open_answers[row["types"]["detailed"]][row["answer"]] += 1
    for detailed, counts in open_answers.items():
        if sum(counts.values()) >= 20:
            assert counts.most_common(1)[0][1] / sum(counts.values()) <= 0.75, (detailed, counts)
    colors = Counter(row["answer"] for row in train + testdev if row["question"].startswith("Какого цвета"))
    assert len(colors) >= 6 and colors.most_common(1)[0][1] / sum(colors.values()) <= 0.3


def test_choose_answer_is_one_option_first_or_second_at_random(
    loaded: dict[str, dict[str, datasets.Dataset]],
) -> None:
    positions = Counter()
    for row in _rows(loaded, "train") + _rows(loaded, "testdev"):
        if row["types"]["structural"] not in ("choose", "compare") or row["answer"] in YES_NO:
            continue
        words = [word.strip(",?") for word in row["question"].split()]
        index = words.index("или")
        options = (words[index - 1], words[index + 1])
        assert row["answer"] in options, row
        positions[options.index(row["answer"])] += 1
    assert sum(positions.values()) >= 100
    assert 0.4 <= positions[0] / sum(positions.values()) <= 0.6, positions


def test_short_answers_agree_with_the_noun(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    endings = {"m": ("ый", "ий", "ой"), "f": ("ая", "яя"), "n": ("ое", "ее")}
    gender = {shape.nom: shape.gender for shape in synth.SHAPES} | {"фон": "m"}
    checked = Counter()
    for row in _rows(loaded, "train") + _rows(loaded, "testdev"):
        question, answer = row["question"], row["answer"]
        match = re.fullmatch(r"Какого (цвета|размера) (\w+)\?", question)
        if match:
            assert answer.endswith(endings[gender[match.group(2)]]), row
            checked[gender[match.group(2)]] += 1
        match = re.fullmatch(r"Каким цветом (нарисован|нарисована|нарисовано) (\w+)\?", question)
        if match:
            participle = {"m": "нарисован", "f": "нарисована", "n": "нарисовано"}[gender[match.group(2)]]
            assert match.group(1) == participle and answer.endswith(("ым", "им")), row
        if question == "Какого размера звезда?":
            assert answer in ("большая", "маленькая")
    assert set(checked) == {"m", "f", "n"}


def test_answers_match_the_pixels(loaded: dict[str, dict[str, datasets.Dataset]]) -> None:
    """The background question is answered by the image's dominant colour."""
    background_rgb = {adjective.nom["m"]: rgb for adjective, rgb in synth.BACKGROUNDS}
    images = {row["id"]: row["image"] for row in loaded["testdev"]["images"]}
    checked = 0
    for row in _rows(loaded, "testdev"):
        if row["question"] == "Какого цвета фон?":
            picture = images[row["imageId"]].convert("RGB").resize((64, 48))
            dominant = Counter(picture.getdata()).most_common(1)[0][0]
            assert all(abs(a - b) <= 12 for a, b in zip(dominant, background_rgb[row["answer"]])), row
            checked += 1
    assert checked >= 3


def test_scene_truth_matches_drawing_and_answers() -> None:
    """Each object is drawn in its colour at its centre; side answers follow the object's position."""
    for image in synth.generate_split("testdev", 200, seed=5):
        picture = PILImage.open(io.BytesIO(synth.draw_scene(image.scene)))
        objects = {obj.object_id: obj for obj in image.scene.objects}
        for obj in objects.values():
            pixel = picture.getpixel((round(obj.center[0]), round(obj.center[1])))
            assert all(abs(a - b) <= 40 for a, b in zip(pixel, obj.rgb)), (obj, pixel)
        for row in image.rows:
            if row["types"]["detailed"] == "positionQuery":
                obj = objects[row["annotations"]["question"][0]["objectId"]]
                left = obj.center[0] < image.scene.width / 2
                assert row["answer"] == ("слева" if left else "справа")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    def files(directory: Path) -> dict[str, bytes]:
        return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    synth.write_synthetic_gqa(tmp_path / "a", train_questions=80, testdev_questions=62, seed=7)
    synth.write_synthetic_gqa(tmp_path / "b", train_questions=80, testdev_questions=62, seed=7)
    synth.write_synthetic_gqa(tmp_path / "c", train_questions=80, testdev_questions=62, seed=8)
    first, second, other = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert "README.md" in first and len(first) == 5
    assert first == second
    questions_a = list(_load(tmp_path / "a", "train_balanced_instructions", "train")["question"])
    questions_c = list(_load(tmp_path / "c", "train_balanced_instructions", "train")["question"])
    assert questions_a != questions_c
    assert first["train_balanced_images/train-00000-of-00001.parquet"] != other[
        "train_balanced_images/train-00000-of-00001.parquet"
    ]


def test_rerun_replaces_own_output_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    out = tmp_path / "gqa-ru"
    synth.write_synthetic_gqa(out, train_questions=30, testdev_questions=30, seed=0)
    synth.write_synthetic_gqa(out, train_questions=20, testdev_questions=25, seed=1)
    assert len(_load(out, "train_balanced_instructions", "train")) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gqa-ru.tmp")]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by `gqaru synth`"):
        synth.write_synthetic_gqa(foreign, train_questions=5, testdev_questions=5)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="train_questions must be positive"):
        synth.write_synthetic_gqa(tmp_path / "x", train_questions=0, testdev_questions=5)


def test_training_corpus_covers_every_word_the_generator_writes(synth_dir: Path) -> None:
    corpus = synth.training_corpus(seed=0, questions=3000)
    assert synth.INSTRUCTION in corpus
    corpus_words = {word.lower() for line in corpus for word in re.findall(r"\w+", line)}
    dataset_words = set()
    for seed in (11, 12):  # other seeds: forms the corpus' own sample may not contain
        for image in synth.generate_split("testdev", 400, seed=seed):
            for row in image.rows:
                for text in (row["question"], row["answer"], row["fullAnswer"]):
                    dataset_words.update(word.lower() for word in re.findall(r"\w+", text))
    assert dataset_words <= corpus_words, dataset_words - corpus_words
    assert synth.training_corpus(seed=0, questions=3000) == corpus


def test_cli_help_and_cli_writes_a_loadable_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["synth", "--help"])
    assert exit_info.value.code == 0
    assert "--train-questions" in capsys.readouterr().out
    out = tmp_path / "cli-out"
    arguments = ["synth", "--out", str(out), "--train-questions", "50", "--testdev-questions", "40", "--seed", "2"]
    code = cli_main(arguments)
    assert code == 0
    assert "train: 50 questions" in capsys.readouterr().out
    assert len(_load(out, "train_balanced_instructions", "train")) == 50
    assert len(_load(out, "testdev_balanced_instructions", "testdev")) == 40


def test_generate_split_can_restrict_templates() -> None:
    images = synth.generate_split("train", 300, seed=0, templates=["verify_exist_color", "query_background"])
    details = {row["types"]["detailed"] for image in images for row in image.rows}
    assert sum(len(image.rows) for image in images) == 300
    assert details == {"existAttr", "backgroundColor"}
    with pytest.raises(ValueError, match="unknown synthetic question templates \\['verify_colour'\\]"):
        synth.generate_split("train", 10, templates=["verify_colour"])


def test_cli_templates_writes_only_that_set_and_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "one-hop"
    assert cli_main(["synth", "--out", str(out), "--train-questions", "300", "--testdev-questions", "100",
                     "--templates", "one-hop"]) == 0  # fmt: skip
    # One object named by its colour (exists? size, side, shape) or the whole image (background).
    one_hop = {"existAttr", "directOf", "positionQuery", "positionVerify", "positionChoose", "categoryThat",
               "backgroundColor", "backgroundVerify", "chooseGlobal"}  # fmt: skip
    for split, count in (("train", 300), ("testdev", 100)):
        rows = _load(out, f"{split}_balanced_instructions", split)
        assert len(rows) == count
        assert {row["types"]["detailed"] for row in rows} <= one_hop
        # directOf and the position types also come from shape-named templates: not in this set.
        assert all("фигур" in row["question"] or "фон" in row["question"].lower() for row in rows)
    assert "Question templates: the 'one-hop' set" in (out / "README.md").read_text(encoding="utf-8")
    assert synth.resolve_templates("query_background, verify_background") == ("query_background", "verify_background")
    capsys.readouterr()
    assert cli_main(["synth", "--out", str(tmp_path / "bad"), "--templates", "one_hop"]) == 2
    error = capsys.readouterr().err
    assert "unknown question templates ['one_hop']" in error and "one-hop" in error and "query_color" in error
    assert not (tmp_path / "bad").exists()


def test_questions_per_image_follows_gqa_ru_trains_shape_seeded(tmp_path: Path) -> None:
    shape = synth.resolve_questions_per_image("gqa-ru-train")
    images = synth.generate_split("train", 3000, seed=0, questions_per_image=shape)
    counts = Counter(len(image.rows) for image in images)
    assert sum(len(image.rows) for image in images) == 3000
    assert 1.38 <= 3000 / len(images) <= 1.52  # GQA-ru train: ~40,000 questions over 27,519 images
    assert (counts[1] + counts[2]) / len(images) >= 0.85
    assert counts[1] > counts[2] > counts[3] > 0 and max(counts) <= 5
    again = synth.generate_split("train", 3000, seed=0, questions_per_image=shape)
    assert [image.rows for image in again] == [image.rows for image in images]
    # Explicit weights: every image but the remainder holds exactly the one count given weight.
    pairs = synth.generate_split("train", 101, seed=0, questions_per_image=synth.resolve_questions_per_image("2:1,5:0"))
    assert [len(image.rows) for image in pairs] == [2] * 50 + [1]
    assert synth.resolve_questions_per_image("default") is None

    summary = synth.write_synthetic_gqa(
        tmp_path / "real-shape", train_questions=300, testdev_questions=62, seed=0, train_questions_per_image=shape
    )
    rows = _load(tmp_path / "real-shape", "train_balanced_instructions", "train")
    per_image = Counter(rows["imageId"])
    assert len(rows) == 300 and len(per_image) == summary["train"]["images"]
    assert len(_load(tmp_path / "real-shape", "train_balanced_images", "train")) == len(per_image)
    assert 1.3 <= 300 / len(per_image) <= 1.6
    assert summary["testdev"]["questions"] == 62 and summary["testdev"]["images"] <= 3  # testdev keeps ≈31 per image
    assert "'gqa-ru-train'" in (tmp_path / "real-shape" / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gqa-ru", "'gqa-ru' is not a new COUNT:WEIGHT pair; give a shape \\(default, gqa-ru-train\\)"),
        ("1:2,1:3", "'1:3' is not a new COUNT:WEIGHT pair"),
        ("0:1", "\\['0:1.0'\\] are not a positive integer count"),
        ("1:-1", "are not a positive integer count with a finite weight >= 0"),
        ("1:0,2:0", "add up to 0"),
    ],
)
def test_questions_per_image_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.resolve_questions_per_image(text)


def test_cli_questions_per_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shaped"
    assert cli_main(["synth", "--out", str(out), "--train-questions", "40", "--testdev-questions", "31",
                     "--questions-per-image", "1:1"]) == 0  # fmt: skip
    assert "train: 40 questions over 40 images" in capsys.readouterr().out
    assert "weights 1:1" in (out / "README.md").read_text(encoding="utf-8")
    assert cli_main(["synth", "--out", str(tmp_path / "bad"), "--questions-per-image", "one"]) == 2
    assert "'one' is not a new COUNT:WEIGHT pair" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
