"""The tiny LLaVA: loads in stock transformers, counts match, template exact, tokenizer lossless."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from gqaru.standins.tiny import (
    PRESETS,
    SPECIAL_TOKENS,
    TinyLlavaDims,
    build_model,
    build_tiny_model,
    default_tokenizer_corpus,
    llava_config,
    train_tokenizer,
)

# Run in a fresh interpreter that imports only transformers (and PIL for the image): proves the
# saved directory needs nothing from gqaru.
STOCK_LOAD_SCRIPT = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

model_dir = sys.argv[1]
model = LlavaForConditionalGeneration.from_pretrained(model_dir)
processor = AutoProcessor.from_pretrained(model_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
messages = [{"role": "user", "content": "<image>\nКакого цвета круг слева?\nОтветь одним словом."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
image = Image.new("RGB", (120, 90), (200, 30, 30))
# The template already starts with <bos>: the processor must not add a second one.
inputs = processor(images=image, text=prompt, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({
    "gqaru_imported": any(name == "gqaru" or name.startswith("gqaru.") for name in sys.modules),
    "model_class": type(model).__name__,
    "processor_class": type(processor).__name__,
    "prompt": prompt,
    "processor_chat_template_matches": processor.chat_template == tokenizer.chat_template,
    "image_tokens_in_input": int((inputs["input_ids"] == model.config.image_token_id).sum()),
    "bos_count": int((inputs["input_ids"] == tokenizer.bos_token_id).sum()),
    "pixel_values_shape": list(inputs["pixel_values"].shape),
    "new_tokens": new_tokens,
    "decoded": tokenizer.decode(new_tokens),
    "tokenizer_size": len(tokenizer),
    "eos_ids": model.generation_config.eos_token_id,
}, ensure_ascii=False))
"""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def _image_feature_count(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> int:
    """How many feature vectors the vision tower + projector produce for one image."""
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return features[0].shape[0]


def test_saved_files_are_safetensors_and_template_in_tokenizer_config(tiny_model_dir: Path) -> None:
    names = {path.name for path in tiny_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config["chat_template"] == (tiny_model_dir / "chat_template.jinja").read_text(encoding="utf-8")


def test_loads_and_generates_in_stock_transformers_without_gqaru(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD_SCRIPT, str(tiny_model_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["gqaru_imported"] is False
    assert report["model_class"] == "LlavaForConditionalGeneration"
    assert report["processor_class"] == "LlavaProcessor"
    assert report["processor_chat_template_matches"]
    assert report["prompt"] == (
        "<bos><start_of_turn>user\n<image>\nКакого цвета круг слева?\nОтветь одним словом.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    dims = PRESETS["tiny"]
    assert report["image_tokens_in_input"] == dims.image_tokens == 64
    assert report["bos_count"] == 1
    assert report["pixel_values_shape"] == [1, 3, dims.image_size, dims.image_size]
    # Greedy decoding ran: 1..6 new ids, all inside the tokenizer, stopping only on a declared eos.
    new_tokens = report["new_tokens"]
    assert 1 <= len(new_tokens) <= 6
    assert all(0 <= token < report["tokenizer_size"] for token in new_tokens)
    assert len(new_tokens) == 6 or new_tokens[-1] in report["eos_ids"]
    assert isinstance(report["decoded"], str)


def test_processor_image_tokens_equal_vision_features(tiny_model_dir: Path, processor, model) -> None:
    dims = PRESETS["tiny"]
    image = Image.new("RGB", (97, 61), (10, 200, 30))  # not square, not the model's size
    inputs = processor(images=image, text="<image>\nВопрос", return_tensors="pt", add_special_tokens=False)
    placeholder_count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = dims.image_size // dims.patch_size
    assert placeholder_count == grid * grid == model.config.image_seq_length
    assert _image_feature_count(model, inputs["pixel_values"]) == placeholder_count
    # The forward pass accepts the pair: no "Image features and image tokens do not match".
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)


def test_real_shape_has_576_image_tokens(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "real-shape", preset="real-shape", seed=0)
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert (processor.patch_size, processor.vision_feature_select_strategy, processor.num_additional_image_tokens) == (
        14, "default", 1)
    assert model.config.vision_config.image_size == 336 and model.config.vision_feature_layer == -2
    inputs = processor(images=Image.new("RGB", (640, 480), (0, 0, 255)), text="<image>\nЧто это?",
                       return_tensors="pt", add_special_tokens=False)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert _image_feature_count(model, inputs["pixel_values"]) == 576 == model.config.image_seq_length


def test_chat_template_renders_gemma_turns_exactly(tokenizer) -> None:
    conversation = [
        {"role": "user", "content": "<image>\nКакого цвета круг?\nОтветь одним словом."},
        {"role": "assistant", "content": "красный"},
        {"role": "user", "content": "А квадрат?\nОтветь одним словом."},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\n<image>\nКакого цвета круг?\nОтветь одним словом.<end_of_turn>\n"
        "<start_of_turn>model\nкрасный<end_of_turn>\n"
        "<start_of_turn>user\nА квадрат?\nОтветь одним словом.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # Without the generation prompt a finished conversation ends after the model's end of turn;
    # contents are trimmed as Gemma does; list contents render an image part as <image>.
    finished = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nГде звезда?  "}]},
        {"role": "assistant", "content": "  слева\n"},
    ]
    assert tokenizer.apply_chat_template(finished, tokenize=False) == (
        "<bos><start_of_turn>user\n<image>\nГде звезда?<end_of_turn>\n<start_of_turn>model\nслева<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    ("messages", "message_part"),
    [
        ([{"role": "system", "content": "Будь краток."}, {"role": "user", "content": "Привет"}], "no system role"),
        ([{"role": "assistant", "content": "да"}], "must alternate"),
        ([{"role": "user", "content": "а"}, {"role": "user", "content": "б"}], "must alternate"),
        ([{"role": "tool", "content": "x"}], "Unknown chat role tool"),
    ],
)
def test_chat_template_rejects_what_gemma_cannot_express(tokenizer, messages, message_part: str) -> None:
    with pytest.raises(Exception, match=message_part):
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_special_tokens_are_single_ids_wired_into_the_config(tokenizer, model) -> None:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert tokenizer.unk_token_id not in {ids[token] for token in SPECIAL_TOKENS if token != "<unk>"}
    for token, token_id in ids.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert (ids["<pad>"], ids["<eos>"], ids["<bos>"], ids["<unk>"]) == (0, 1, 2, 3)  # Gemma's ids
    assert model.config.image_token_id == ids["<image>"]
    assert tokenizer.encode("Да", add_special_tokens=True)[0] == ids["<bos>"]
    generation = model.generation_config
    assert set(generation.eos_token_id) == {ids["<end_of_turn>"], ids["<eos>"]}
    assert generation.pad_token_id == ids["<pad>"] == model.config.text_config.pad_token_id
    assert model.config.text_config.vocab_size == len(tokenizer)
    # Decoding for display drops the turn markers.
    rendered = tokenizer.encode("<start_of_turn>model\nда<end_of_turn>", add_special_tokens=False)
    assert tokenizer.decode(rendered, skip_special_tokens=True) == "model\nда"


def test_tokenizer_round_trips_russian_without_unk(tokenizer) -> None:
    texts = default_tokenizer_corpus()[::7] + [
        "Какого цвета большой круг, который находится слева от синего квадрата?",
        "  Двойные  пробелы,\tтабуляция и\r\nперевод строки в конце\n",
        "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёлка, ёж, «кавычки» — тире…",
        "Mixed: LLaVA-модель, 336×336 px, 576 токенов; 3.14159; e-mail@example.org",
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text
    # The synthetic vocabulary is learned: its questions take few pieces and no byte fallback.
    question = "Какого цвета круг?"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(question, add_special_tokens=False))
    assert len(pieces) <= 4 and not any(piece.startswith("<0x") for piece in pieces), pieces


def test_any_text_encodes_without_unk(tokenizer) -> None:
    rng = random.Random(0)
    alphabet = [chr(code) for code in (*range(0x20, 0x7F), *range(0x400, 0x460), 0x4E2D, 0x6587, 0x1F600, 0x1F431,
                                       0x00E9, 0x00DF, 0x03A9, 0x2211, 0x0301, 0x200D, 0x0000, 0x000B)]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tokenizer.unk_token_id not in ids, repr(text)
        # Lossless except for the one character the Gemma layout reserves: a literal "▁" (absent here).
        assert tokenizer.decode(ids) == text, repr(text)


def test_preset_dims_fit_bitsandbytes_cpu_kernels(model) -> None:
    """Every Linear of the language model (the ones QLoRA quantizes) has out % 32 == 0 and in % 64 == 0."""
    for preset, dims in PRESETS.items():
        for name, (in_features, out_features) in dims.quantized_linear_shapes().items():
            assert out_features % 32 == 0 and in_features % 64 == 0, (preset, name)
    linears = {name: module for name, module in model.model.language_model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    assert len(linears) == 7 * PRESETS["tiny"].text_layers
    for name, module in linears.items():
        assert module.out_features % 32 == 0 and module.in_features % 64 == 0, name
    with pytest.raises(ValueError, match="bitsandbytes"):
        dataclasses.replace(PRESETS["tiny"], text_intermediate_size=500)
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(PRESETS["tiny"], image_size=60)


def test_gemma_2b_shapes_config_pads_the_vocabulary() -> None:
    tokenizer = train_tokenizer(default_tokenizer_corpus())
    dims = PRESETS["gemma-2b-shapes"]
    config = llava_config(dims, tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (18, 2048, 8, 1, 256, 16384, 256000)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (1024, 24, 16, 4096, 336, 14)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") < text.vocab_size
    assert config.image_seq_length == 576
    with torch.device("meta"):  # shapes only: no 11 GB of fp32 weights on a test machine
        meta_model = LlavaForConditionalGeneration(config)
    parameters = sum(parameter.numel() for parameter in meta_model.parameters())
    assert 2.7e9 < parameters < 2.9e9  # llava-gemma-2b: Gemma-2b (2.5 B) + CLIP ViT-L (0.3 B)
    for name, module in meta_model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.out_features % 32 == 0 and module.in_features % 64 == 0, name


def test_padded_vocabulary_model_runs_with_image(processor) -> None:
    """The gemma-2b-shapes path (text vocab larger than the tokenizer) at tiny width."""
    tokenizer = train_tokenizer(default_tokenizer_corpus())
    dims = dataclasses.replace(PRESETS["tiny"], text_vocab_size=4096)
    model = build_model(dims, tokenizer, seed=0)
    inputs = processor(images=Image.new("RGB", (64, 64), "white"), text="<image>\nЧто?", return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == 4096 and torch.isfinite(logits).all()


def test_same_seed_same_weights_and_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", preset="tiny", seed=0)
    other_seed = build_tiny_model(tmp_path / "other", preset="tiny", seed=1)
    reference = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other_seed / "model.safetensors")
    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    # save_pretrained writes the legacy key layout: find the embedding by its suffix.
    (embedding_key,) = [key for key in reference if key.endswith("embed_tokens.weight")]
    assert not torch.equal(reference[embedding_key], different[embedding_key])
    # The tokenizer does not depend on the weight seed: models of any seed share one vocabulary.
    tokenizer_json = (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == tokenizer_json == (other_seed / "tokenizer.json").read_bytes()


def test_rebuild_replaces_a_build_but_never_a_foreign_dir(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "model", preset="tiny", seed=0)
    (out / "stale.txt").write_text("left from an earlier build")
    build_tiny_model(out, preset="tiny", seed=0)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging dir left
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a tiny-model build"):
        build_tiny_model(foreign, preset="tiny")
    assert (foreign / "important.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="unknown tiny-model preset"):
        build_tiny_model(tmp_path / "x", preset="huge")


def test_build_info_matches_the_model(tiny_model_dir: Path, model, tokenizer) -> None:
    info = json.loads((tiny_model_dir / "tiny_model.json").read_text(encoding="utf-8"))
    assert info["preset"] == "tiny" and info["seed"] == 0
    assert TinyLlavaDims(**info["dims"]) == PRESETS["tiny"]
    assert info["parameters"] == sum(parameter.numel() for parameter in model.parameters())
    assert info["tokenizer_size"] == len(tokenizer)
