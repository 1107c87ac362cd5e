"""The prompt, rendered through the tokenizer's chat template, tokenized so that text stays text.

The user turn is `<image>\\n{question}\\nОтветь одним словом.` and the model turn is `{answer}`, as in
deepvk's training and lmms-eval's `gqa_ru` task. Several questions about one image become one
multi-turn conversation with the image in the first user turn only.

Questions and answers come from a dataset, so they may contain strings such as `<image>` or
`<start_of_turn>`. Tokenizing the rendered conversation as one string would turn those into
special-token ids (a fake image slot, a fake turn). Instead the template is rendered with opaque
placeholders where the dataset text goes; the template's own parts are tokenized with special
tokens recognised, and the dataset text with `split_special_tokens=True`, so it can only ever
produce ordinary ids. The same function serves training and generation, so both see identical
prompt tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Ответь одним словом."
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<end_of_turn>"

# Placeholders cannot collide with dataset text: they contain a NUL, which the texts are cleaned of.
_SLOT = "\x00slot{}\x00"
_SLOT_PATTERN = re.compile("\x00slot(\\d+)\x00")


@dataclass(frozen=True)
class Turn:
    """One question and (for training) its answer."""

    question: str
    answer: str | None = None


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of a conversation with the `<image>` slot still a single token.

    `answer_spans[i]` is the (start, end) range of answer i's tokens **plus** the end-of-turn
    token that closes it: exactly the positions that carry labels in training.
    """

    input_ids: list[int]
    answer_spans: list[tuple[int, int]]


def clean_text(text: str) -> str:
    """Strip surrounding whitespace (as Gemma's template trims contents) and drop NULs."""
    return text.replace("\x00", "").strip()


def user_content(question_slot: str, with_image: bool) -> str:
    """The user turn around a question, `<image>` only in the first turn."""
    prefix = f"{IMAGE_TOKEN}\n" if with_image else ""
    return f"{prefix}{question_slot}\n{INSTRUCTION}"


def _render_with_slots(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], add_generation_prompt: bool
) -> tuple[str, list[str]]:
    """Render the chat template with a placeholder per dataset text; return it and the texts."""
    texts: list[str] = []
    messages = []
    for index, turn in enumerate(turns):
        texts.append(clean_text(turn.question))
        messages.append({"role": "user", "content": user_content(_SLOT.format(len(texts) - 1), index == 0)})
        if turn.answer is not None:
            texts.append(clean_text(turn.answer))
            messages.append({"role": "assistant", "content": _SLOT.format(len(texts) - 1)})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return rendered, texts


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], *, add_generation_prompt: bool = False
) -> TokenizedConversation:
    """Tokenize a conversation about one image.

    Training: every turn has an answer, `add_generation_prompt=False`.
    Generation: the last turn has no answer and `add_generation_prompt=True`.

    Raises:
        ValueError: the chat template dropped or reordered a text (a template we cannot trust),
            or the tokenizer has no single-token `<end_of_turn>`.
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    rendered, texts = _render_with_slots(tokenizer, turns, add_generation_prompt)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn_id is None or end_of_turn_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token: is this a Gemma-style chat model?")

    pieces = _SLOT_PATTERN.split(rendered)
    # split() alternates template text and slot numbers: [tpl, 0, tpl, 1, tpl, ...].
    slot_order = [int(number) for number in pieces[1::2]]
    if slot_order != list(range(len(texts))):
        raise ValueError(f"the chat template dropped or reordered message contents (slots {slot_order})")

    answer_slots = _answer_slot_numbers(turns)
    input_ids: list[int] = []
    answer_spans: list[tuple[int, int]] = []
    for position, piece in enumerate(pieces):
        if position % 2 == 0:
            input_ids += tokenizer.encode(piece, add_special_tokens=False) if piece else []
            continue
        slot = int(piece)
        ids = tokenizer(texts[slot], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        start = len(input_ids)
        input_ids += ids
        if slot in answer_slots:
            # The label span runs through the end-of-turn token that the template puts right after.
            following = pieces[position + 1] if position + 1 < len(pieces) else ""
            if not following.startswith(END_OF_TURN):
                raise ValueError(f"the chat template does not close a model turn with {END_OF_TURN}")
            answer_spans.append((start, len(input_ids) + 1))
    return TokenizedConversation(input_ids=input_ids, answer_spans=answer_spans)


def _answer_slot_numbers(turns: Sequence[Turn]) -> set[int]:
    slots, counter = set(), 0
    for turn in turns:
        counter += 1  # the question
        if turn.answer is not None:
            slots.add(counter)
            counter += 1
    return slots


def text_token_count(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], **kwargs: bool) -> int:
    """Text tokens of a conversation (the `<image>` slot counts as one, image tokens excluded)."""
    return len(tokenize_conversation(tokenizer, turns, **kwargs).input_ids)
