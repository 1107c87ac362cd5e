"""A synthetic dataset in the exact format of GQA-ru (`deepvk/GQA-ru`): the project's offline default.

No machine here reaches the Hugging Face hub, yet the whole pipeline (shards → training → evaluation)
must run and be tested on real files. `write_synthetic_gqa` writes a directory laid out like the hub
repo — a README.md whose YAML `configs:` section maps each config to its parquet files, and one
folder of parquet files per config — so `datasets.load_dataset(DIR, CONFIG, split=SPLIT)` reads it
with the same call that reads the hub id.

Content: simple scenes of 2–5 flat shapes (distinct shapes and distinct colours within a scene, two
sizes, placed on a coarse grid) drawn with PIL at GQA-like sizes and saved as JPEG. Each image gets
several Russian questions of all five GQA structural types (verify, query, choose, logical,
compare) and the semantic types obj, attr, cat, rel, global. Questions are built so that the text
alone does not give the answer away:

- yes/no questions are balanced per template (the generator asks for whichever answer that
  template has produced less often so far, and builds a question with that answer);
- open answers follow the scene's random attributes (colours, sizes, sides are uniform);
- in choose/compare questions the correct option is first or second at random.

Short answers are inflected as Russian requires («Какого размера звезда?» → «маленькая»,
«Каким цветом нарисован круг?» → «красным»). Objects are large and colours far apart so that a
tiny model that sees the image at ~64 px can learn colour, size, position and yes/no questions well
above chance; shape identity is the hardest attribute and is asked less often.

Everything is a pure function of the seed: the same seed gives the same bytes (README included).
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "INSTRUCTION",
    "SPLITS",
    "instruction_features",
    "image_features",
    "training_corpus",
    "generate_split",
    "draw_scene",
    "random_scenes",
    "scene_questions",
    "resolve_templates",
    "resolve_questions_per_image",
    "TEMPLATE_SETS",
    "QUESTIONS_PER_IMAGE_SHAPES",
    "place_words",
    "SyntheticImage",
    "write_synthetic_gqa",
]

#: The instruction appended to every question (deepvk's and lmms-eval's `gqa_ru` prompt).
INSTRUCTION = "Ответь одним словом."

#: The splits written and their config names, as in the hub repo.
SPLITS = ("train", "testdev")

# Questions per image (a uniform draw in the range): GQA's balanced train has ≈13 per image and
# GQA-ru's testdev ≈31 (12,216 over 398); image-grouped training and shard sizes depend on it.
# (GQA-ru's train is a 40k-question sample, ≈1.5 per image: the synthetic train follows GQA by
# default; `questions_per_image`, `gqaru synth --questions-per-image gqa-ru-train`, draws GQA-ru's.)
QUESTIONS_PER_IMAGE = {"train": (9, 17), "testdev": (26, 36)}

#: Named distributions of questions per image, {count: weight}, for `questions_per_image`.
#: "gqa-ru-train": GQA-ru's own train split, ~40,000 questions over 27,519 images (mean ≈1.45).
#: Only the mean is known here; the shape is the zero-truncated Poisson with that mean (λ = 0.8),
#: what a small random sample of GQA's questions gives (each image keeps each of its questions
#: with the same small chance, and images that keep none are left out): 91% of images hold one
#: or two questions. Weights in percent, rounded; their mean is 1.451.
QUESTIONS_PER_IMAGE_SHAPES: dict[str, dict[int, float]] = {
    "gqa-ru-train": {1: 65.3, 2: 26.1, 3: 7.0, 4: 1.4, 5: 0.2},
}

#: Images per parquet file of the `*_images` configs: large splits span several files, as on the hub.
IMAGES_PER_PARQUET_FILE = 200

# GQA image sizes (Visual Genome photos): landscape, portrait and square.
IMAGE_SIZES = ((500, 375), (640, 480), (500, 333), (640, 427), (375, 500), (480, 640), (500, 500))

README_MARKER = "<!-- written by gqaru synth -->"


# --------------------------------------------------------------------------------------------
# Vocabulary: every word form the generator can produce, written out by hand (no morphology
# library at generation time, so the output never depends on a dictionary version).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    """A shape name with the case forms the templates use."""

    key: str  # English name, used in the GQA-style semantic programs
    gender: str  # "m", "f" or "n"
    nom: str
    gen: str
    ins: str


@dataclass(frozen=True, eq=False)
class Adjective:
    """An adjective with the forms the templates use (each one a singleton: compared by identity).

    `nom`/`gen` are keyed by gender; `ins` is the masculine instrumental («красным цветом»).
    """

    key: str
    nom: dict[str, str]
    gen: dict[str, str]
    ins: str


def _adjective(key: str, nom_m: str, nom_f: str, nom_n: str, gen_mn: str, gen_f: str, ins: str) -> Adjective:
    return Adjective(key, {"m": nom_m, "f": nom_f, "n": nom_n}, {"m": gen_mn, "f": gen_f, "n": gen_mn}, ins)


SHAPES: tuple[Noun, ...] = (
    Noun("circle", "m", "круг", "круга", "кругом"),
    Noun("square", "m", "квадрат", "квадрата", "квадратом"),
    Noun("triangle", "m", "треугольник", "треугольника", "треугольником"),
    Noun("star", "f", "звезда", "звезды", "звездой"),
    Noun("arrow", "f", "стрелка", "стрелки", "стрелкой"),
    Noun("heart", "n", "сердце", "сердца", "сердцем"),
)

# Object colours: saturated and far apart in RGB so they survive a 64 px resize and JPEG.
COLORS: tuple[tuple[Adjective, tuple[int, int, int]], ...] = (
    (_adjective("red", "красный", "красная", "красное", "красного", "красной", "красным"), (215, 25, 30)),
    (_adjective("blue", "синий", "синяя", "синее", "синего", "синей", "синим"), (25, 55, 215)),
    (_adjective("green", "зеленый", "зеленая", "зеленое", "зеленого", "зеленой", "зеленым"), (20, 160, 45)),
    (_adjective("yellow", "желтый", "желтая", "желтое", "желтого", "желтой", "желтым"), (245, 205, 20)),
    (
        _adjective("purple", "фиолетовый", "фиолетовая", "фиолетовое", "фиолетового", "фиолетовой", "фиолетовым"),
        (135, 35, 175),
    ),
    (_adjective("black", "черный", "черная", "черное", "черного", "черной", "черным"), (20, 20, 20)),
)

# Background colours: pale, so every object colour stands out against every background.
BACKGROUNDS: tuple[tuple[Adjective, tuple[int, int, int]], ...] = (
    (_adjective("white", "белый", "белая", "белое", "белого", "белой", "белым"), (250, 250, 250)),
    (_adjective("gray", "серый", "серая", "серое", "серого", "серой", "серым"), (165, 165, 165)),
    (_adjective("light blue", "голубой", "голубая", "голубое", "голубого", "голубой", "голубым"), (170, 215, 245)),
    (_adjective("pink", "розовый", "розовая", "розовое", "розового", "розовой", "розовым"), (250, 195, 215)),
)

SIZES: tuple[Adjective, ...] = (
    _adjective("large", "большой", "большая", "большое", "большого", "большой", "большим"),
    _adjective("small", "маленький", "маленькая", "маленькое", "маленького", "маленькой", "маленьким"),
)

# «две фигуры», «пять фигур»: the numeral and the noun form it governs.
COUNT_WORDS = {2: ("две", "фигуры"), 3: ("три", "фигуры"), 4: ("четыре", "фигуры"), 5: ("пять", "фигур")}

PARTICIPLE_DRAWN = {"m": "нарисован", "f": "нарисована", "n": "нарисовано"}

FIGURE = Noun("object", "f", "фигура", "фигуры", "фигурой")  # «Какого цвета фигура …?»


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    object_id: str
    shape: Noun
    color: Adjective
    rgb: tuple[int, int, int]
    size: Adjective
    column: int
    row: int
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    columns: int
    rows: int
    background: Adjective
    background_rgb: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def by_shape(self, shape: Noun) -> SceneObject | None:
        return next((obj for obj in self.objects if obj.shape == shape), None)

    def by_color(self, color: Adjective) -> SceneObject | None:
        return next((obj for obj in self.objects if obj.color == color), None)


def _random_scene(rng: random.Random, first_object_number: int, min_objects: int) -> Scene:
    """A scene of 2–5 objects on a coarse grid; shapes and colours are distinct within the scene.

    Distinct shapes and colours make every reference («круг», «красная фигура») unambiguous.
    The grid keeps objects apart, so «слева от», «над» and «больше» have one clear truth.
    The grid covers the central square of the image only: LLaVA's CLIP processor resizes the short
    side and center-crops a square, so anything outside it never reaches the model, and a question
    about it would be unanswerable from what the model sees.
    """
    width, height = rng.choice(IMAGE_SIZES)
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    columns, rows = (3, 2) if width >= height else (2, 3)
    count = rng.randint(min_objects, 5)
    cells = rng.sample([(c, r) for c in range(columns) for r in range(rows)], count)
    shapes = rng.sample(SHAPES, count)
    colors = rng.sample(COLORS, count)
    background, background_rgb = rng.choice(BACKGROUNDS)
    cell_w, cell_h = side / columns, side / rows
    cell_min = min(cell_w, cell_h)
    objects = []
    for index, ((column, row), shape, (color, rgb)) in enumerate(zip(cells, shapes, colors)):
        size = rng.choice(SIZES)
        radius = cell_min * (0.46 if size.key == "large" else 0.28)
        slack_x, slack_y = max(0.0, cell_w / 2 - radius), max(0.0, cell_h / 2 - radius)
        center = (
            left + (column + 0.5) * cell_w + rng.uniform(-0.3, 0.3) * slack_x,
            top + (row + 0.5) * cell_h + rng.uniform(-0.3, 0.3) * slack_y,
        )
        objects.append(
            SceneObject(str(first_object_number + index), shape, color, rgb, size, column, row, center, radius)
        )
    return Scene(width, height, columns, rows, background, background_rgb, tuple(objects))


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


@dataclass
class Question:
    """One generated question before ids are assigned."""

    question: str
    answer: str
    full_answer: str
    structural: str
    semantic_type: str
    detailed: str
    global_group: str | None
    local_group: str
    program: list[tuple[str, str, list[int]]]
    mentions: list[tuple[str, str]]  # (surface word, object id) for the annotations
    topic: tuple[str, str]  # (subject, property): questions sharing it entail each other


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _ref(obj: SceneObject) -> str:
    return f"{obj.shape.key} ({obj.object_id})"


def _side(scene: Scene, obj: SceneObject) -> str | None:
    if obj.column == 0:
        return "слева"
    if obj.column == scene.columns - 1:
        return "справа"
    return None


def _vertical(scene: Scene, obj: SceneObject) -> str | None:
    if obj.row == 0:
        return "вверху"
    if obj.row == scene.rows - 1:
        return "внизу"
    return None


# A relation «A <rel> B»: (words before B, the case of B, the opposite relation, English name).
RELATIONS = {
    "слева от": ("gen", "справа от", "to the left of"),
    "справа от": ("gen", "слева от", "to the right of"),
    "над": ("ins", "под", "above"),
    "под": ("ins", "над", "below"),
}


def _relation(a: SceneObject, b: SceneObject) -> str:
    """The one relation that holds between a and b: horizontal when columns differ, else vertical."""
    if a.column != b.column:
        return "слева от" if a.column < b.column else "справа от"
    return "над" if a.row < b.row else "под"


def _holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    if relation == "слева от":
        return a.column < b.column
    if relation == "справа от":
        return a.column > b.column
    if relation == "над":
        return a.column == b.column and a.row < b.row
    return a.column == b.column and a.row > b.row


def _case(noun: Noun, case: str) -> str:
    return getattr(noun, case)


def _ordered(rng: random.Random, correct: str, wrong: str) -> tuple[str, str]:
    """The two options of a choose question, the correct one first or second at random."""
    return (correct, wrong) if rng.random() < 0.5 else (wrong, correct)


YesNo = bool | None  # the answer a yes/no template must produce; None for open templates

Template = Callable[[Scene, random.Random, YesNo], "Question | None"]


def _yes_no(target: YesNo) -> str:
    return "да" if target else "нет"


# ---- query ---------------------------------------------------------------------------------


def _query_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    shape, color = obj.shape, obj.color.nom[obj.shape.gender]
    return Question(
        f"Какого цвета {shape.nom}?", color, f"{_cap(shape.nom)} {color}.",
        "query", "attr", "directOf", "color", f"directOf-{shape.key}_color",
        [("select", _ref(obj), []), ("query", "color", [0])],
        [(shape.nom, obj.object_id)], (obj.object_id, "color"),
    )


def _query_color_drawn(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    shape, drawn = obj.shape, PARTICIPLE_DRAWN[obj.shape.gender]
    return Question(
        f"Каким цветом {drawn} {shape.nom}?", obj.color.ins, f"{_cap(shape.nom)} {drawn} {obj.color.ins} цветом.",
        "query", "attr", "directOf", "color", f"directOf-{shape.key}_color",
        [("select", _ref(obj), []), ("query", "color", [0])],
        [(shape.nom, obj.object_id)], (obj.object_id, "color"),
    )


def _query_size(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    shape, size = obj.shape, obj.size.nom[obj.shape.gender]
    return Question(
        f"Какого размера {shape.nom}?", size, f"{_cap(shape.nom)} {size}.",
        "query", "attr", "directOf", "size", f"directOf-{shape.key}_size",
        [("select", _ref(obj), []), ("query", "size", [0])],
        [(shape.nom, obj.object_id)], (obj.object_id, "size"),
    )


def _query_side(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _side(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    side = _side(scene, obj)
    assert side is not None
    return Question(
        f"На какой стороне картинки находится {obj.shape.nom}?", side,
        f"{_cap(obj.shape.nom)} находится {side}.",
        "query", "attr", "positionQuery", "hposition", f"positionQuery-{obj.shape.key}",
        [("select", _ref(obj), []), ("query", "hposition", [0])],
        [(obj.shape.nom, obj.object_id)], (obj.object_id, "hposition"),
    )


def _query_category(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    color_gen = obj.color.gen["m"]  # «… цвета»: the adjective agrees with «цвет», not with «фигура»
    return Question(
        f"Какая фигура {color_gen} цвета?", obj.shape.nom, f"{_cap(obj.shape.nom)} {color_gen} цвета.",
        "query", "cat", "categoryThat", "shape", f"categoryThat-{obj.color.key}",
        [("select", "object (-)", []), ("filter color", obj.color.key, [0]), ("query", "name", [1])],
        [("фигура", obj.object_id), (obj.shape.nom, obj.object_id)], (obj.object_id, "shape"),
    )


def _unique_related(scene: Scene, rng: random.Random) -> tuple[SceneObject, str, SceneObject] | None:
    """(subject, relation, anchor) where the subject is the only object in that relation to the anchor."""
    options = []
    for anchor in scene.objects:
        for relation in RELATIONS:
            related = [obj for obj in scene.objects if obj is not anchor and _holds(relation, obj, anchor)]
            if len(related) == 1:
                options.append((related[0], relation, anchor))
    return rng.choice(options) if options else None


def _query_related_shape(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    found = _unique_related(scene, rng)
    if found is None:
        return None
    subject, relation, anchor = found
    case, _, relation_en = RELATIONS[relation]
    anchor_word = _case(anchor.shape, case)
    return Question(
        f"Какая фигура находится {relation} {anchor_word}?", subject.shape.nom,
        f"{_cap(relation)} {anchor_word} находится {subject.shape.nom}.",
        "query", "rel", "relS", "shape", f"relS-{anchor.shape.key}_{relation_en}",
        [("select", _ref(anchor), []), ("relate", f"object,{relation_en},s ({subject.object_id})", [0]),
         ("query", "name", [1])],
        [(anchor_word, anchor.object_id), ("фигура", subject.object_id), (subject.shape.nom, subject.object_id)],
        (subject.object_id, "shape"),
    )


def _query_related_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    found = _unique_related(scene, rng)
    if found is None:
        return None
    subject, relation, anchor = found
    case, _, relation_en = RELATIONS[relation]
    anchor_word = _case(anchor.shape, case)
    color = subject.color.nom["f"]
    return Question(
        f"Какого цвета фигура {relation} {anchor_word}?", color,
        f"Фигура {relation} {anchor_word} {color}.",
        "query", "rel", "relO", "color", f"relO-{anchor.shape.key}_{relation_en}_color",
        [("select", _ref(anchor), []), ("relate", f"object,{relation_en},s ({subject.object_id})", [0]),
         ("query", "color", [1])],
        [(anchor_word, anchor.object_id), ("фигура", subject.object_id)], (subject.object_id, "color"),
    )


def _query_background(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    color = scene.background.nom["m"]
    return Question(
        "Какого цвета фон?", color, f"Фон {color}.",
        "query", "global", "backgroundColor", "background color", "backgroundColor",
        [("select", "scene", []), ("query", "background color", [0])], [], ("scene", "background"),
    )


def _query_count(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    numeral, noun = COUNT_WORDS[len(scene.objects)]
    return Question(
        "Сколько фигур на картинке?", numeral, f"На картинке {numeral} {noun}.",
        "query", "global", "count", "count", "count",
        [("select", "scene", []), ("count", "object", [0])], [], ("scene", "count"),
    )


# ---- verify --------------------------------------------------------------------------------


def _verify_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    asked = obj.color if target else rng.choice([c for c, _ in COLORS if c != obj.color])
    gender = obj.shape.gender
    actual = obj.color.nom[gender]
    full = f"Да, {obj.shape.nom} {actual}." if target else f"Нет, {obj.shape.nom} {actual}."
    return Question(
        f"{_cap(obj.shape.nom)} {asked.nom[gender]}?", _yes_no(target), full,
        "verify", "attr", "verifyAttr", None, f"verifyAttr-{obj.shape.key}_color",
        [("select", _ref(obj), []), ("verify color", asked.key, [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "color"),
    )


def _verify_size(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    asked = obj.size if target else next(s for s in SIZES if s != obj.size)
    gender = obj.shape.gender
    actual = obj.size.nom[gender]
    full = f"Да, {obj.shape.nom} {actual}." if target else f"Нет, {obj.shape.nom} {actual}."
    return Question(
        f"{_cap(obj.shape.nom)} {asked.nom[gender]}?", _yes_no(target), full,
        "verify", "attr", "verifyAttr", None, f"verifyAttr-{obj.shape.key}_size",
        [("select", _ref(obj), []), ("verify size", asked.key, [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "size"),
    )


def _verify_exist(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    present = [obj.shape for obj in scene.objects]
    pool = present if target else [shape for shape in SHAPES if shape not in present]
    if not pool:
        return None
    shape = rng.choice(pool)
    obj = scene.by_shape(shape)
    full = f"Да, на картинке есть {shape.nom}." if target else f"Нет, на картинке нет {shape.gen}."
    return Question(
        f"Есть ли на картинке {shape.nom}?", _yes_no(target), full,
        "verify", "obj", "exist", None, f"exist-{shape.key}",
        [("select", f"{shape.key} ({obj.object_id if obj else '-'})", []), ("exist", "?", [0])],
        [(shape.nom, obj.object_id)] if obj else [], (shape.key, "exist"),
    )


def _verify_exist_colored(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    if target:
        obj = rng.choice(scene.objects)
        shape, color = obj.shape, obj.color
    else:
        # A near miss: the shape is there in another colour, or the colour is on another shape.
        present = {(obj.shape, obj.color) for obj in scene.objects}
        anchor = rng.choice(scene.objects)
        if rng.random() < 0.5:
            shape, color = anchor.shape, rng.choice([c for c, _ in COLORS if c != anchor.color])
        else:
            shape, color = rng.choice([s for s in SHAPES if s != anchor.shape]), anchor.color
        if (shape, color) in present:
            return None
        obj = None
    phrase_nom = f"{color.nom[shape.gender]} {shape.nom}"
    phrase_gen = f"{color.gen[shape.gender]} {shape.gen}"
    full = f"Да, на картинке есть {phrase_nom}." if target else f"Нет, на картинке нет {phrase_gen}."
    return Question(
        f"Есть ли на картинке {phrase_nom}?", _yes_no(target), full,
        "verify", "obj", "existAttr", None, f"existAttr-{color.key}_{shape.key}",
        [("select", f"{shape.key} ({obj.object_id if obj else '-'})", []), ("filter color", color.key, [0]),
         ("exist", "?", [1])],
        [(shape.nom, obj.object_id)] if obj else [], (f"{color.key} {shape.key}", "exist"),
    )


def _verify_side(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _side(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    actual = _side(scene, obj)
    asked = actual if target else ("справа" if actual == "слева" else "слева")
    full = f"Да, {obj.shape.nom} находится {actual}." if target else f"Нет, {obj.shape.nom} находится {actual}."
    return Question(
        f"{_cap(obj.shape.nom)} находится {asked}?", _yes_no(target), full,
        "verify", "attr", "positionVerify", None, f"positionVerify-{obj.shape.key}",
        [("select", _ref(obj), []), ("verify hposition", "left" if asked == "слева" else "right", [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "hposition"),
    )


def _verify_vertical(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _vertical(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    actual = _vertical(scene, obj)
    asked = actual if target else ("внизу" if actual == "вверху" else "вверху")
    full = f"Да, {obj.shape.nom} находится {actual}." if target else f"Нет, {obj.shape.nom} находится {actual}."
    return Question(
        f"{_cap(obj.shape.nom)} находится {asked}?", _yes_no(target), full,
        "verify", "attr", "positionVerify", None, f"positionVerify-{obj.shape.key}_vertical",
        [("select", _ref(obj), []), ("verify vposition", "top" if asked == "вверху" else "bottom", [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "vposition"),
    )


def _verify_relation(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    subject, anchor = rng.sample(scene.objects, 2)
    actual = _relation(subject, anchor)
    asked = actual if target else RELATIONS[actual][1]
    case, _, relation_en = RELATIONS[asked]
    actual_case = RELATIONS[actual][0]
    answer_text = f"{subject.shape.nom} находится {actual} {_case(anchor.shape, actual_case)}"
    full = f"Да, {answer_text}." if target else f"Нет, {answer_text}."
    anchor_word = _case(anchor.shape, case)
    return Question(
        f"{_cap(subject.shape.nom)} находится {asked} {anchor_word}?", _yes_no(target), full,
        "verify", "rel", "relVerify", None, f"relVerify-{subject.shape.key}_{anchor.shape.key}",
        [("select", _ref(anchor), []),
         ("verify rel", f"{subject.shape.key},{relation_en},s ({subject.object_id})", [0])],
        [(_cap(subject.shape.nom), subject.object_id), (anchor_word, anchor.object_id)],
        (f"{subject.object_id}/{anchor.object_id}", "relation"),
    )


def _verify_background(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    asked = scene.background if target else rng.choice([b for b, _ in BACKGROUNDS if b != scene.background])
    actual = scene.background.nom["m"]
    return Question(
        f"Фон {asked.nom['m']}?", _yes_no(target), f"Да, фон {actual}." if target else f"Нет, фон {actual}.",
        "verify", "global", "backgroundVerify", None, "backgroundVerify",
        [("select", "scene", []), ("verify background color", asked.key, [0])], [], ("scene", "background"),
    )


# ---- choose --------------------------------------------------------------------------------


def _choose_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    gender = obj.shape.gender
    wrong = rng.choice([c for c, _ in COLORS if c != obj.color])
    first, second = _ordered(rng, obj.color.nom[gender], wrong.nom[gender])
    answer = obj.color.nom[gender]
    return Question(
        f"{_cap(obj.shape.nom)} {first} или {second}?", answer, f"{_cap(obj.shape.nom)} {answer}.",
        "choose", "attr", "chooseAttr", "color", f"chooseAttr-{obj.shape.key}_color",
        [("select", _ref(obj), []), ("choose color", f"{obj.color.key}|{wrong.key}", [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "color"),
    )


def _choose_size(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    gender = obj.shape.gender
    first, second = (SIZES[0].nom[gender], SIZES[1].nom[gender])
    if rng.random() < 0.5:
        first, second = second, first
    answer = obj.size.nom[gender]
    return Question(
        f"{_cap(obj.shape.nom)} {first} или {second}?", answer, f"{_cap(obj.shape.nom)} {answer}.",
        "choose", "attr", "chooseAttr", "size", f"chooseAttr-{obj.shape.key}_size",
        [("select", _ref(obj), []), ("choose size", "large|small", [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "size"),
    )


def _choose_side(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _side(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    answer = _side(scene, obj)
    first, second = ("слева", "справа") if rng.random() < 0.5 else ("справа", "слева")
    return Question(
        f"{_cap(obj.shape.nom)} находится {first} или {second}?", answer,
        f"{_cap(obj.shape.nom)} находится {answer}.",
        "choose", "attr", "positionChoose", "hposition", f"positionChoose-{obj.shape.key}",
        [("select", _ref(obj), []), ("choose hposition", "left|right", [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "hposition"),
    )


def _choose_vertical(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _vertical(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    answer = _vertical(scene, obj)
    first, second = ("вверху", "внизу") if rng.random() < 0.5 else ("внизу", "вверху")
    return Question(
        f"{_cap(obj.shape.nom)} находится {first} или {second}?", answer,
        f"{_cap(obj.shape.nom)} находится {answer}.",
        "choose", "attr", "positionChoose", "vposition", f"positionChoose-{obj.shape.key}_vertical",
        [("select", _ref(obj), []), ("choose vposition", "top|bottom", [0])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "vposition"),
    )


def _choose_relation(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b and a.column != b.column]
    if not pairs:
        return None
    subject, anchor = rng.choice(pairs)
    answer = "слева" if subject.column < anchor.column else "справа"
    first, second = ("слева", "справа") if rng.random() < 0.5 else ("справа", "слева")
    return Question(
        f"{_cap(subject.shape.nom)} находится {first} или {second} от {anchor.shape.gen}?", answer,
        f"{_cap(subject.shape.nom)} находится {answer} от {anchor.shape.gen}.",
        "choose", "rel", "relChooser", "hposition", f"relChooser-{subject.shape.key}_{anchor.shape.key}",
        [("select", _ref(anchor), []),
         ("choose rel", f"{subject.shape.key},to the left of|to the right of,s ({subject.object_id})", [0])],
        [(_cap(subject.shape.nom), subject.object_id), (anchor.shape.gen, anchor.object_id)],
        (f"{subject.object_id}/{anchor.object_id}", "relation"),
    )


def _choose_category(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    wrong = rng.choice([s for s in SHAPES if s != obj.shape])
    first, second = _ordered(rng, obj.shape.nom, wrong.nom)
    color = obj.color.nom["f"]
    return Question(
        f"{_cap(color)} фигура — это {first} или {second}?", obj.shape.nom,
        f"{_cap(color)} фигура — это {obj.shape.nom}.",
        "choose", "cat", "chooseCat", "shape", f"chooseCat-{obj.color.key}",
        [("select", "object (-)", []), ("filter color", obj.color.key, [0]),
         ("choose name", f"{obj.shape.key}|{wrong.key}", [1])],
        [("фигура", obj.object_id), (obj.shape.nom, obj.object_id)], (obj.object_id, "shape"),
    )


def _choose_background(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    wrong = rng.choice([b for b, _ in BACKGROUNDS if b != scene.background])
    first, second = _ordered(rng, scene.background.nom["m"], wrong.nom["m"])
    answer = scene.background.nom["m"]
    return Question(
        f"Фон {first} или {second}?", answer, f"Фон {answer}.",
        "choose", "global", "chooseGlobal", "background color", "chooseGlobal",
        [("select", "scene", []), ("choose background color", f"{scene.background.key}|{wrong.key}", [0])],
        [], ("scene", "background"),
    )


# ---- logical -------------------------------------------------------------------------------


def _two_shapes(scene: Scene, rng: random.Random, present_count: int) -> tuple[Noun, Noun] | None:
    """Two distinct shapes of which exactly `present_count` are in the scene, in random order."""
    present = [obj.shape for obj in scene.objects]
    absent = [shape for shape in SHAPES if shape not in present]
    if present_count == 2 and len(present) >= 2:
        pair = rng.sample(present, 2)
    elif present_count == 1 and present and absent:
        pair = [rng.choice(present), rng.choice(absent)]
        rng.shuffle(pair)
    elif present_count == 0 and len(absent) >= 2:
        pair = rng.sample(absent, 2)
    else:
        return None
    return pair[0], pair[1]


def _shape_mentions(scene: Scene, shapes: tuple[Noun, ...]) -> list[tuple[str, str]]:
    """Annotation mentions for the shapes that are in the scene (absent ones point nowhere)."""
    mentions = []
    for shape in shapes:
        obj = scene.by_shape(shape)
        if obj is not None:
            mentions.append((shape.nom, obj.object_id))
    return mentions


def _logical_and(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    pair = _two_shapes(scene, rng, 2 if target else rng.choice((0, 1, 1)))
    if pair is None:
        return None
    a, b = pair
    present = {obj.shape for obj in scene.objects}
    if target:
        full = f"Да, на картинке есть и {a.nom}, и {b.nom}."
    elif a in present or b in present:
        full = f"Нет, на картинке нет {(b if a in present else a).gen}."
    else:
        full = f"Нет, на картинке нет ни {a.gen}, ни {b.gen}."
    return Question(
        f"Есть ли на картинке и {a.nom}, и {b.nom}?", _yes_no(target), full,
        "logical", "obj", "existAnd", None, f"existAnd-{a.key}_{b.key}",
        [("select", a.key, []), ("exist", "?", [0]), ("select", b.key, []), ("exist", "?", [2]), ("and", "", [1, 3])],
        _shape_mentions(scene, (a, b)),
        (f"{a.key}+{b.key}", "exist"),
    )


def _logical_or(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    pair = _two_shapes(scene, rng, rng.choice((1, 2)) if target else 0)
    if pair is None:
        return None
    a, b = pair
    present = {obj.shape for obj in scene.objects}
    if target:
        shown = [s.nom for s in (a, b) if s in present]
        full = f"Да, на картинке есть {' и '.join(shown)}."
    else:
        full = f"Нет, на картинке нет ни {a.gen}, ни {b.gen}."
    return Question(
        f"Есть ли на картинке {a.nom} или {b.nom}?", _yes_no(target), full,
        "logical", "obj", "existOr", None, f"existOr-{a.key}_{b.key}",
        [("select", a.key, []), ("exist", "?", [0]), ("select", b.key, []), ("exist", "?", [2]), ("or", "", [1, 3])],
        _shape_mentions(scene, (a, b)),
        (f"{a.key}+{b.key}", "exist"),
    )


def _logical_attributes(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    gender = obj.shape.gender
    color, size = obj.color, obj.size
    if not target:
        wrong = rng.choice(("color", "size", "both"))
        if wrong in ("color", "both"):
            color = rng.choice([c for c, _ in COLORS if c != obj.color])
        if wrong in ("size", "both"):
            size = next(s for s in SIZES if s != obj.size)
    actual = f"{obj.color.nom[gender]} и {obj.size.nom[gender]}"
    full = f"Да, {obj.shape.nom} {actual}." if target else f"Нет, {obj.shape.nom} {actual}."
    return Question(
        f"{_cap(obj.shape.nom)} {color.nom[gender]} и {size.nom[gender]}?", _yes_no(target), full,
        "logical", "attr", "verifyAttrAnd", None, f"verifyAttrAnd-{obj.shape.key}",
        [("select", _ref(obj), []), ("verify color", color.key, [0]), ("verify size", size.key, [0]),
         ("and", "", [1, 2])],
        [(_cap(obj.shape.nom), obj.object_id)], (obj.object_id, "color+size"),
    )


# ---- compare -------------------------------------------------------------------------------


def _compare_same_size(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    pairs = [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:] if (a.size == b.size) == target]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    full = (f"Да, {a.shape.nom} и {b.shape.nom} одинакового размера." if target
            else f"Нет, {a.shape.nom} и {b.shape.nom} разного размера.")
    return Question(
        f"{_cap(a.shape.nom)} и {b.shape.nom} одинакового размера?", _yes_no(target), full,
        "compare", "attr", "sameSize", None, f"sameSize-{a.shape.key}_{b.shape.key}",
        [("select", _ref(a), []), ("select", _ref(b), []), ("same size", "", [0, 1])],
        [(_cap(a.shape.nom), a.object_id), (b.shape.nom, b.object_id)],
        (f"{min(a.object_id, b.object_id)}/{max(a.object_id, b.object_id)}", "size"),
    )


def _compare_choice(
    scene: Scene, rng: random.Random, word: str, rank: Callable[[SceneObject], float], program: str, detailed: str
) -> Question | None:
    """«Что больше, A или B?»: the object that wins on `rank`, options in random order."""
    pairs = [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:] if rank(a) != rank(b)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    winner, loser = (a, b) if rank(a) > rank(b) else (b, a)
    return Question(
        f"Что {word}, {a.shape.nom} или {b.shape.nom}?", winner.shape.nom,
        f"{_cap(winner.shape.nom)} {word} {loser.shape.gen}.",
        "compare", "rel" if detailed == "comparePosition" else "attr", detailed, program, f"{detailed}-{program}",
        [("select", _ref(a), []), ("select", _ref(b), []), (f"choose {program}", "", [0, 1])],
        [(a.shape.nom, a.object_id), (b.shape.nom, b.object_id)],
        (f"{min(a.object_id, b.object_id)}/{max(a.object_id, b.object_id)}", program),
    )


def _compare_larger(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    return _compare_choice(scene, rng, "больше", lambda o: 1.0 if o.size.key == "large" else 0.0, "larger", "compare")


def _compare_left(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    return _compare_choice(scene, rng, "левее", lambda o: -o.column, "more left", "comparePosition")


def _compare_higher(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    return _compare_choice(scene, rng, "выше", lambda o: -o.row, "higher", "comparePosition")


# ---- questions that name an object by its colour -------------------------------------------
# «красная фигура» needs only colour to find the object: these stay learnable at 64 px, where
# small shapes are hard to tell apart.


def _query_size_by_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    obj = rng.choice(scene.objects)
    color, size = obj.color.nom["f"], obj.size.nom["f"]
    return Question(
        f"Какого размера {color} фигура?", size, f"{_cap(color)} фигура {size}.",
        "query", "attr", "directOf", "size", f"directOf-{obj.color.key}_object_size",
        [("select", "object (-)", []), ("filter color", obj.color.key, [0]), ("query", "size", [1])],
        [("фигура", obj.object_id)], (obj.object_id, "size"),
    )


def _query_side_by_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _side(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    side = _side(scene, obj)
    color = obj.color.nom["f"]
    return Question(
        f"На какой стороне картинки находится {color} фигура?", side, f"{_cap(color)} фигура находится {side}.",
        "query", "attr", "positionQuery", "hposition", f"positionQuery-{obj.color.key}_object",
        [("select", "object (-)", []), ("filter color", obj.color.key, [0]), ("query", "hposition", [1])],
        [("фигура", obj.object_id)], (obj.object_id, "hposition"),
    )


def _verify_exist_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    present = [obj.color for obj in scene.objects]
    pool = present if target else [color for color, _ in COLORS if color not in present]
    if not pool:
        return None
    color = rng.choice(pool)
    obj = scene.by_color(color)
    phrase_nom, phrase_gen = f"{color.nom['f']} фигура", f"{color.gen['f']} фигуры"
    full = f"Да, на картинке есть {phrase_nom}." if target else f"Нет, на картинке нет {phrase_gen}."
    return Question(
        f"Есть ли на картинке {phrase_nom}?", _yes_no(target), full,
        "verify", "obj", "existAttr", None, f"existAttr-{color.key}_object",
        [("select", f"object ({obj.object_id if obj else '-'})", []), ("filter color", color.key, [0]),
         ("exist", "?", [1])],
        [("фигура", obj.object_id)] if obj else [], (f"{color.key} object", "exist"),
    )


def _verify_side_by_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _side(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    actual = _side(scene, obj)
    asked = actual if target else ("справа" if actual == "слева" else "слева")
    color = obj.color.nom["f"]
    full = f"{'Да' if target else 'Нет'}, {color} фигура находится {actual}."
    return Question(
        f"{_cap(color)} фигура находится {asked}?", _yes_no(target), full,
        "verify", "attr", "positionVerify", None, f"positionVerify-{obj.color.key}_object",
        [("select", "object (-)", []), ("filter color", obj.color.key, [0]),
         ("verify hposition", "left" if asked == "слева" else "right", [1])],
        [("фигура", obj.object_id)], (obj.object_id, "hposition"),
    )


def _choose_side_by_color(scene: Scene, rng: random.Random, target: YesNo) -> Question | None:
    candidates = [obj for obj in scene.objects if _side(scene, obj)]
    if not candidates:
        return None
    obj = rng.choice(candidates)
    answer = _side(scene, obj)
    first, second = ("слева", "справа") if rng.random() < 0.5 else ("справа", "слева")
    color = obj.color.nom["f"]
    return Question(
        f"{_cap(color)} фигура находится {first} или {second}?", answer,
        f"{_cap(color)} фигура находится {answer}.",
        "choose", "attr", "positionChoose", "hposition", f"positionChoose-{obj.color.key}_object",
        [("select", "object (-)", []), ("filter color", obj.color.key, [0]), ("choose hposition", "left|right", [1])],
        [("фигура", obj.object_id)], (obj.object_id, "hposition"),
    )


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    build: Template
    weight: float
    yes_no: bool


# Weights: colour, position and yes/no questions dominate (learnable at 64 px); questions whose
# answer is a shape name (category, relations, comparisons) are asked less often.
TEMPLATES: tuple[TemplateSpec, ...] = (
    TemplateSpec("query_color", _query_color, 10, False),
    TemplateSpec("query_color_drawn", _query_color_drawn, 3, False),
    TemplateSpec("query_size", _query_size, 5, False),
    TemplateSpec("query_side", _query_side, 6, False),
    TemplateSpec("query_category", _query_category, 3, False),
    TemplateSpec("query_related_shape", _query_related_shape, 2, False),
    TemplateSpec("query_related_color", _query_related_color, 4, False),
    TemplateSpec("query_background", _query_background, 3, False),
    TemplateSpec("query_count", _query_count, 2, False),
    TemplateSpec("verify_color", _verify_color, 8, True),
    TemplateSpec("verify_size", _verify_size, 4, True),
    TemplateSpec("verify_exist", _verify_exist, 4, True),
    TemplateSpec("verify_exist_colored", _verify_exist_colored, 4, True),
    TemplateSpec("verify_side", _verify_side, 5, True),
    TemplateSpec("verify_vertical", _verify_vertical, 3, True),
    TemplateSpec("verify_relation", _verify_relation, 5, True),
    TemplateSpec("verify_background", _verify_background, 2, True),
    TemplateSpec("choose_color", _choose_color, 6, False),
    TemplateSpec("choose_size", _choose_size, 3, False),
    TemplateSpec("choose_side", _choose_side, 4, False),
    TemplateSpec("choose_vertical", _choose_vertical, 3, False),
    TemplateSpec("choose_relation", _choose_relation, 3, False),
    TemplateSpec("choose_category", _choose_category, 2, False),
    TemplateSpec("choose_background", _choose_background, 2, False),
    TemplateSpec("logical_and", _logical_and, 3, True),
    TemplateSpec("logical_or", _logical_or, 3, True),
    TemplateSpec("logical_attributes", _logical_attributes, 4, True),
    TemplateSpec("compare_same_size", _compare_same_size, 3, True),
    TemplateSpec("compare_larger", _compare_larger, 3, False),
    TemplateSpec("compare_left", _compare_left, 3, False),
    TemplateSpec("compare_higher", _compare_higher, 2, False),
    TemplateSpec("query_size_by_color", _query_size_by_color, 4, False),
    TemplateSpec("query_side_by_color", _query_side_by_color, 4, False),
    TemplateSpec("verify_exist_color", _verify_exist_color, 3, True),
    TemplateSpec("verify_side_by_color", _verify_side_by_color, 4, True),
    TemplateSpec("choose_side_by_color", _choose_side_by_color, 3, False),
)


# Named question sets for `gqaru synth --templates`. "all" is the GQA-like mix of 36 templates.
# "one-hop" keeps the questions that name one object by its colour, or ask about the whole image:
# each needs one look at the image, and a 2-layer tiny LLaVA learns them in a demo's budget, where
# the full mix's relations, comparisons and logic sit near the blind baseline (benchmarks/README.md).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "all": tuple(spec.name for spec in TEMPLATES),
    "one-hop": (
        "verify_exist_color",
        "query_size_by_color",
        "query_side_by_color",
        "verify_side_by_color",
        "choose_side_by_color",
        "query_category",
        "query_background",
        "verify_background",
        "choose_background",
    ),
}


def resolve_templates(text: str) -> tuple[str, ...]:
    """«one-hop» or «all» (a `TEMPLATE_SETS` name), or template names separated by commas.

    Raises:
        ValueError: a name that is neither a set nor a template (the message lists both).
    """
    if text in TEMPLATE_SETS:
        return TEMPLATE_SETS[text]
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in TEMPLATE_SETS["all"]]
    if unknown or not names:
        raise ValueError(
            f"unknown question templates {unknown or '(none given)'}: give a set ({', '.join(TEMPLATE_SETS)}) "
            f"or template names from {list(TEMPLATE_SETS['all'])}"
        )
    return names


def resolve_questions_per_image(text: str) -> dict[int, float] | None:
    """«default» (None: the split's uniform range), a `QUESTIONS_PER_IMAGE_SHAPES` name, or explicit
    weights «COUNT:WEIGHT,...» («1:65,2:26,3:9»): questions per image drawn with those weights.

    Raises:
        ValueError: an unknown name or a malformed pair (the message lists the names and the form).
    """
    text = text.strip()
    if text == "default":
        return None
    if text in QUESTIONS_PER_IMAGE_SHAPES:
        return dict(QUESTIONS_PER_IMAGE_SHAPES[text])
    weights: dict[int, float] = {}
    for part in (piece.strip() for piece in text.split(",")):
        count, colon, weight = part.partition(":")
        try:
            number, value = int(count), float(weight)
        except ValueError:
            colon = ""
        if not colon or number in weights:
            raise ValueError(
                f"questions per image {text!r}: {part!r} is not a new COUNT:WEIGHT pair; give a shape "
                f"({', '.join(['default', *QUESTIONS_PER_IMAGE_SHAPES])}) or weights like 1:65,2:26,3:9"
            )
        weights[number] = value
    _checked_weights(weights)
    return weights


def _checked_weights(weights: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """(counts, weights) of a questions-per-image distribution, checked.

    Raises:
        ValueError: a count that is not a positive integer, a negative or non-finite weight, or
            weights that add up to 0.
    """
    bad = [
        f"{count}:{weight}"
        for count, weight in weights.items()
        if not isinstance(count, int) or count < 1 or not math.isfinite(weight) or weight < 0
    ]
    if bad:
        raise ValueError(f"questions per image: {bad} are not a positive integer count with a finite weight >= 0")
    if not sum(weights.values()) > 0:
        raise ValueError(f"questions per image: the weights {dict(weights)} add up to 0; give one positive weight")
    return list(weights), list(weights.values())


class _YesNoBalancer:
    """Per template, asks for whichever answer ("да"/"нет") it has produced less often so far.

    A template that cannot produce the asked answer for a scene returns None and the generator
    moves on, so the counts stay within a few questions of 50/50 for every template.
    """

    def __init__(self) -> None:
        self.counts: dict[str, Counter[bool]] = defaultdict(Counter)

    def target(self, name: str, rng: random.Random) -> bool:
        counts = self.counts[name]
        if counts[True] == counts[False]:
            return rng.random() < 0.5
        return counts[True] < counts[False]

    def record(self, name: str, answer: bool) -> None:
        self.counts[name][answer] += 1


def _questions_for_scene(
    scene: Scene,
    rng: random.Random,
    wanted: int,
    balancer: _YesNoBalancer,
    templates: tuple[TemplateSpec, ...] = TEMPLATES,
) -> list[Question]:
    """Up to `wanted` questions about one scene (fewer if the scene runs out of new ones).

    At most one question per (template, topic): «Фон белый или серый?» and «Фон серый или белый?»
    on one image would only repeat a fact, so each image asks about more of its content.
    """
    questions: list[Question] = []
    seen: set[tuple[str, tuple[str, str]]] = set()
    weights = [spec.weight for spec in templates]
    failures = 0
    while len(questions) < wanted and failures < 60:
        spec = rng.choices(templates, weights=weights)[0]
        target: YesNo = balancer.target(spec.name, rng) if spec.yes_no else None
        question = spec.build(scene, rng, target)
        if question is None or (spec.name, question.topic) in seen:
            failures += 1
            continue
        seen.add((spec.name, question.topic))
        if spec.yes_no:
            balancer.record(spec.name, bool(target))
        questions.append(question)
    return questions


@dataclass
class SyntheticImage:
    """One image of a split: its id, its scene and its question rows (dicts in the hub's schema)."""

    image_id: str
    scene: Scene
    rows: list[dict[str, Any]] = field(default_factory=list)


def _annotations(text: str, mentions: list[tuple[str, str]]) -> list[dict[str, str]]:
    """GQA-style pointers from words of `text` to objects: {objectId, value = word index}."""
    words = [word.strip("?.,—").lower() for word in text.split()]
    found = []
    for surface, object_id in mentions:
        if surface.lower() in words:
            found.append({"objectId": object_id, "value": str(words.index(surface.lower()))})
    return found


def _program_string(program: list[tuple[str, str, list[int]]]) -> str:
    parts = []
    for operation, argument, dependencies in program:
        deps = f" [{', '.join(str(d) for d in dependencies)}]" if dependencies else ""
        parts.append(f"{operation}: {argument}{deps}")
    return "->".join(parts)


def _question_id(split: str, number: int) -> str:
    """GQA-like question ids, unique across splits: train "02000000"…, testdev "201000000"…."""
    return f"{2_000_000 + number:08d}" if split == "train" else f"{201_000_000 + number}"


def _row(question_id: str, image_id: str, question: Question, entailed: list[str]) -> dict[str, Any]:
    """One instructions row in the hub's column order and types."""
    return {
        "id": question_id,
        "imageId": image_id,
        "question": question.question,
        "answer": question.answer,
        "fullAnswer": question.full_answer,
        "isBalanced": True,
        "groups": {"global": question.global_group, "local": question.local_group},
        "entailed": str(entailed),  # stringified lists, as in the hub's data
        "equivalent": str([question_id]),
        "types": {"structural": question.structural, "semantic": question.semantic_type, "detailed": question.detailed},
        "annotations": {
            "question": _annotations(question.question, question.mentions),
            "answer": _annotations(question.answer, question.mentions),
            "fullAnswer": _annotations(question.full_answer, question.mentions),
        },
        "semantic": [{"operation": op, "argument": arg, "dependencies": deps} for op, arg, deps in question.program],
        "semanticStr": _program_string(question.program),
    }


def _split_seed(seed: int, split: str) -> int:
    # Stable across processes (no hash() of a str): the split name's bytes mixed into the seed.
    return seed * 1_000_003 + int.from_bytes(split.encode(), "little") % 1_000_000_007


def generate_split(
    split: str,
    questions: int,
    seed: int = 0,
    templates: Collection[str] | None = None,
    questions_per_image: Mapping[int, float] | None = None,
) -> list[SyntheticImage]:
    """The scenes and question rows of one split: exactly `questions` rows (no images drawn yet).

    Image ids are GQA-like and disjoint between splits (train "2300000"…, testdev "n100000"…);
    question ids are unique across both splits (train 8 digits from "02000000", testdev 9 digits
    from "201000000"). `templates` (names from `TEMPLATES`) restricts the questions to those
    templates, for probing what a model learns of each; None asks all of them.
    `questions_per_image` ({count: weight}, see `resolve_questions_per_image`) draws each image's
    question count with those weights; None draws it uniformly from `QUESTIONS_PER_IMAGE[split]`
    (the default, whose output does not change). The last image holds the remainder either way.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    if questions <= 0:
        raise ValueError(f"the {split} split needs a positive number of questions, got {questions}")
    chosen = TEMPLATES
    if templates is not None:
        names = set(templates)
        unknown = sorted(names - {spec.name for spec in TEMPLATES})
        if unknown or not templates:
            raise ValueError(
                f"unknown synthetic question templates {unknown or '(none given)'}; "
                f"choose from {[spec.name for spec in TEMPLATES]}"
            )
        chosen = tuple(spec for spec in TEMPLATES if spec.name in names)
    if questions_per_image is not None:
        counts, count_weights = _checked_weights(questions_per_image)
    rng = random.Random(_split_seed(seed, split))
    balancer = _YesNoBalancer()
    low, high = QUESTIONS_PER_IMAGE[split]
    min_objects = 3 if split == "testdev" else 2  # ≈31 distinct questions need a richer scene
    images: list[SyntheticImage] = []
    question_number = 0
    while question_number < questions:
        index = len(images)
        image_id = f"{2_300_000 + index}" if split == "train" else f"n{100_000 + index}"
        scene = _random_scene(rng, first_object_number=1_000_000 + index * 10, min_objects=min_objects)
        drawn = rng.randint(low, high) if questions_per_image is None else rng.choices(counts, count_weights)[0]
        wanted = min(drawn, questions - question_number)
        generated = _questions_for_scene(scene, rng, wanted, balancer, chosen)
        ids = [_question_id(split, question_number + offset) for offset in range(len(generated))]
        question_number += len(generated)
        by_topic: dict[tuple[str, str], list[str]] = defaultdict(list)
        for question_id, question in zip(ids, generated):
            by_topic[question.topic].append(question_id)
        image = SyntheticImage(image_id, scene)
        for question_id, question in zip(ids, generated):
            entailed = [other for other in by_topic[question.topic] if other != question_id]
            image.rows.append(_row(question_id, image_id, question, entailed))
        if image.rows:
            images.append(image)
    return images


def random_scenes(count: int, seed: int = 0) -> list[Scene]:
    """`count` scenes as the splits draw them, from a random stream of their own (no questions).

    The stream is neither split's, so these scenes are not the images of any `gqaru synth` output
    with the same seed (the tiny model's pretraining draws its images here).
    """
    rng = random.Random(_split_seed(seed, "scenes"))
    return [_random_scene(rng, first_object_number=index * 10, min_objects=2) for index in range(count)]


def scene_questions(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """Up to `count` questions about `scene` from every template, as text only: no answers."""
    return [question.question for question in _questions_for_scene(scene, rng, count, _YesNoBalancer())]


def place_words(scene: Scene, obj: SceneObject) -> tuple[str, str]:
    """Where `obj` is, in the questions' words: («слева» | «справа» | «посередине»,
    «вверху» | «внизу» | «в центре»)."""
    return _side(scene, obj) or "посередине", _vertical(scene, obj) or "в центре"


# --------------------------------------------------------------------------------------------
# Vocabulary corpus (the tiny model's tokenizer is trained on it)
# --------------------------------------------------------------------------------------------


def _vocabulary_lines() -> list[str]:
    """Every word form any template can emit, in short phrases, so no form is left to chance."""
    lines = [INSTRUCTION, "да", "нет", "слева", "справа", "вверху", "внизу", "над", "под", "левее", "выше", "больше"]
    adjectives = [c for c, _ in COLORS] + [b for b, _ in BACKGROUNDS] + list(SIZES)
    for shape in SHAPES + (FIGURE,):
        lines.append(f"{shape.nom} {shape.gen} {shape.ins}")
        for adjective in adjectives:
            lines.append(f"{adjective.nom[shape.gender]} {shape.nom}, {adjective.gen[shape.gender]} {shape.gen}")
    for adjective in adjectives:
        lines.append(f"{adjective.ins} цветом, {adjective.nom['m']} фон, {adjective.nom['f']} фигура")
    for numeral, noun in COUNT_WORDS.values():
        lines.append(f"На картинке {numeral} {noun}.")
    lines.append(" ".join(PARTICIPLE_DRAWN.values()))
    return lines


def training_corpus(seed: int = 0, questions: int = 3000) -> list[str]:
    """Russian text lines covering the whole synthetic vocabulary.

    Questions, short answers and full answers of `questions` generated questions (train split
    generator, no images drawn), the prompt instruction, and phrases with every inflected form a
    template can produce. Meant for training the tiny model's tokenizer, so that every word the
    synthetic dataset uses is in its vocabulary.
    """
    lines = _vocabulary_lines()
    for image in generate_split("train", questions, seed=seed):
        for row in image.rows:
            lines.extend((row["question"], row["answer"], row["fullAnswer"]))
    return lines


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _shape_polygons(shape: str, cx: float, cy: float, r: float) -> list[tuple[str, list[tuple[float, float]]]]:
    """The primitives of one shape centred at (cx, cy) with radius r: ("ellipse"|"polygon", points)."""
    if shape == "circle":
        return [("ellipse", [(cx - r, cy - r), (cx + r, cy + r)])]
    if shape == "square":
        half = r * 0.85  # about the circle's area, so size stays comparable across shapes
        corners = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        return [("polygon", corners)]
    if shape == "triangle":
        return [("polygon", [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)])]
    if shape == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = r if k % 2 == 0 else r * 0.45
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return [("polygon", points)]
    if shape == "arrow":
        return [("polygon", [
            (cx - r, cy - 0.3 * r), (cx + 0.1 * r, cy - 0.3 * r), (cx + 0.1 * r, cy - 0.8 * r), (cx + r, cy),
            (cx + 0.1 * r, cy + 0.8 * r), (cx + 0.1 * r, cy + 0.3 * r), (cx - r, cy + 0.3 * r),
        ])]
    if shape == "heart":
        lobe = 0.5 * r
        return [
            ("ellipse", [(cx - 0.95 * r, cy - 0.8 * r), (cx - 0.95 * r + 2 * lobe, cy - 0.8 * r + 2 * lobe)]),
            ("ellipse", [(cx + 0.95 * r - 2 * lobe, cy - 0.8 * r), (cx + 0.95 * r, cy - 0.8 * r + 2 * lobe)]),
            ("polygon", [(cx - 0.93 * r, cy - 0.15 * r), (cx + 0.93 * r, cy - 0.15 * r), (cx, cy + 0.95 * r)]),
        ]
    raise ValueError(f"no drawing for shape {shape!r}")


def draw_scene(scene: Scene) -> bytes:
    """The scene as JPEG bytes (RGB, quality 90): flat shapes on a plain background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.width, scene.height), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        for kind, points in _shape_polygons(obj.shape.key, obj.center[0], obj.center[1], obj.radius):
            if kind == "ellipse":
                draw.ellipse(points, fill=obj.rgb)
            else:
                draw.polygon(points, fill=obj.rgb)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Writing the hub layout
# --------------------------------------------------------------------------------------------


def instruction_features() -> Any:
    """The `*_balanced_instructions` schema of deepvk/GQA-ru as `datasets.Features`.

    `annotations` is the hub's `sequence` of {question, answer, fullAnswer} structs, which datasets
    stores as a struct of lists: each list holds GQA's pointers from a word (`value`: its index in
    the whitespace-split text) to a scene object (`objectId`).
    """
    from datasets import Features, List, Value

    pointer = {"objectId": Value("string"), "value": Value("string")}
    return Features(
        {
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
            "annotations": {"question": List(pointer), "answer": List(pointer), "fullAnswer": List(pointer)},
            "semantic": List(
                {"operation": Value("string"), "argument": Value("string"), "dependencies": List(Value("int32"))}
            ),
            "semanticStr": Value("string"),
        }
    )


def image_features() -> Any:
    """The `*_balanced_images` schema: `id` and a datasets `Image` (decodes to PIL)."""
    from datasets import Features, Image, Value

    return Features({"id": Value("string"), "image": Image()})


def _parquet_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


def _write_parquet(dataset: Any, path: Path, row_group_size: int | None = None) -> None:
    """Write a datasets table as parquet, keeping datasets' schema metadata (so `Image` round-trips).

    Dataset.to_parquet would do the same but prints a progress bar per file.
    """
    import pyarrow.parquet as pq

    pq.write_table(dataset.data.table, str(path), row_group_size=row_group_size)


def _write_split(directory: Path, split: str, images: list[SyntheticImage]) -> dict[str, dict[str, int]]:
    from datasets import Dataset

    instructions_dir = directory / f"{split}_balanced_instructions"
    images_dir = directory / f"{split}_balanced_images"
    instructions_dir.mkdir(parents=True)
    images_dir.mkdir(parents=True)
    rows = [row for image in images for row in image.rows]
    instructions = Dataset.from_list(rows, features=instruction_features())
    _write_parquet(instructions, instructions_dir / _parquet_name(split, 0, 1))
    image_bytes = 0
    files = max(1, math.ceil(len(images) / IMAGES_PER_PARQUET_FILE))
    for file_index in range(files):
        chunk = images[file_index * IMAGES_PER_PARQUET_FILE:(file_index + 1) * IMAGES_PER_PARQUET_FILE]
        table = Dataset.from_dict(
            {
                "id": [image.image_id for image in chunk],
                "image": [{"bytes": draw_scene(image.scene), "path": None} for image in chunk],
            },
            features=image_features(),
        )
        _write_parquet(table, images_dir / _parquet_name(split, file_index, files), row_group_size=100)
        image_bytes += table.data.nbytes
    return {
        "instructions": {"num_examples": len(rows), "num_bytes": instructions.data.nbytes},
        "images": {"num_examples": len(images), "num_bytes": image_bytes},
    }


def _readme(
    sizes: dict[str, dict[str, dict[str, int]]],
    seed: int,
    templates: Collection[str] | None,
    train_questions_per_image: Mapping[int, float] | None = None,
) -> str:
    """The dataset card: YAML `dataset_info` + `configs` (as in the hub repo) and a short note."""
    import yaml

    infos, configs = [], []
    for split in SPLITS:
        for kind, features in (("images", image_features()), ("instructions", instruction_features())):
            name = f"{split}_balanced_{kind}"
            size = sizes[split][kind]
            infos.append(
                {
                    "config_name": name,
                    "features": features._to_yaml_list(),
                    "splits": [{"name": split, "num_bytes": size["num_bytes"], "num_examples": size["num_examples"]}],
                    "dataset_size": size["num_bytes"],
                }
            )
            configs.append({"config_name": name, "data_files": [{"split": split, "path": f"{name}/{split}-*"}]})
    header = yaml.safe_dump(
        {"license": "apache-2.0", "language": ["ru"], "dataset_info": infos, "configs": configs},
        sort_keys=False,
        allow_unicode=True,
    )
    lines = [
        "---",
        header.rstrip("\n"),
        "---",
        README_MARKER,
        "",
        "# Synthetic GQA-ru",
        "",
        "A synthetic dataset in the format of `deepvk/GQA-ru` (same configs, columns and layout), written",
        f"by `gqaru synth` with seed {seed}: simple scenes of coloured shapes and Russian questions about",
        "them. It exists so that the gqaru pipeline runs and is tested offline; it says nothing about",
        "real GQA-ru accuracy.",
        "",
    ]
    if templates is not None and set(templates) != set(TEMPLATE_SETS["all"]):
        named = next((name for name, members in TEMPLATE_SETS.items() if set(members) == set(templates)), None)
        listed = ", ".join(sorted(templates))
        lines += [f"Question templates: {f'the {named!r} set ({listed})' if named else listed}.", ""]
    if train_questions_per_image is not None:
        named = next(
            (name for name, shape in QUESTIONS_PER_IMAGE_SHAPES.items() if shape == dict(train_questions_per_image)),
            None,
        )
        weights = ", ".join(f"{count}:{weight:g}" for count, weight in train_questions_per_image.items())
        lines += [f"Questions per train image drawn with weights {weights}{f' ({named!r})' if named else ''}.", ""]
    for split in SPLITS:
        questions, images = sizes[split]["instructions"]["num_examples"], sizes[split]["images"]["num_examples"]
        lines.append(f"- {split}: {questions} questions over {images} images")
    return "\n".join(lines) + "\n"


def _check_replaceable(out: Path) -> None:
    """An existing output dir is replaced only if it is empty or an earlier `gqaru synth` output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    readme = out / "README.md"
    if readme.is_file() and README_MARKER in readme.read_text(encoding="utf-8"):
        return
    raise FileExistsError(
        f"{out} is not empty and was not written by `gqaru synth`; refusing to replace it (choose another --out)"
    )


def write_synthetic_gqa(
    out_dir: str | os.PathLike[str],
    train_questions: int = 4000,
    testdev_questions: int = 1000,
    seed: int = 0,
    templates: Collection[str] | None = None,
    train_questions_per_image: Mapping[int, float] | None = None,
) -> dict[str, dict[str, int]]:
    """Write the synthetic GQA-ru to `out_dir` in the hub repo's layout; return the counts per split.

    `templates` restricts the questions to those templates (`resolve_templates`); None asks all.
    `train_questions_per_image` ({count: weight}, e.g. `QUESTIONS_PER_IMAGE_SHAPES["gqa-ru-train"]`)
    draws the train images' question counts from it (testdev keeps ≈31); None keeps ≈13.

    Exactly `train_questions` / `testdev_questions` question rows are written (images hold ≈13 and
    ≈31 questions; the last image of a split holds the remainder). Layout::

        README.md                                   YAML dataset_info + configs
        train_balanced_instructions/train-00000-of-00001.parquet
        train_balanced_images/train-0000K-of-0000N.parquet       (≤200 images per file)
        testdev_balanced_instructions/testdev-00000-of-00001.parquet
        testdev_balanced_images/testdev-0000K-of-0000N.parquet

    The directory is built next to `out_dir` and moved into place when complete; an earlier
    `gqaru synth` output there is replaced whole, anything else is refused.

    Raises:
        ValueError: a question count is not positive.
        FileExistsError: `out_dir` holds something that is not a `gqaru synth` output.
    """
    out = Path(out_dir)
    counts = {"train": train_questions, "testdev": testdev_questions}
    for split, count in counts.items():
        if count <= 0:
            raise ValueError(f"{split}_questions must be positive, got {count}")
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sizes = {
            split: _write_split(
                staging,
                split,
                generate_split(
                    split,
                    counts[split],
                    seed=seed,
                    templates=templates,
                    questions_per_image=train_questions_per_image if split == "train" else None,
                ),
            )
            for split in SPLITS
        }
        readme = _readme(sizes, seed, templates, train_questions_per_image)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the output is an ordinary directory
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        split: {
            "questions": sizes[split]["instructions"]["num_examples"],
            "images": sizes[split]["images"]["num_examples"],
        }
        for split in SPLITS
    }
