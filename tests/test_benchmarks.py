"""The benchmarks stay runnable and compare like with like (no timings are asserted here).

- the seed-style baseline trains on exactly the tokens gqaru trains on (gqaru's sequence ends in one
  more token, the `<eos>` generation stops at), so P1 compares loops, not data;
- gpu.py's FLOPs formula counts the weights the model really has, and it refuses to run off CUDA
  with a message instead of a traceback;
- the runner's table says NOT MET plainly;
- the learning probe shows per-object grounding through the vision path (a colour word next to the
  answer, judged against its own image and against others');
- `benchmarks/run.py --quick` runs every benchmark's code path at toy size and writes results in
  the shared format (slow: ~1-2 min, a dozen fresh processes).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from gqaru.files import replace_marked_block

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_train  # noqa: E402
import gpu  # noqa: E402
import run as runner  # noqa: E402

RESULT_KEYS = {"id", "measure", "ratio", "goal", "met", "details"}


def test_seed_style_collator_trains_the_same_tokens_as_gqaru(tiny_model_dir: Path) -> None:
    from PIL import Image

    from gqaru.collate import SequencePlanner, TrainingCollator, TrainingSequence
    from gqaru.modeling import image_tokens_per_image, load_processor

    processor = load_processor(tiny_model_dir)
    image = Image.new("RGB", (80, 60), "red")
    question = {"id": "q1", "question": "Какого цвета круг?", "answer": "красного"}
    planner = SequencePlanner(processor.tokenizer, questions_per_sequence=1, max_seq_len=512)
    ours = TrainingCollator(processor)([TrainingSequence("img", image, (question,), planner.tokenize([question]))])
    seed_style = bench_train.SeedStyleCollator(processor, image_tokens_per_image(processor))(
        [{"image": image, "question": question["question"], "answer": question["answer"]}]
    )

    eos = processor.tokenizer.eos_token_id
    assert ours["input_ids"][0].tolist() == seed_style["input_ids"][0].tolist() + [eos]
    assert torch.allclose(seed_style["pixel_values"], ours["pixel_values"])
    ours_labelled = (ours["labels"][0] != -100).nonzero().flatten().tolist()
    seed_labelled = (seed_style["labels"][0] != -100).nonzero().flatten().tolist()
    last = seed_style["input_ids"].shape[1] - 1
    assert processor.tokenizer.decode(seed_style["input_ids"][0, last]) == "\n"
    # Both: the answer, <end_of_turn> and the template's newline; gqaru also the <eos> after them.
    assert ours_labelled == seed_labelled + [last + 1]
    assert torch.equal(seed_style["labels"][0, seed_labelled], seed_style["input_ids"][0, seed_labelled])


def test_flops_formula_counts_the_weights_the_model_has(tiny_model_dir: Path) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    dims = gpu.model_dimensions(str(tiny_model_dir))
    counts = gpu.parameter_counts(dims, lora_r=16)

    def linear_weights(prefix: str) -> int:
        return sum(
            module.weight.numel()
            for name, module in model.named_modules()
            if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
        )

    patch_embedding = model.model.vision_tower.embeddings.patch_embedding.weight.numel()
    assert counts["text"] == linear_weights("model.language_model.layers")
    assert counts["vision"] == linear_weights("model.vision_tower") + patch_embedding
    assert counts["projector"] == linear_weights("model.multi_modal_projector")
    assert counts["embedding"] == model.get_input_embeddings().weight.numel()

    # The full-size shapes: Gemma-2b's decoder layers hold ~1.98 B weights, CLIP ViT-L ~0.30 B.
    big_dims = gpu.preset_dimensions()
    assert (big_dims["vocab"], big_dims["vision_tokens"], big_dims["image_features"]) == (256000, 577, 576)
    assert set(big_dims) == set(dims)
    with pytest.raises(ValueError, match="use model_dimensions"):
        gpu.preset_dimensions("tiny")  # its vocabulary is its tokenizer's
    big_counts = gpu.parameter_counts(big_dims, lora_r=16)
    assert round(big_counts["text"] / 1e9, 2) == 1.98
    assert round(big_counts["vision"] / 1e9, 2) == 0.30
    assert big_counts["lora"] == 18 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 256))
    # Frozen base: about 4 FLOPs per weight per token, plus attention and the head at the labels.
    flops = gpu.sequence_flops(big_dims, big_counts, tokens=800, label_tokens=16)
    assert 4 * 800 * big_counts["text"] < flops < 6 * 800 * (big_counts["text"] + big_counts["vision"])


def test_flop_predicted_speedup_follows_questions_per_image() -> None:
    """One question per image: gqaru saves only the LM head at non-label positions (Gemma's 256k
    vocabulary makes that ~20% of the baseline's FLOPs); 13 per image: the image is paid once."""
    dims = gpu.preset_dimensions()
    counts = gpu.parameter_counts(dims, lora_r=16)
    question_tokens, label_tokens = 30, 3  # text tokens of one question alone; its answer and <end_of_turn>

    def predicted(per_image: int) -> float:
        overhead = 10  # what a first turn carries and a later one does not, roughly
        sequence = (576 + overhead + per_image * (question_tokens - overhead), per_image * label_tokens)
        return gpu.predicted_training_speedup(dims, counts, [576 + question_tokens] * per_image, [sequence])

    assert 1.1 < predicted(1) < 1.4
    assert predicted(1) < predicted(2) < predicted(13)
    assert 8 < predicted(13) < 14
    # Same lengths and the head at every position on both sides: nothing to gain.
    same = gpu.predicted_training_speedup(dims, counts, [606, 640], [(606, 606), (640, 640)])
    assert same == pytest.approx(1.0)


def test_readme_tables_are_generated_from_the_committed_results() -> None:
    """The results blocks of README.md and benchmarks/README.md are `run.py --readme-only`'s output
    for benchmarks/results.json: numbers in them cannot be typed by hand."""
    results, summary = runner.load_results(runner.DEFAULT_RESULTS)
    block = runner.markdown(results, summary)
    assert [entry["id"] for entry in results][:2] == ["P1", "P1-synth"]  # the real shape leads
    for readme in runner.READMES:
        text = readme.read_text(encoding="utf-8")
        assert replace_marked_block(text, runner.RESULTS_MARKER, block, str(readme)) == text, (
            f"{readme}: its results block differs from results.json; run python benchmarks/run.py --readme-only"
        )
    assert runner.DEFAULT_RESULTS.with_suffix(".md").read_text(encoding="utf-8") == block
    with pytest.raises(ValueError, match="X.md: expected one <!-- results.md --> ... <!-- /results.md --> block"):
        replace_marked_block("no markers here", runner.RESULTS_MARKER, block, "X.md")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_gpu_benchmark_refuses_without_cuda_and_says_why(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py"), "--out", str(tmp_path / "gpu.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2
    assert "needs a CUDA GPU" in completed.stderr and "--smoke" in completed.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_table_says_not_met_plainly() -> None:
    entries = [
        {"id": "P9", "measure": "m", "ratio": 2.0, "goal": ">= 5x", "met": False,
         "details": {"speed_goal_met": False, "accuracy_goal_met": True}},
        {"id": "P8", "measure": "n", "ratio": 7.0, "goal": ">= 5x", "met": True, "details": {}},
    ]
    text = runner.table(entries)
    assert "NOT MET" in text.splitlines()[1] and "met" in text.splitlines()[2]
    assert runner._why(entries[0]) == "speed goal missed"


@pytest.mark.slow
def test_quick_run_writes_every_entry_in_the_shared_format(tmp_path: Path) -> None:
    results_path = tmp_path / "results" / "results.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--workdir", str(tmp_path / "work"),
         "--results", str(results_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results, summary = runner.load_results(results_path)
    ids = [entry["id"] for entry in results]
    assert ids[:3] == ["P1", "P1-synth", "P2"] and {"P4", "P5"} <= set(ids)
    assert [entry_id for entry_id in ids if entry_id in runner.ORDER] == sorted(
        (entry_id for entry_id in ids if entry_id in runner.ORDER), key=runner.ORDER.index
    )
    assert summary["quick"] is True and summary["total_seconds"] > 0
    for entry in results:
        assert set(entry) == RESULT_KEYS
        assert isinstance(entry["ratio"], (int, float)) and entry["ratio"] > 0
        assert entry["met"] in (True, False, None)
    by_id = {entry["id"]: entry for entry in results}
    for entry_id in ("P1", "P1-synth"):
        p1 = by_id[entry_id]["details"]
        assert p1["seed_style"]["questions"] == p1["gqaru"]["questions"] == 40  # both sides, the same questions
        assert p1["flop_predicted_ratio"]["llava-gemma-2b"] > 1
        assert set(p1["padding_pct"]["planned_stream"]) == {"batch 1", "batch 4", "batch 8"}
    # GQA-ru train's shape: ~1.45 questions per image; the synthetic default ~13.
    assert by_id["P1"]["details"]["data_shape"]["questions_per_image"] < 2.2
    assert by_id["P1-synth"]["details"]["data_shape"]["questions_per_image"] > 8
    assert by_id["P2"]["details"]["noisy"]["questions"] == 12
    markdown = results_path.with_suffix(".md").read_text(encoding="utf-8")
    assert markdown.startswith("| id | measure | ratio | goal | result |")
    assert "P1" in completed.stdout and "total" in completed.stdout


def test_learning_probe_grounds_a_colour_word_in_its_own_image(tiny_model_dir: Path) -> None:
    """The vision path carries per-object content to a text position that asks for it.

    One hop (`learning_probe --stages word:400`): image, then a colour word, answered «да»/«нет» by
    whether a figure of that colour is in the picture. 400 full fine-tuning steps reach ~0.89 on
    held-out images (chance 0.50). Paired with other questions' images the same model falls back
    to chance, so the score comes from each question's own image, not from the word alone.
    """
    import learning_probe as probe
    from gqaru.collate import TrainingCollator
    from gqaru.modeling import load_processor

    torch.manual_seed(0)
    collator = TrainingCollator(load_processor(tiny_model_dir))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    templates = ["verify_exist_color"]
    train = probe.word_items(probe.synthetic_images("train", 8000, templates, seed=0), collator)
    test = probe.word_items(probe.synthetic_images("testdev", 600, templates, seed=0), collator)
    assert {kind for item in test for _, kind in item.types} == {"yes/no"}

    probe.train(model, train, steps=400, lr=1e-3, batch_size=16, collator=collator, seed=0, log_every=400)
    own_images = probe.exact_match(model, test, collator)["_all"]["accuracy"]
    swapped = [
        dataclasses.replace(
            item, encoded=dataclasses.replace(item.encoded, pixel_values=test[(index + 7) % len(test)].encoded.pixel_values)
        )
        for index, item in enumerate(test)
    ]
    other_images = probe.exact_match(model, swapped, collator)["_all"]["accuracy"]
    assert own_images >= 0.75, own_images
    assert other_images <= 0.6, other_images


def test_learning_probe_copy_format_answers_with_the_questions_content_words(tiny_model_dir: Path) -> None:
    """The reading stage (`copy`) keeps image and question and labels only the question's content
    words, in order; a question with none (the background's colour) is left out, not emptied."""
    import learning_probe as probe
    from gqaru.collate import IGNORE_INDEX, TrainingCollator
    from gqaru.modeling import load_processor

    assert probe.content_words("Есть ли на картинке красная фигура?") == ["красная"]
    assert probe.content_words("Какая фигура находится слева от круга?") == ["слева", "круга"]
    assert probe.content_words("Каким цветом нарисовано сердце?") == ["сердце"]
    assert probe.content_words("Какого цвета фон?") == []

    collator = TrainingCollator(load_processor(tiny_model_dir))
    images = probe.synthetic_images("train", 60, None, seed=3)
    items = probe.copy_items(images, collator, questions_per_sequence=1)
    kept = [row for image, _ in images for row in image.rows if probe.content_words(row["question"])]
    assert 0 < len(kept) < sum(len(image.rows) for image, _ in images)
    assert len(items) == len(kept)
    for item, row in zip(items[:20], kept):
        labelled = collator.tokenizer.decode([token for token in item.encoded.labels if token != IGNORE_INDEX])
        assert labelled == " ".join(probe.content_words(row["question"])) + "<end_of_turn>\n<eos>"
        assert item.encoded.image_tokens == collator.image_tokens and item.encoded.pixel_values.numel()
        assert row["question"] in collator.tokenizer.decode(item.encoded.input_ids)


def test_learning_probe_text_and_caption_formats_train_exactly_their_answers(tiny_model_dir: Path) -> None:
    """The control (`text`: the scene in words instead of the image) and the caption format label
    exactly what they claim, and the text control carries no image at all."""
    import learning_probe as probe
    from gqaru.collate import IGNORE_INDEX, TrainingCollator
    from gqaru.modeling import load_processor

    collator = TrainingCollator(load_processor(tiny_model_dir))
    tokenizer = collator.tokenizer
    images = probe.synthetic_images("train", 60, None, seed=3)

    def labelled(item: probe.Item) -> str:
        return tokenizer.decode([token for token in item.encoded.labels if token != IGNORE_INDEX])

    text = probe.text_items(images, collator, questions_per_sequence=4)
    assert sum(len(item.types) for item in text) == sum(len(image.rows) for image, _ in images)
    first_image, _ = images[0]
    first = text[0]
    assert collator.image_token_id not in first.encoded.input_ids and first.encoded.image_tokens == 0
    assert probe.scene_text(first_image.scene) in tokenizer.decode(first.encoded.input_ids)
    answers = [row["answer"] for row in first_image.rows[: len(first.types)]]
    assert labelled(first) == "".join(f"{answer}<end_of_turn>" for answer in answers) + "\n<eos>"
    batch = probe.pad(text[:3], collator)
    assert "pixel_values" not in batch and batch["input_ids"].shape == batch["labels"].shape

    captions = probe.caption_items(images[:2], collator, seed=0)
    scene = images[0][0].scene
    caption = labelled(captions[0]).strip()
    assert caption.startswith(f"фон {scene.background.nom['m']}.") and caption.endswith("<eos>")
    for obj in scene.objects:  # every object is described, with its side and size
        assert obj.shape.nom in caption and obj.color.nom[obj.shape.gender] in caption
    assert caption.count(";") == len(scene.objects)
    held_out = probe.caption_test_items(images[:2], collator)
    objects = sum(len(image.scene.objects) for image, _ in images[:2])
    kinds = [kind for item in held_out for kind, _ in item.types]
    assert kinds == ["shape after colour", "colour after shape"] * objects
    first_object = scene.objects[0]
    assert [labelled(item).strip() for item in held_out[:2]] == [
        first_object.shape.nom,
        first_object.color.nom[first_object.shape.gender],
    ]
