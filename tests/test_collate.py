"""Prompts and collators: answer-only labels, protected image tokens, text that stays text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from gqaru.collate import (
    IGNORE_INDEX,
    DropCounter,
    GenerationCollator,
    SequencePlanner,
    TrainingCollator,
    TrainingSequence,
    group_by_length,
)
from gqaru.prompts import INSTRUCTION, Turn, tokenize_conversation


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def _questions(count: int, prefix: str = "q") -> list[dict]:
    colours = ["красный", "синий", "зелёный", "жёлтый", "белый"]
    return [
        {"id": f"{prefix}{index:03d}", "question": f"Какого цвета объект номер {index}?", "answer": colours[index % 5]}
        for index in range(count)
    ]


def _image() -> Image.Image:
    return Image.new("RGB", (500, 375), (200, 30, 30))


def _batch(processor, questions_per_sequence: int, max_seq_len: int, questions: list[dict], drops=None):
    planner = SequencePlanner(processor.tokenizer, questions_per_sequence, max_seq_len)
    groups = planner.plan(questions, drops)
    sequences = [TrainingSequence("img", _image(), group, tokens) for group, tokens in groups]
    return groups, TrainingCollator(processor)(sequences)


def _label_segments(labels: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive labelled positions in one row."""
    segments, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(value)
    if current:
        segments.append(current)
    return segments


def test_prompt_matches_the_chat_template(processor) -> None:
    tokenizer = processor.tokenizer
    ids = tokenize_conversation(tokenizer, [Turn("Какого цвета круг?")], add_generation_prompt=True).input_ids
    messages = [{"role": "user", "content": f"<image>\nКакого цвета круг?\n{INSTRUCTION}"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == expected


@pytest.mark.parametrize("questions_per_sequence", [1, 4])
def test_labels_are_exactly_answers_end_of_turn_and_the_stop(processor, questions_per_sequence: int) -> None:
    """Each answer with its `<end_of_turn>`; the last one of a sequence also with the template's closing
    newline and the `<eos>` generation stops at."""
    tokenizer = processor.tokenizer
    questions = _questions(7)
    groups, batch = _batch(processor, questions_per_sequence, 512, questions)
    assert [len(group) for group, _ in groups] == {1: [1] * 7, 4: [4, 3]}[questions_per_sequence]
    decoded, expected = [], []
    for row, (group, _) in enumerate(groups):
        decoded += [tokenizer.decode(segment) for segment in _label_segments(batch["labels"][row])]
        expected += [f"{question['answer']}<end_of_turn>" for question in group]
        expected[-1] += "\n<eos>"
    assert decoded == expected
    # Labelled positions carry the input token itself (the model shifts internally).
    labelled = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
    # Padding is on the right and never labelled.
    assert not labelled[batch["attention_mask"] == 0].any()
    assert batch["questions"] == 7


@pytest.mark.parametrize("max_seq_len", [20, 40, 64, 100, 512])
def test_no_image_token_is_ever_cut(processor, max_seq_len: int) -> None:
    drops = DropCounter()
    questions = _questions(9)
    planner = SequencePlanner(processor.tokenizer, 4, max_seq_len)
    if not planner.plan(questions):
        # Nothing fits: every question is dropped, counted, and nothing is collated.
        planner.plan(questions, drops)
        assert drops.counts == {"question_too_long": len(questions)}
        return
    groups, batch = _batch(processor, 4, max_seq_len, questions, drops)
    collator = TrainingCollator(processor)
    image_token_id = collator.image_token_id
    per_row = (batch["input_ids"] == image_token_id).sum(dim=1)
    assert per_row.tolist() == [collator.image_tokens] * len(groups)
    trained = sum(len(group) for group, _ in groups)
    assert trained + drops.total() == len(questions), "a question was lost silently"
    for group, tokens in groups:
        text_tokens = len(tokens.input_ids) - tokens.input_ids.count(image_token_id)
        assert text_tokens <= max_seq_len


def test_overflowing_group_is_split_and_unfittable_question_dropped(processor) -> None:
    tokenizer = processor.tokenizer
    planner = SequencePlanner(tokenizer, 8, 512)
    one = planner.text_length(planner.tokenize(_questions(1)))
    four = planner.text_length(planner.tokenize(_questions(4)))
    # A budget that fits two or three questions but not four splits a group of four.
    budget = (one + four) // 2
    questions = _questions(4)
    questions.insert(2, {"id": "long", "question": "очень " * 400 + "длинный вопрос?", "answer": "да"})
    drops = DropCounter()
    groups = SequencePlanner(tokenizer, 8, budget).plan(questions, drops)
    assert len(groups) >= 2
    assert sorted(q["id"] for group, _ in groups for q in group) == ["q000", "q001", "q002", "q003"]
    assert drops.counts == {"question_too_long": 1} and drops.examples["question_too_long"] == ["long"]


@pytest.mark.parametrize("hostile", ["<image>", "<start_of_turn>", "<end_of_turn>", "<bos>"])
def test_special_token_text_in_a_question_stays_text(processor, model, hostile: str) -> None:
    tokenizer = processor.tokenizer
    question = {"id": "x", "question": f"Что это {hostile} такое {hostile}?", "answer": f"круг{hostile}"}
    _, batch = _batch(processor, 2, 512, [question, *_questions(1)])
    special_ids = set(tokenizer.all_special_ids)
    tokens = tokenize_conversation(tokenizer, [Turn(question["question"], question["answer"])])
    template_only = tokenize_conversation(tokenizer, [Turn("", "")])
    # The hostile text adds no special ids beyond the template's own.
    counts = {token: tokens.input_ids.count(token) for token in special_ids}
    baseline = {token: template_only.input_ids.count(token) for token in special_ids}
    assert counts == baseline
    # And the model trains on it without an image-token mismatch.
    with torch.no_grad():
        output = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "labels")})
    assert torch.isfinite(output.loss)


