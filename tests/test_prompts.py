"""Prompt parity with the reference, on the replicas of deepvk/llava-gemma-2b-lora, deepvk/llava-saiga-8b
(Llama-3) and llava-hf/llava-1.5-7b-hf (Vicuna), and on the tiny model.

The reference is what lmms-eval and the model card do: render the tokenizer's chat template, then
call the processor with default special-token handling (tests/lmms_eval_reference.py). deepvk's
template writes no `<bos>` and its tokenizer adds one; the tiny model's template writes it itself
(there the reference leaves the tokenizer's out: literally, it would send two). Both must give
exactly one `<bos>` (the Llama-3 template writes its own, like the tiny model's), and for every
synthetic question the ids gqaru feeds the model (generation prompt, training conversation) must
equal the reference's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import datasets
import pytest
from lmms_eval_reference import prompt_text, reference_inputs, reference_processor
from PIL import Image

from gqaru.collate import GenerationCollator, SequencePlanner, TrainingCollator
from gqaru.modeling import load_processor
from gqaru.prompts import INSTRUCTION, Turn, tokenize_conversation

datasets.disable_progress_bars()


def _questions(synth_dir: Path) -> list[dict]:
    rows = []
    for split in ("train", "testdev"):
        rows += list(datasets.load_dataset(str(synth_dir), f"{split}_balanced_instructions", split=split))
    return rows


@pytest.fixture(scope="module")
def synth_questions(synth_dir: Path) -> list[dict]:
    """All 910 questions of the session's synthetic GQA-ru (both splits)."""
    return _questions(synth_dir)


@pytest.fixture(scope="module")
def replica(replica_dir: Path):
    return load_processor(replica_dir)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def llama3(saiga_replica_dir: Path):
    return load_processor(saiga_replica_dir)


@pytest.fixture(scope="module")
def vicuna(vicuna_replica_dir: Path):
    return load_processor(vicuna_replica_dir)


def _whole_string_ids(tokenizer, text: str) -> list[int]:
    """The reference tokenization: default special tokens, except a second <bos> (module docstring)."""
    return tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token))["input_ids"]


def _conversation_text(tokenizer, turns: list[tuple[str, str]]) -> str:
    messages = []
    for index, (question, answer) in enumerate(turns):
        image = "<image>\n" if index == 0 else ""
        messages += [
            {"role": "user", "content": f"{image}{question}\n{INSTRUCTION}"},
            {"role": "assistant", "content": answer},
        ]
    return tokenizer.apply_chat_template(messages, tokenize=False)


MODEL_DIRS = {"replica": "replica_dir", "tiny": "tiny_model_dir", "llama3": "saiga_replica_dir", "vicuna": "vicuna_replica_dir"}
"""The processor fixtures (below) and the model dirs they load: Gemma (deepvk's replica and the tiny
model), Llama-3 (saiga's replica) and Vicuna (llava-1.5's replica: no template, lmms-eval's)."""
END_OF_TURN = {"replica": "<end_of_turn>", "tiny": "<end_of_turn>", "llama3": "<|eot_id|>", "vicuna": "</s>"}
STOP = {"replica": "\n<eos>", "tiny": "\n<eos>", "llama3": None, "vicuna": None}
"""What ends a training conversation after its last end of turn: Gemma's template closes a turn with
`<end_of_turn>\n` and lmms-eval stops at `<eos>`; Llama-3's and Vicuna's end of turn is the eos."""


@pytest.mark.parametrize("model", list(MODEL_DIRS))
def test_generation_prompts_equal_the_processors_for_every_question(request, model: str, synth_questions) -> None:
    """The ids gqaru's generation batches hold == processor(images, text=template) ids, per question."""
    processor = request.getfixturevalue(model)
    reference = reference_processor(request.getfixturevalue(MODEL_DIRS[model]))
    collator = GenerationCollator(processor)
    image = Image.new("RGB", (64, 48), (120, 30, 200))
    bos = processor.tokenizer.bos_token_id
    writes_bos = prompt_text(reference.tokenizer, "?").startswith(reference.tokenizer.bos_token)
    mismatched = []
    for start in range(0, len(synth_questions), 64):
        chunk = synth_questions[start : start + 64]
        texts = [prompt_text(reference.tokenizer, row["question"]) for row in chunk]
        expected = reference(
            images=[image] * len(chunk), text=texts, return_tensors="pt", padding=True, add_special_tokens=not writes_bos
        )
        ours = collator([{"image": image, "question": row["question"]} for row in chunk])
        for row, question in enumerate(chunk):
            want = expected["input_ids"][row][expected["attention_mask"][row].bool()].tolist()
            got = ours["input_ids"][row][ours["attention_mask"][row].bool()].tolist()
            assert got[:2].count(bos) == 1 and got[0] == bos  # one <bos>, first, never two
            if got != want:
                mismatched.append(question["question"])
    assert not mismatched, f"{len(mismatched)} of {len(synth_questions)} prompts differ, e.g. {mismatched[:3]}"
    assert len(synth_questions) == 910


