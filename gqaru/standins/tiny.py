"""A tiny LLaVA built locally: the offline stand-in for `deepvk/llava-gemma-2b-lora`.

No machine here reaches the hub, yet the demo and the tests must run the real pipeline (processor,
chat template, collator, LoRA, 4-bit, generate) on a real `LlavaForConditionalGeneration`. This
module builds one from nothing:

* a Gemma-style text model (`GemmaConfig`: RMSNorm, RoPE, GeGLU, one KV head like gemma-2b,
  tied embeddings) behind a CLIP vision tower (`CLIPVisionConfig`) and LLaVA's MLP projector;
* a BPE tokenizer trained here on Russian text (the synthetic GQA-ru vocabulary plus general
  Russian/English prose), laid out like Gemma's: spaces become "▁", byte fallback so that any text
  encodes without `<unk>`, the same special tokens (tokenizer.json is the whole truth: for
  model_type "llava" `AutoTokenizer` loads it verbatim, as it does for the real model);
* the Gemma chat template (our own Jinja), and a `LlavaProcessor` whose `<image>` expansion count
  equals the number of features the vision tower produces.

Everything is written with `save_pretrained` (safetensors) and loads with stock
`LlavaForConditionalGeneration` / `AutoProcessor` / `AutoTokenizer`: nothing here is needed to
read it back.

    from gqaru.standins.tiny import build_tiny_model
    build_tiny_model("models/tiny-llava", preset="tiny", seed=0)

Presets (`PRESETS`): "tiny" (64 px, 64 image tokens, trains in minutes on 2 CPU cores),
"real-shape" (the real model's 336 px / patch 14 / 576 image tokens at a narrow width, for
benchmarks) and "gemma-2b-shapes" (CLIP ViT-L/14-336 + Gemma-2b at full size with random weights,
for GPU benchmarks; 2.8 B parameters, so build it where memory allows).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GemmaConfig,
    GemmaTokenizer,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from gqaru.accel import pin_torch_threads
from gqaru.files import atomic_directory

# --------------------------------------------------------------------------------------------------
# Shapes

# bitsandbytes' CPU 4-bit kernels repack a weight only when out_features % 32 == 0 and
# in_features % 64 == 0 (TRAPS.md); every Linear that QLoRA quantizes must satisfy both.
QUANT_OUT_MULTIPLE = 32
QUANT_IN_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class TinyLlavaDims:
    """The shapes of one LLaVA = CLIP vision tower -> MLP projector -> Gemma text model.

    Frozen so a preset cannot be altered by accident; make a variant with `dataclasses.replace`.
    Construction checks the shapes, so a bad variant fails here and not inside bitsandbytes.
    """

    image_size: int
    """Side of the square image the processor produces (resize + center crop), in pixels."""
    patch_size: int
    """CLIP patch side: the tower sees (image_size // patch_size) ** 2 patches plus one CLS token."""
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    vision_intermediate_size: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    """1 = multi-query attention, as gemma-2b."""
    text_head_dim: int
    text_intermediate_size: int
    text_vocab_size: int | None = None
    """None: exactly the tokenizer's size. Larger: rows past the tokenizer are padding (gemma-2b's
    256,000 on top of our small tokenizer); the ids the tokenizer knows keep their meaning."""
    max_position_embeddings: int = 2048
    vision_feature_layer: int = -2
    """Which CLIP hidden state feeds the projector; -2 (the penultimate layer) as in LLaVA, so the
    tower's last layer is computed but unused, exactly as in the real model."""

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_hidden_size % self.vision_heads:
            problems.append(f"vision_hidden_size {self.vision_hidden_size} is not divisible by vision_heads")
        if self.text_heads % self.text_kv_heads:
            problems.append(f"text_heads {self.text_heads} is not a multiple of text_kv_heads {self.text_kv_heads}")
        if not -self.vision_layers <= self.vision_feature_layer <= self.vision_layers:
            problems.append(
                f"vision_feature_layer {self.vision_feature_layer} outside a {self.vision_layers}-layer tower"
            )
        for name, (in_features, out_features) in self.quantized_linear_shapes().items():
            if out_features % QUANT_OUT_MULTIPLE or in_features % QUANT_IN_MULTIPLE:
                problems.append(
                    f"{name} is {in_features}->{out_features}: bitsandbytes CPU 4-bit needs "
                    f"in % {QUANT_IN_MULTIPLE} == 0 and out % {QUANT_OUT_MULTIPLE} == 0"
                )
        if problems:
            raise ValueError("invalid TinyLlavaDims: " + "; ".join(problems))

    @property
    def image_tokens(self) -> int:
        """`<image>` tokens per image: one per patch (strategy "default" drops CLS)."""
        return (self.image_size // self.patch_size) ** 2

    def quantized_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the text model's Linear layers that QLoRA quantizes."""
        hidden, head_dim = self.text_hidden_size, self.text_head_dim
        return {
            "q_proj": (hidden, self.text_heads * head_dim),
            "k_proj": (hidden, self.text_kv_heads * head_dim),
            "v_proj": (hidden, self.text_kv_heads * head_dim),
            "o_proj": (self.text_heads * head_dim, hidden),
            "gate_proj": (hidden, self.text_intermediate_size),
            "up_proj": (hidden, self.text_intermediate_size),
            "down_proj": (self.text_intermediate_size, hidden),
        }


# The text side is shared by "tiny" and "real-shape": 128 wide is enough to learn colours and
# positions of a synthetic scene in a few hundred steps, and 4 heads x 32 with one KV head keeps
# every quantized Linear bitsandbytes-friendly (q 128->128, k/v 128->32, MLP 128->512->128).
_NARROW_TEXT = dict(
    text_hidden_size=128,
    text_layers=2,
    text_heads=4,
    text_kv_heads=1,
    text_head_dim=32,
    text_intermediate_size=512,
)
_NARROW_VISION = dict(vision_hidden_size=64, vision_layers=2, vision_heads=2, vision_intermediate_size=256)

PRESETS: Mapping[str, TinyLlavaDims] = MappingProxyType(
    {
        # 64 px / patch 8 = an 8x8 grid: 64 image tokens. 112 px / patch 14 (also 64 tokens, wider
        # vision) learned no better in 500 steps on the synthetic set, so the cheaper image stays.
        "tiny": TinyLlavaDims(image_size=64, patch_size=8, **_NARROW_VISION, **_NARROW_TEXT),
        # The real model's image path (336 px, patch 14 -> 24x24 = 576 image tokens) at tiny width:
        # sequence lengths, processor and collator costs as in production.
        "real-shape": TinyLlavaDims(image_size=336, patch_size=14, **_NARROW_VISION, **_NARROW_TEXT),
        # CLIP ViT-L/14-336 + Gemma-2b at full size (random weights), for GPU benchmarks.
        "gemma-2b-shapes": TinyLlavaDims(
            image_size=336,
            patch_size=14,
            vision_hidden_size=1024,
            vision_layers=24,
            vision_heads=16,
            vision_intermediate_size=4096,
            text_hidden_size=2048,
            text_layers=18,
            text_heads=8,
            text_kv_heads=1,
            text_head_dim=256,
            text_intermediate_size=16384,
            text_vocab_size=256000,
            max_position_embeddings=8192,
        ),
    }
)

# --------------------------------------------------------------------------------------------------
# Tokenizer

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN, IMAGE = "<start_of_turn>", "<end_of_turn>", "<image>"
# Ids 0-4 as in Gemma; the turn markers and <image> follow, then the 256 byte-fallback tokens,
# then the learned pieces.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, MASK, START_OF_TURN, END_OF_TURN, IMAGE)
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{byte:02X}>" for byte in range(256))
DEFAULT_VOCAB_SIZE = 4096
TOKENIZER_CORPUS_QUESTIONS = 3000

_RUSSIAN_LETTERS = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
_ASCII_PRINTABLE = "".join(chr(code) for code in range(33, 127))
# Characters that get a piece of their own even if the corpus never shows them; anything else
# outside the learned alphabet falls back to its UTF-8 bytes.
_INITIAL_ALPHABET = sorted(set("▁\n\t" + _RUSSIAN_LETTERS + _ASCII_PRINTABLE + "«»—–…№"))

# General text so that input outside the synthetic vocabulary still tokenizes into sensible
# pieces (written for this project). The synthetic questions dominate the corpus by count.
GENERAL_TEXT: tuple[str, ...] = (
    "На столе стоит белая чашка, а рядом с ней лежит раскрытая книга.",
    "Мальчик в красной куртке держит в руках большой зелёный мяч.",
    "Слева от дома растёт высокое дерево, справа припаркована машина.",
    "Небо над городом было серым, но к вечеру выглянуло солнце.",
    "Женщина сидит на деревянной скамейке и читает газету.",
    "Собака бежит по траве за маленькой жёлтой птицей.",
    "На полке стоят стеклянные банки, пластиковые коробки и металлические кружки.",
    "Окно открыто, и в комнату дует прохладный ветер.",
    "Кто стоит перед зданием? Человек в синей рубашке.",
    "Что находится под столом? Там лежит чёрная сумка.",
    "Какого цвета автомобиль? Он серебристый.",
    "Есть ли на картинке люди? Нет, людей не видно.",
    "Какой формы этот предмет — круглый или квадратный?",
    "Сколько стульев стоит у стены? Три стула.",
    "Вопрос: где находится лампа? Ответ: над диваном.",
    "Изображение показывает кухню с плитой, холодильником и раковиной.",
    "Поезд прибыл на вокзал в 12:45, на пятнадцать минут позже расписания.",
    "В 2024 году в библиотеке было 15 000 книг и 320 журналов.",
    "Температура воды — около 18 градусов, воздух теплее: 24 °C.",
    "Он сказал: «Подожди меня у входа», — и ушёл.",
    "Ребёнок рисует на бумаге оранжевое солнце и фиолетовые цветы.",
    "Кошка спит на мягком ковре возле камина.",
    "Вдоль дороги тянется длинный забор из камня.",
    "Тарелка пустая, вилка лежит справа от неё, а нож — слева.",
    "Девочка в розовом платье стоит рядом с велосипедом.",
    "Над рекой летят белые чайки, на берегу сидит рыбак.",
    "В вазе стоят красные розы и белые лилии.",
    "Этот предмет сделан из дерева, металла или пластика?",
    "Мужчина носит очки, шляпу и коричневое пальто.",
    "На экране телевизора видна карта погоды.",
    "Ответь одним словом.",
    "Ответь коротко, одним или двумя словами.",
    "Да. Нет. Возможно. Слева. Справа. Сверху. Снизу. Посередине.",
    "Предложение, в котором есть запятые, точки; двоеточия: и вопросительные знаки?",
    "Привет! Как дела? Всё хорошо, спасибо.",
    "Москва, Санкт-Петербург, Новосибирск, Екатеринбург, Казань.",
    "понедельник вторник среда четверг пятница суббота воскресенье",
    "один два три четыре пять шесть семь восемь девять десять",
    "The cup is on the table, next to an open book.",
    "A boy in a red jacket is holding a large green ball.",
    "What colour is the car? It is silver.",
    "Is there a person in the picture? No, there is nobody.",
    "The cat is sleeping on a soft rug near the fireplace.",
    "Answer with a single word.",
    "Question: where is the lamp? Answer: above the sofa.",
    "left right top bottom middle front behind above below inside outside",
    "red green blue yellow black white orange purple pink brown gray",
    "Numbers like 3, 42, 256 and 1024 appear in text; so do dates like 2024-05-17.",
    "Mixed text: модель LLaVA видит image и отвечает на question по-русски.",
    "Punctuation (brackets), [square], {curly}, \"quotes\", 'apostrophes' & symbols: #, %, +, =, /, @.",
    # Frequent everyday words, so that common text outside the synthetic vocabulary gets word-sized
    # pieces rather than letters.
    "и в не на я что он с как а то все она так его но да ты к у же вы за бы по только её мне было "
    "вот от меня ещё нет о из ему теперь когда даже ну вдруг ли если уже или ни быть был него до вас "
    "нибудь опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя их "
    "чем была сам чтоб без будто чего раз тоже себе под будет ж тогда кто этот того потому этого какой "
    "совсем ним здесь этом один почти мой тем чтобы нее сейчас были куда зачем всех никогда можно при "
    "наконец два об другой хоть после над больше тот через эти нас про всего них какая много разве три "
    "эту моя впрочем хорошо свою этой перед иногда лучше чуть том нельзя такой им более всегда конечно всю между",
    "человек время год день рука дело глаз жизнь раз слово место лицо друг голова дом сторона страна мир "
    "случай вопрос ответ работа ребёнок сила конец вид система часть город отношение женщина деньги земля "
    "машина вода отец проблема час право нога решение дверь образ история власть закон война бог голос "
    "тысяча книга возможность результат ночь стол имя область статья число компания народ жена группа "
    "развитие процесс суд условие средство начало свет пора путь душа уровень форма связь минута улица вечер "
    "качество мысль дорога мать действие месяц государство язык любовь взгляд мама век школа цель общество "
    "окно комната картинка фотография изображение предмет цвет размер фигура круг квадрат треугольник звезда",
    "сказать говорить мочь знать стать видеть хотеть идти стоять думать смотреть иметь сидеть лежать "
    "понять ответить спросить сделать делать взять дать жить казаться выйти пойти работать любить "
    "показать находиться оказаться понимать считать помнить бежать писать читать держать слышать",
    "большой новый хороший первый последний долгий высокий главный маленький старый русский белый "
    "красный синий зелёный жёлтый чёрный серый оранжевый фиолетовый розовый коричневый голубой "
    "левый правый верхний нижний круглый квадратный деревянный металлический стеклянный пластиковый",
    "the be to of and a in that have it for not on with he as you do at this but his by from they we "
    "say her she or an will my one all would there their what so up out if about who get which go me "
    "when make can like time no just him know take people into year your good some could them see "
    "other than then now look only come its over think also back after use two how our work first well "
    "way even new want because any these give day most us is are was were been has had picture image "
    "question answer colour color shape size left right above below table chair person car tree house",
)


def default_tokenizer_corpus() -> list[str]:
    """The text the tokenizer is trained on: the synthetic GQA-ru vocabulary plus `GENERAL_TEXT`.

    Fixed (seed 0) whatever the model's seed: models built with different seeds share one
    vocabulary, so their outputs and checkpoints stay comparable.
    """
    from gqaru.standins.synth import training_corpus

    return list(training_corpus(seed=0, questions=TOKENIZER_CORPUS_QUESTIONS)) + list(GENERAL_TEXT)


def _training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Word boundaries used only while learning merges.

    The saved tokenizer is a stock `GemmaTokenizer`, which runs BPE over the whole string. The two
    agree because every boundary below depends only on the two characters either side of it
    (before a "▁", around "\\n", digits and punctuation): a merge learned inside a piece can never
    straddle such a boundary later, so whole-string BPE splits text exactly as piece-wise BPE.
    Digits stay single (as in Gemma) and punctuation never glues onto words.
    """
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )


def train_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> GemmaTokenizer:
    """Learn BPE merges on `corpus` and wrap them as a Gemma-layout `GemmaTokenizer`.

    Layout: `SPECIAL_TOKENS` at ids 0..7, the 256 `<0xNN>` byte tokens next (byte fallback: a
    character outside the learned alphabet becomes its UTF-8 bytes, never `<unk>`), then the
    learned pieces. `vocab_size` is an upper bound; a small corpus may run out of merges first.
    The result is deterministic for a given corpus.
    """
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= reserved + len(_INITIAL_ALPHABET):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges (reserved + alphabet = "
                         f"{reserved + len(_INITIAL_ALPHABET)})")
    learner = Tokenizer(models.BPE(unk_token=UNK))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = _training_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - reserved,
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=_INITIAL_ALPHABET,
        limit_alphabet=len(_INITIAL_ALPHABET) + 64,
        show_progress=False,
    )
    learner.train_from_iterator(list(corpus), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *BYTE_TOKENS):
        vocab[token] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in learned["merges"]]

    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        extra_special_tokens=[START_OF_TURN, END_OF_TURN, IMAGE],
        image_token=IMAGE,  # LlavaProcessor reads tokenizer.image_token
        add_bos_token=True,
        add_eos_token=False,
        # Explicit, so the tokenizer in memory and the one AutoTokenizer loads (for model_type
        # llava a plain TokenizersBackend, whose default is right) agree; collators choose per batch.
        padding_side="right",
        chat_template=GEMMA_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------------
# Chat template

# Gemma's turn format: "<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n{text}
# <end_of_turn>\n". "assistant" is rendered "model"; content is trimmed as Gemma does; a system
# message is rejected (gemma-2b has no system role: put instructions in the first user turn).
# Content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts; an
# image part renders as "<image>", which the processor expands to one token per image feature.
GEMMA_CHAT_TEMPLATE = """\
{#- Gemma turns; every line is a tag whose "-" markers strip the layout whitespace. -#}
{%- if messages and messages[0]['role'] == 'system' -%}
    {{- raise_exception('The Gemma chat template has no system role: '
                        ~ 'put the instructions in the first user message.') -}}
{%- endif -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {%- set role = 'user' -%}
    {%- elif message['role'] in ['assistant', 'model'] -%}
        {%- set role = 'model' -%}
    {%- else -%}
        {{- raise_exception('Unknown chat role ' ~ message['role'] ~ ': expected user or assistant.') -}}
    {%- endif -%}
    {%- if (role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Chat roles must alternate user/assistant/user/..., starting with user.') -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {%- set text = message['content'] -%}
    {%- else -%}
        {%- set parts = namespace(text='') -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {%- set parts.text = parts.text + '<image>' -%}
            {%- elif part['type'] == 'text' -%}
                {%- set parts.text = parts.text + part['text'] -%}
            {%- else -%}
                {{- raise_exception('Unsupported content part type ' ~ part['type'] ~ '.') -}}
            {%- endif -%}
        {%- endfor -%}
        {%- set text = parts.text -%}
    {%- endif -%}
    {{- '<start_of_turn>' + role + '\\n' + text | trim + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------------
# Processor and model


def build_processor(tokenizer: GemmaTokenizer, dims: TinyLlavaDims) -> LlavaProcessor:
    """A `LlavaProcessor` whose `<image>` expansion equals the tower's feature count.

    patch_size, the "default" strategy (drop CLS) and one additional token (CLS) are set
    explicitly: N = (H // patch) * (W // patch) + 1 - 1 = `dims.image_tokens`.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": dims.image_size},
        crop_size={"height": dims.image_size, "width": dims.image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=dims.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE,
        chat_template=GEMMA_CHAT_TEMPLATE,
    )


def llava_config(dims: TinyLlavaDims, tokenizer: GemmaTokenizer) -> LlavaConfig:
    """The `LlavaConfig` for `dims`, with special-token ids taken from `tokenizer`."""
    tokenizer_size = len(tokenizer)
    vocab_size = tokenizer_size if dims.text_vocab_size is None else dims.text_vocab_size
    if vocab_size < tokenizer_size:
        raise ValueError(f"text_vocab_size {vocab_size} is smaller than the tokenizer ({tokenizer_size} tokens)")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vision_config = CLIPVisionConfig(
        hidden_size=dims.vision_hidden_size,
        intermediate_size=dims.vision_intermediate_size,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=dims.image_size,
        patch_size=dims.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
    )
    text_config = GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=dims.text_hidden_size,
        intermediate_size=dims.text_intermediate_size,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads,
        head_dim=dims.text_head_dim,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=dims.max_position_embeddings,
        # Std 1/sqrt(hidden) (Gemma's 0.02 is about that for its 2048 width). Gemma ties the head to
        # the embeddings, so this std also bounds the logits (|h| ~ sqrt(hidden) after the final
        # norm): with 0.02 at width 128 no logit can exceed ~2.6, a 2,000-token softmax cannot get
        # confident, and LoRA on a random base stalls at loss ~6 (measured).
        initializer_range=dims.text_hidden_size**-0.5,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        tie_word_embeddings=True,
        # On for generation, as in gemma-2b; training turns it off when it checkpoints activations.
        use_cache=True,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids[IMAGE],
        image_seq_length=dims.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=dims.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def generation_config(tokenizer: GemmaTokenizer) -> GenerationConfig:
    """Stop on `<end_of_turn>` or `<eos>` (as Gemma-it does); pad with `<pad>`."""
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=[tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )


def build_model(
    dims: TinyLlavaDims, tokenizer: GemmaTokenizer, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA for `dims`; the same seed gives the same weights.

    Initialises on the CPU inside a forked RNG, so the caller's random state is left untouched.
    """
    config = llava_config(dims, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = generation_config(tokenizer)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# The command

BUILD_INFO_FILE = "tiny_model.json"


def build_tiny_model(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    corpus: Sequence[str] | None = None,
    pretrain_steps: int = 0,
    pretrain_target: float | None = None,
    pretrain_max_steps: int | None = None,
    threads: int | None = None,
) -> Path:
    """Build model, tokenizer and processor for `preset` and `save_pretrained` them into `out_dir`.

    `pretrain_steps` > 0 trains the random model on grounding and reading first (`gqaru.standins.pretrain`), so
    that LoRA has a base to adapt, as it has in the real run; the held-out report of that run is
    kept in `tiny_model.json`. 0 (the tests' default) keeps the random weights. `pretrain_target` and
    `pretrain_max_steps`: the held-out grounding level to reach and the step ceiling
    (`gqaru.standins.pretrain.pretrain`'s `target_word_accuracy` and `max_steps`). `threads` pins
    torch's intra-op threads for the build (None: torch's default): the weights depend on it, since
    CPU kernels split their sums by thread count, and the count used is recorded.

    The directory is written whole under a temporary name and renamed into place, so a crash never
    leaves half a model; an existing `out_dir` is replaced only if it is empty or an earlier build
    (it holds `tiny_model.json`), never a directory of something else. `corpus` overrides the
    tokenizer's training text (default: `default_tokenizer_corpus()`).

    Raises:
        ValueError: unknown preset, or `out_dir` exists and is not an earlier build.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose one of {sorted(PRESETS)}")
    dims = PRESETS[preset]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / BUILD_INFO_FILE).is_file():
        raise ValueError(
            f"{out_dir} exists and is not a tiny-model build (no {BUILD_INFO_FILE}); refusing to replace it"
        )

    pin_torch_threads(threads)
    started = time.perf_counter()
    texts = default_tokenizer_corpus() if corpus is None else list(corpus)
    tokenizer = train_tokenizer(texts)
    processor = build_processor(tokenizer, dims)
    model = build_model(dims, tokenizer, seed=seed, dtype=dtype)
    pretraining = None
    if pretrain_steps:
        from gqaru.standins.pretrain import pretrain

        pretraining = pretrain(
            model, processor, pretrain_steps, seed=seed, target_word_accuracy=pretrain_target, max_steps=pretrain_max_steps
        )

    with atomic_directory(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)  # tokenizer, image processor, chat_template.jinja
        # Also embed the chat template in tokenizer_config.json, where older readers look for it.
        tokenizer.save_pretrained(staging, save_jinja_files=False)
        info = {
            "preset": preset,
            "seed": seed,
            "dims": dataclasses.asdict(dims),
            "image_tokens": dims.image_tokens,
            "tokenizer_size": len(tokenizer),
            "tokenizer_corpus_lines": len(texts),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "pretraining": pretraining,
            "torch_threads": {"count": torch.get_num_threads(), "pinned": threads is not None},
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