def test_image_tokens_match_the_vision_tower(processor, model) -> None:
    collator = TrainingCollator(processor)
    vision = model.config.vision_config
    assert collator.image_tokens == (vision.image_size // vision.patch_size) ** 2
    _, batch = _batch(processor, 2, 512, _questions(2))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    per_image = features[0].shape[0] if isinstance(features, (list, tuple)) else features.shape[1]
    assert per_image == collator.image_tokens


def test_real_shape_preset_has_576_image_tokens(tmp_path: Path) -> None:
    from gqaru.standins.tiny import build_tiny_model

    out = build_tiny_model(tmp_path / "real", preset="real-shape", seed=0)
    processor = AutoProcessor.from_pretrained(out)
    collator = TrainingCollator(processor)
    assert collator.image_tokens == 576
    _, batch = _batch(processor, 3, 512, _questions(3))
    assert (batch["input_ids"] == collator.image_token_id).sum().item() == 576
    assert batch["pixel_values"].shape[-2:] == (336, 336)


def test_generation_batch_is_left_padded(processor) -> None:
    collator = GenerationCollator(processor)
    items = [
        {"image": _image(), "question": "Да?"},
        {"image": _image(), "question": "Какого цвета самый большой объект на этой картинке?"},
    ]
    batch = collator(items)
    mask = batch["attention_mask"]
    assert mask[:, -1].all(), "every prompt must end in the last column"
    assert mask[0, 0] == 0 and mask[1].all()
    tokenizer = processor.tokenizer
    for row, item in enumerate(items):
        text = tokenizer.decode(batch["input_ids"][row][mask[row].bool()])
        assert text.endswith(f"{item['question']}\n{INSTRUCTION}<end_of_turn>\n<start_of_turn>model\n")


def test_overfitting_a_few_batches_drives_the_loss_down_and_answers_stop_at_eos(tiny_model_dir: Path, processor) -> None:
    """Collator + answer-only loss + LoRA: two fixed batches are memorised within 60 steps, and the
    memorised answers stop where lmms-eval's generation stops (`<eos>`), through the closing newline
    the template writes after `<end_of_turn>`."""
    from gqaru.config import LoraConfig
    from gqaru.modeling import answer_only_loss, apply_lora

    torch.manual_seed(0)
    model = apply_lora(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), LoraConfig(dropout=0.0, train_projector=True))
    model.train()
    batches = [_batch(processor, 4, 512, _questions(6, prefix=f"b{index}"))[1] for index in range(2)]
    inputs = [{key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "labels")} for batch in batches]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for step in range(60):
        loss_sum, tokens = answer_only_loss(model, inputs[step % 2])
        (loss_sum / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss_sum / tokens).item())
    assert losses[-1] < 0.1 * losses[0], f"{losses[0]:.3f} -> {losses[-1]:.3f}"

    model.eval()
    tokenizer = processor.tokenizer
    firsts = [_questions(6, prefix=f"b{index}")[0] for index in range(2)]  # each batch's first turn: a plain prompt
    prompts = GenerationCollator(processor)([{"image": _image(), "question": question["question"]} for question in firsts])
    with torch.no_grad():
        generated = model.generate(
            **prompts, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
        )
    replies = tokenizer.batch_decode(generated[:, prompts["input_ids"].shape[1] :])
    assert replies == [f"{question['answer']}<end_of_turn>\n<eos>" for question in firsts]