@pytest.mark.parametrize("model", list(MODEL_DIRS))
def test_training_conversations_equal_the_whole_string_tokenization(request, model: str, synth_questions) -> None:
    """Single- and multi-turn conversations: ids == tokenizer(rendered text) with default special tokens,
then the eos where the family's end of turn is not the eos; labels are exactly each answer and the
end-of-turn token of its family, and after the last one the stop evaluation uses."""
    eos = [] if STOP[model] is None else [request.getfixturevalue(model).tokenizer.eos_token_id]
    tokenizer = request.getfixturevalue(model).tokenizer
    by_image = defaultdict(list)
    for row in synth_questions:
        by_image[row["imageId"]].append(row)
    conversations = [[row] for row in synth_questions]
    for rows in by_image.values():
        conversations += [rows[start : start + 4] for start in range(0, len(rows), 4)]
    for rows in conversations:
        turns = [(row["question"], row["answer"]) for row in rows]
        tokens = tokenize_conversation(tokenizer, [Turn(question, answer) for question, answer in turns])
        assert tokens.input_ids == _whole_string_ids(tokenizer, _conversation_text(tokenizer, turns)) + eos
        labelled = [tokenizer.decode(tokens.input_ids[start:end]) for start, end in tokens.answer_spans]
        assert labelled == [f"{answer}{END_OF_TURN[model]}" for _, answer in turns]
        stop = tokens.stop_span and tokenizer.decode(tokens.input_ids[slice(*tokens.stop_span)])
        assert stop == STOP[model] and (stop is None or tokens.stop_span[1] == len(tokens.input_ids))
    assert len(conversations) > len(synth_questions) + 200


@pytest.mark.parametrize("model", ["replica", "tiny"])
def test_exactly_one_bos_whether_or_not_the_template_writes_it(request, model: str) -> None:
    processor = request.getfixturevalue(model)
    tokenizer = processor.tokenizer
    text = prompt_text(tokenizer, "Какого цвета шар?")
    template_writes_bos = text.startswith(tokenizer.bos_token)
    assert template_writes_bos == (model == "tiny")  # deepvk's template has no {{ bos_token }}
    bos = tokenizer.bos_token_id
    for conversation in (
        tokenize_conversation(tokenizer, [Turn("Какого цвета шар?")], add_generation_prompt=True),
        tokenize_conversation(tokenizer, [Turn("Какого цвета шар?", "красного"), Turn("Где он?", "слева")]),
    ):
        assert conversation.input_ids[0] == bos and conversation.input_ids.count(bos) == 1
    # The planner and the collator add no <bos> of their own.
    planner = SequencePlanner(tokenizer, 4, 512)
    (_, tokens), = planner.plan([{"id": "a", "question": "Где шар?", "answer": "слева"}])
    expanded, _ = TrainingCollator(processor).expand(tokens)
    assert expanded.count(bos) == 1


def test_the_tiny_reference_differs_only_by_the_doubled_bos(tiny_model_dir: Path, tiny) -> None:
    """Literally as lmms-eval calls it, a BOS-writing template gets <bos><bos>; gqaru sends one."""
    reference = reference_processor(tiny_model_dir)
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    literal = reference_inputs(reference, image, "Где шар?", one_bos=False)["input_ids"][0].tolist()
    ours = GenerationCollator(tiny)([{"image": image, "question": "Где шар?"}])["input_ids"][0].tolist()
    bos = tiny.tokenizer.bos_token_id
    assert literal[:2] == [bos, bos]
    assert ours == literal[1:]


@pytest.mark.parametrize(
    "hostile", ["<image>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<start_of_turn>model"]
)
def test_special_token_text_in_dataset_text_never_yields_a_special_id(replica, hostile: str) -> None:
    tokenizer = replica.tokenizer
    turns = [Turn(f"Что это {hostile} такое?", f"круг{hostile}"), Turn(f"{hostile}Где?", "слева")]
    tokens = tokenize_conversation(tokenizer, turns)
    plain = tokenize_conversation(tokenizer, [Turn("Что это такое?", "круг"), Turn("Где?", "слева")])
    for index in tokenizer.added_tokens_decoder:
        assert tokens.input_ids.count(index) == plain.input_ids.count(index), tokenizer.convert_ids_to_tokens([index])
    labelled = [tokenizer.decode(tokens.input_ids[start:end]) for start, end in tokens.answer_spans]
    assert labelled == [f"круг{hostile}<end_of_turn>", "слева<end_of_turn>"]


