"""The prompt, rendered through the tokenizer's chat template and tokenized exactly as the reference does.

The user turn is `<image>\\n{question}\\nОтветь одним словом.` and the model turn is `{answer}`, as in
deepvk's training and lmms-eval's `gqa_ru` task. Several questions about one image become one
multi-turn conversation with the image in the first user turn only.

**Identical to the reference.** lmms-eval (and the model card, and every LLaVA processor) renders the
template to text and calls `processor(images=..., text=...)`, which tokenizes the whole string with
the tokenizer's default special-token handling. So does `tokenize_conversation`: the rendered
conversation is tokenized as one string, and whatever the tokenizer puts in front of every text
(Gemma: `<bos>`, because `add_bos_token: true`) is put in front once. deepvk's template writes no
`<bos>`; a template that does (the tiny model's) is not given a second one. Exactly one `<bos>`.

**Text stays text.** Questions and answers come from a dataset and may contain strings such as
`<image>` or `<start_of_turn>`; tokenized inside the whole string, those would become special ids (a
fake image slot, a fake turn). The template is rendered with opaque placeholders first, so the
character span of every dataset text is known; when a special or added token lands inside one, that
conversation is tokenized piece by piece instead (template parts with special tokens recognised,
dataset text with `split_special_tokens=True`), which can only ever give ordinary ids there. For
every other conversation the ids are the whole-string ids.

Answer labels are the tokens that overlap the answer's characters, plus the end-of-turn token right
after them. The same function serves training and generation, so both see identical prompt tokens.

**A training conversation ends the way generation stops.** lmms-eval stops generating only at the
tokenizer's eos, which Gemma's template never writes (a model turn ends `<end_of_turn>\n`). So after
the last answer the template's own closing text (`\n`) and the eos are appended to the rendered
conversation and labelled: what the model is trained to say after an answer is exactly what ends
an evaluated answer. Without them nothing after `<end_of_turn>` is ever trained, and a LoRA run can
drift into running on past it until `max_new_tokens`. Where the end of turn is the eos (Vicuna's
`</s>`, saiga's `<|eot_id|>`) nothing is added.

**The end of a model turn is read off the template**, not assumed: a user/assistant/user conversation
is rendered with placeholders, and the template's text right after the answer must start with a
special token (`<end_of_turn>` for Gemma, `<|eot_id|>` for Llama-3, `</s>` for a Vicuna template that
writes the eos after an answer). A template that closes an answer otherwise (plain text, nothing)
could not teach a model where its answer ends: `ChatFormatError` at start-up, naming the model.
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("gqaru.prompts")

INSTRUCTION = "Ответь одним словом."
IMAGE_TOKEN = "<image>"

VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %}"
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""For a tokenizer without a chat template (llava-1.5 checkpoints): the template lmms-eval's
`llava_hf` gives such a tokenizer, but for one space. Generation prompts are lmms-eval's, character
for character (`USER: <image>\n{question} ASSISTANT:`). lmms-eval's template opens a model turn
with " ASSISTANT: " after the user turn's trailing space, so a trained answer would follow
"q  ASSISTANT: " while evaluation asks after "q ASSISTANT:"; without that space an answer follows
"q ASSISTANT: ", LLaVA-1.5's own training format (`USER: q ASSISTANT: a</s>`), and the space is the
start of the answer's first token, as in generation. An answer ends with eos."""

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
    token that closes it. `stop_span` is the range after the last answer that ends a training
    conversation (the template's closing text and the eos), None when the end of turn already is
    the eos or the conversation ends in a generation prompt. Together they are exactly the
    positions that carry labels in training (`label_spans`).
    """

    input_ids: list[int]
    answer_spans: list[tuple[int, int]]
    stop_span: tuple[int, int] | None = None

    @property
    def label_spans(self) -> list[tuple[int, int]]:
        return self.answer_spans + ([self.stop_span] if self.stop_span else [])


class ChatFormatError(ValueError):
    """A chat template or tokenizer gqaru cannot build exact prompts and labels for; says which and why."""


@dataclass(frozen=True)
class TokenizerHabits:
    """What a tokenizer and its chat template do on their own that the prompt code must know."""

    prefix_ids: tuple[int, ...]
    """Ids the tokenizer puts in front of every text with default special-token handling (`<bos>`)."""
    end_of_turn_id: int
    """The special token the template writes right after an answer (it is labelled with the answer)."""
    eos_id: int
    """The token generation stops at under lmms-eval's rule (the tokenizer's eos)."""
    protected_ids: frozenset[int]
    """Ids of special and added tokens (matched as whole strings): dataset text must never yield them."""


_HABITS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, TokenizerHabits] = weakref.WeakKeyDictionary()


def _model_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, protected: frozenset[int]) -> int:
    """The special token the chat template writes right after an answer.

    Raises:
        ChatFormatError: no chat template, one that cannot render user/assistant turns in order, or
            one whose text after an answer does not start with a special token.
    """
    model = _model_name(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError(f"{model} has no chat template: gqaru renders prompts with the model's own template")
    messages = [
        {"role": "user", "content": user_content(_SLOT.format(0), with_image=True)},
        {"role": "assistant", "content": _SLOT.format(1)},
        {"role": "user", "content": user_content(_SLOT.format(2), with_image=False)},
    ]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as error:  # jinja raises whatever the template raises
        raise ChatFormatError(f"the chat template of {model} cannot render a user/assistant/user conversation: {error}") from error
    parts = _SLOT_PATTERN.split(rendered)
    if [int(number) for number in parts[1::2]] != [0, 1, 2]:
        raise ChatFormatError(f"the chat template of {model} drops or reorders message contents")
    _check_model_turn_opening(tokenizer, parts[0] + _SLOT.format(0) + parts[2], model)
    after_answer = parts[4]
    ids = tokenizer(after_answer, add_special_tokens=False)["input_ids"] if after_answer else []
    if not ids or ids[0] not in protected:
        raise ChatFormatError(
            f"the chat template of {model} does not close a model turn with a special token (after an answer "
            f"it writes {after_answer[:40]!r}): without one, training cannot teach where an answer ends"
        )
    return ids[0]


def _check_model_turn_opening(tokenizer: PreTrainedTokenizerBase, before_answer: str, model: str) -> None:
    """Warn when a trained answer would follow other text than the generation prompt ends with.

    `before_answer` is the template's text in front of an answer (first turn, question slot 0).
    It must be the generation prompt, plus at most whitespace (which becomes part of the answer's
    first token, as when the model generates it)."""
    messages = [{"role": "user", "content": user_content(_SLOT.format(0), with_image=True)}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not (before_answer.startswith(prompt) and not before_answer[len(prompt) :].strip()):
        logger.warning(
            "the chat template of %s opens a model turn with %r in training but ends a generation prompt with %r: "
            "trained answers follow other text than evaluated ones",
            model, before_answer[-30:], prompt[-30:],
        )


def tokenizer_habits(tokenizer: PreTrainedTokenizerBase) -> TokenizerHabits:
    """The tokenizer's prefix, the template's end-of-turn id and the special ids (worked out once per
    tokenizer object).

    The prefix is read off the tokenizer itself: a probe text encoded with and without special
    tokens. A tokenizer that appends something to every text (`add_eos_token`) is refused: a
    generation prompt would end in it. The end of turn is read off the chat template
    (`end_of_turn_id`).

    Raises:
        ChatFormatError: a template without a special token after an answer, or special tokens
            appended after every text.
    """
    habits = _HABITS.get(tokenizer)
    if habits is not None:
        return habits
    protected = frozenset(tokenizer.added_tokens_decoder) | frozenset(tokenizer.all_special_ids)
    probe = "x"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    wrapped = tokenizer(probe)["input_ids"]
    start = next((i for i in range(len(wrapped) - len(bare) + 1) if wrapped[i : i + len(bare)] == bare), None)
    if start is None:
        raise ChatFormatError(f"cannot tell what the tokenizer of {_model_name(tokenizer)} adds around a text ({bare} vs {wrapped})")
    suffix = wrapped[start + len(bare) :]
    if suffix:
        raise ChatFormatError(
            f"the tokenizer of {_model_name(tokenizer)} appends {tokenizer.convert_ids_to_tokens(suffix)} to every "
            "text (add_eos_token?): a generation prompt would end in it; load the tokenizer with add_eos_token=False"
        )
    if tokenizer.eos_token_id is None:
        raise ChatFormatError(
            f"the tokenizer of {_model_name(tokenizer)} has no eos token: generation (lmms-eval's rule) stops only at it"
        )
    habits = TokenizerHabits(
        prefix_ids=tuple(wrapped[:start]),
        end_of_turn_id=end_of_turn_id(tokenizer, protected),
        eos_id=tokenizer.eos_token_id,
        protected_ids=protected,
    )
    _HABITS[tokenizer] = habits
    return habits


def user_content(question_slot: str, with_image: bool) -> str:
    """The user turn around a question, `<image>` only in the first turn."""
    prefix = f"{IMAGE_TOKEN}\n" if with_image else ""
    return f"{prefix}{question_slot}\n{INSTRUCTION}"


@dataclass(frozen=True)
class RenderedConversation:
    """The chat template's output with the dataset texts in place, and where each text sits."""

    text: str
    text_spans: list[tuple[int, int]]
    """Character (start, end) of every dataset text, in order (questions and answers)."""
    answer_spans: list[tuple[int, int]]
    """Character (start, end) of every answer (a subset of `text_spans`)."""
    pieces: list[str]
    """The template's own text between the dataset texts (len(text_spans) + 1 pieces)."""
    texts: list[str]


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], add_generation_prompt: bool
) -> RenderedConversation:
    """Render the chat template around `turns`, recording where each dataset text lands.

    Texts are cleaned as the template would leave them: NULs dropped; answers stripped and later
    questions left-stripped (Gemma's template trims every message's content; a first question
    sits after `<image>\\n`, so its own whitespace is kept, as lmms-eval keeps it).

    Raises:
        ValueError: the template dropped or reordered a text (a template we cannot trust).
    """
    texts: list[str] = []
    is_answer: list[bool] = []
    messages = []
    for index, turn in enumerate(turns):
        question = turn.question.replace("\x00", "")
        texts.append(question if index == 0 else question.lstrip())
        is_answer.append(False)
        messages.append({"role": "user", "content": user_content(_SLOT.format(len(texts) - 1), index == 0)})
        if turn.answer is not None:
            texts.append(turn.answer.replace("\x00", "").strip())
            is_answer.append(True)
            messages.append({"role": "assistant", "content": _SLOT.format(len(texts) - 1)})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = _SLOT_PATTERN.split(rendered)
    # split() alternates template text and slot numbers: [tpl, 0, tpl, 1, tpl, ...].
    slot_order = [int(number) for number in parts[1::2]]
    if slot_order != list(range(len(texts))):
        raise ValueError(f"the chat template dropped or reordered message contents (slots {slot_order})")
    pieces = parts[0::2]
    text, spans = pieces[0], []
    for slot, piece in zip(texts, pieces[1:]):
        spans.append((len(text), len(text) + len(slot)))
        text += slot + piece
    answers = [span for span, answer in zip(spans, is_answer) if answer]
    return RenderedConversation(text=text, text_spans=spans, answer_spans=answers, pieces=pieces, texts=texts)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], *, add_generation_prompt: bool = False
) -> TokenizedConversation:
    """Tokenize a conversation about one image, as the processor would tokenize its rendered text.

    Training: every turn has an answer, `add_generation_prompt=False`; the conversation ends with
    the stop generation uses (`stop_span`).
    Generation: the last turn has no answer and `add_generation_prompt=True`.

    Raises:
        ChatFormatError: as `tokenizer_habits`.
        ValueError: the chat template dropped or reordered a text, or did not close a model turn
            with its end-of-turn token.
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    habits = tokenizer_habits(tokenizer)
    rendered = render_conversation(tokenizer, turns, add_generation_prompt)
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if _text_stays_text(ids, offsets, rendered.text_spans, habits.protected_ids):
        answer_spans = [_token_span(offsets, span) for span in rendered.answer_spans]
    else:
        ids, answer_spans = _tokenize_by_piece(tokenizer, rendered)
    prefix = list(habits.prefix_ids)
    if prefix and ids[: len(prefix)] != prefix:  # the template did not write it: the tokenizer would
        ids = prefix + ids
        answer_spans = [(start + len(prefix), end + len(prefix)) for start, end in answer_spans]
    closed = []
    for start, end in answer_spans:
        if end >= len(ids) or ids[end] != habits.end_of_turn_id:
            raise ValueError(
                f"the chat template did not close a model turn with {tokenizer.convert_ids_to_tokens(habits.end_of_turn_id)}"
            )
        closed.append((start, end + 1))  # the label span runs through the end-of-turn token
    stop_span = None
    if turns[-1].answer is not None and not add_generation_prompt and habits.end_of_turn_id != habits.eos_id:
        ids, stop_span = _with_stop(ids, closed[-1][1], habits.eos_id)
    return TokenizedConversation(input_ids=ids, answer_spans=closed, stop_span=stop_span)


def _with_stop(ids: list[int], after_answer: int, eos_id: int) -> tuple[list[int], tuple[int, int]]:
    """`ids` ending in the eos generation stops at, and the span from the last answer's end of turn
    through it: the template's closing text (already in `ids`) and the eos (appended unless the
    template wrote one)."""
    tail = ids[after_answer:]
    if eos_id in tail:
        return ids, (after_answer, after_answer + tail.index(eos_id) + 1)
    return ids + [eos_id], (after_answer, len(ids) + 1)


def _overlaps(token: tuple[int, int], span: tuple[int, int]) -> bool:
    return token[0] < span[1] and span[0] < token[1]


def _text_stays_text(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], protected: frozenset[int]
) -> bool:
    """Whether no special/added token of the whole-string encoding overlaps a dataset text."""
    return not any(
        token in protected and any(_overlaps(offset, span) for span in spans) for token, offset in zip(ids, offsets)
    )


def _token_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int]:
    """(first, one past last) token index overlapping the character span (empty text: an empty range)."""
    inside = [index for index, offset in enumerate(offsets) if _overlaps(offset, span)]
    if not inside:
        after = next((index for index, offset in enumerate(offsets) if offset[0] >= span[1]), len(offsets))
        return after, after
    return inside[0], inside[-1] + 1


def _tokenize_by_piece(
    tokenizer: PreTrainedTokenizerBase, rendered: RenderedConversation
) -> tuple[list[int], list[tuple[int, int]]]:
    """Template parts with special tokens recognised, dataset texts with special-token text split."""
    answer_starts = {start for start, _ in rendered.answer_spans}
    ids: list[int] = []
    answer_spans: list[tuple[int, int]] = []
    for index, piece in enumerate(rendered.pieces):
        if index:
            text_start = rendered.text_spans[index - 1][0]
            start = len(ids)
            ids += tokenizer(rendered.texts[index - 1], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if text_start in answer_starts:
                answer_spans.append((start, len(ids)))
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
    return ids, answer_spans


def text_token_count(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], **kwargs: bool) -> int:
    """Text tokens of a conversation (the `<image>` slot counts as one, image tokens excluded)."""
    return len(tokenize_conversation(tokenizer, turns, **kwargs).input_ids)