@pytest.mark.parametrize("questions_per_sequence", [1, 3, 8])
@pytest.mark.parametrize("max_seq_len", [30, 60, 120, 512])
def test_fast_plan_equals_the_exact_greedy_plan(processor, questions_per_sequence: int, max_seq_len: int) -> None:
    import random

    rng = random.Random(questions_per_sequence * 1000 + max_seq_len)
    words = ["круг", "квадрат", "красный", "слева", "большой", "<image>", "фигура", "на", "картинке", "?"]
    questions = [
        {
            "id": f"q{index}",
            "question": " ".join(rng.choice(words) for _ in range(rng.randint(1, 25))),
            "answer": " ".join(rng.choice(words) for _ in range(rng.randint(1, 3))),
        }
        for index in range(40)
    ]
    planner = SequencePlanner(processor.tokenizer, questions_per_sequence, max_seq_len)
    fast_drops, exact_drops = DropCounter(), DropCounter()
    fast = planner.plan(questions, fast_drops)
    exact = planner.plan_exactly(questions, exact_drops)
    assert [[q["id"] for q in group] for group, _ in fast] == [[q["id"] for q in group] for group, _ in exact]
    assert [tokens for _, tokens in fast] == [tokens for _, tokens in exact]
    assert fast_drops.counts == exact_drops.counts


def _padding(lengths: list[int], batch_size: int) -> int:
    batches = [lengths[start : start + batch_size] for start in range(0, len(lengths), batch_size)]
    return sum(len(batch) * max(batch) - sum(batch) for batch in batches)


def test_group_by_length_cuts_padding_keeps_every_item_and_is_seeded() -> None:
    import random

    rng = random.Random(0)
    items = [(index, rng.choice([30, 60, 90]) + rng.randint(0, 5)) for index in range(203)]  # (id, length)
    length = lambda item: item[1]  # noqa: E731
    grouped = list(group_by_length(items, length, batch_size=4, buffer_batches=8, seed="s"))
    assert sorted(grouped) == sorted(items)  # nothing dropped, nothing added
    assert grouped == list(group_by_length(items, length, batch_size=4, buffer_batches=8, seed="s"))
    assert grouped != list(group_by_length(items, length, batch_size=4, buffer_batches=8, seed="t"))
    # Bounded: an item never leaves its buffer of 32, and each batch of 4 comes from one buffer.
    for start in range(0, len(items), 32):
        assert sorted(grouped[start : start + 32]) == sorted(items[start : start + 32])
    lengths = [item[1] for item in grouped]
    assert _padding(lengths, 4) < _padding([item[1] for item in items], 4) / 3
    # The last buffer (203 = 6 x 32 + 11) ends with its short batch, so cutting by 4 in order
    # gives the grouped batches themselves: each is a run of the buffer's sorted lengths.
    tail = sorted(item[1] for item in items[192:])
    assert lengths[-3:] == tail[-3:]
    with pytest.raises(ValueError, match="batch_size 0 and buffer_batches 2 must be >= 1"):
        list(group_by_length(items, length, batch_size=0, buffer_batches=2, seed=0))