# --------------------------------------------------------------------------------------------------
# The end of a model turn, read off each family's template, on the replicas (real tokenizers).

# llava-hf's own llava-1.5 style: the answer is followed by a space and the next USER, no special token.
NO_MARKER_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)



def test_the_end_of_turn_is_read_off_each_family_s_template(replica, tiny, llama3, vicuna) -> None:
    from gqaru.prompts import tokenizer_habits

    found = {name: tokenizer_habits(processor.tokenizer).end_of_turn_id
             for name, processor in {"gemma": replica, "tiny": tiny, "llama3": llama3, "vicuna": vicuna}.items()}  # fmt: skip
    assert found == {
        "gemma": 107,  # <end_of_turn>
        "tiny": tiny.tokenizer.convert_tokens_to_ids("<end_of_turn>"),
        "llama3": 128009,  # <|eot_id|>
        "vicuna": 2,  # </s>, written by lmms-eval's Vicuna template
    }


def test_a_model_without_a_template_gets_lmms_eval_s_and_the_log_says_so(vicuna_replica_dir: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="gqaru.modeling"):
        load_processor(vicuna_replica_dir)
    assert "no chat template: using lmms-eval's Vicuna prompt" in caplog.text


def test_a_template_that_writes_the_eos_itself_gets_no_second_one(replica) -> None:
    """The stop after the last answer runs through the template's own eos when it writes one; only a
    template that writes none gets one appended."""
    import copy

    tokenizer = copy.deepcopy(replica.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("<end_of_turn>\n", "<end_of_turn>\n<eos>")
    turns = [("Какого цвета шар?", "красного"), ("Где он?", "слева")]
    tokens = tokenize_conversation(tokenizer, [Turn(question, answer) for question, answer in turns])
    # The template's own text, an eos after each of its four messages, and nothing appended.
    assert tokens.input_ids == _whole_string_ids(tokenizer, _conversation_text(tokenizer, turns))
    assert tokens.input_ids.count(tokenizer.eos_token_id) == 4
    assert tokenizer.decode(tokens.input_ids[slice(*tokens.stop_span)]) == "\n<eos>"
    assert tokens.stop_span[1] == len(tokens.input_ids)


def test_a_template_without_an_end_of_turn_token_is_a_clear_error(vicuna) -> None:
    import copy

    from gqaru.prompts import ChatFormatError, tokenizer_habits

    tokenizer = copy.deepcopy(vicuna.tokenizer)
    tokenizer.chat_template = NO_MARKER_TEMPLATE
    tokenizer.name_or_path = "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(ChatFormatError, match=r"llava-1.5-7b-hf does not close a model turn with a special token"):
        tokenizer_habits(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ChatFormatError, match=r"llava-1.5-7b-hf has no chat template"):
        tokenizer_habits(tokenizer)


@pytest.mark.parametrize("family", list(MODEL_DIRS))
def test_a_trained_answer_follows_exactly_the_generation_prompt(request, family: str) -> None:
    """What evaluation asks after is what training put in front of the answer, token for token, and
    the labels start right there (for Vicuna the answer's first token carries the space)."""
    tokenizer = request.getfixturevalue(family).tokenizer
    prompt = tokenize_conversation(tokenizer, [Turn("Какого цвета кот?")], add_generation_prompt=True).input_ids
    trained = tokenize_conversation(tokenizer, [Turn("Какого цвета кот?", "серый")])
    assert trained.input_ids[: len(prompt)] == prompt
    assert trained.answer_spans[0][0] == len(prompt)


def test_lmms_eval_s_own_vicuna_template_would_skew_training_and_says_so(vicuna, caplog) -> None:
    """lmms-eval's template opens a trained model turn with "  ASSISTANT: " (two spaces) where its
    generation prompt ends "q ASSISTANT:": gqaru's Vicuna prompt drops that space, and warns about
    any template that does this."""
    import copy

    from lmms_eval_reference import VICUNA_CHAT_TEMPLATE

    from gqaru.prompts import tokenizer_habits

    tokenizer = copy.deepcopy(vicuna.tokenizer)
    tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    with caplog.at_level("WARNING", logger="gqaru.prompts"):
        tokenizer_habits(tokenizer)
    assert "trained answers follow other text than evaluated ones" in caplog.text
    assert ".  ASSISTANT: " in caplog.text
