"""The replica of deepvk/llava-gemma-2b-lora: the hub's file set and layout, the real tokenizer, and
what stock transformers 5 makes of those files (the traps the real checkpoint sets)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from gqaru.cli import main as cli_main
from gqaru.collate import TrainingCollator
from gqaru.modeling import load_processor
from gqaru.standins import real_tokenizers
from gqaru.standins.replica import GEMMA_CHAT_TEMPLATE, LLAVA_GEMMA_2B, replica_files

HUB_ID = "deepvk/llava-gemma-2b-lora"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_hub_file_set_and_layout(replica_dir: Path) -> None:
    assert sorted(path.name for path in replica_dir.iterdir()) == replica_files(LLAVA_GEMMA_2B)
    assert (replica_dir / "processor_config.json").stat().st_size == 67
    assert _json(replica_dir / "processor_config.json") == {"chat_template": None, "processor_class": "LlavaProcessor"}
    config = _json(replica_dir / "config.json")
    assert config["transformers_version"] == "4.42.4"
    assert (config["image_token_index"], config["pad_token_id"]) == (256000, 256001)
    text = config["text_config"]
    assert (text["vocab_size"], text["hidden_act"], text["hidden_activation"]) == (256064, "gelu", None)
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"], text["tie_word_embeddings"]) == (2, 1, 0, True)
    vision = config["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["model_type"]) == (336, 14, "clip_vision_model")
    tokenizer_config = _json(replica_dir / "tokenizer_config.json")
    assert tokenizer_config["chat_template"] == GEMMA_CHAT_TEMPLATE and "bos_token" not in GEMMA_CHAT_TEMPLATE
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["add_eos_token"] is False
    assert _json(replica_dir / "added_tokens.json") == {"<image>": 256000, "<pad>": 256001}
    assert _json(replica_dir / "generation_config.json")["pad_token_id"] == 256001

    index = _json(replica_dir / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3
    keys = []
    for shard in shards:
        with safe_open(replica_dir / shard, "pt") as handle:
            keys += list(handle.keys())
    assert sorted(keys) == sorted(index["weight_map"])
    prefixes = ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")
    assert all(key.startswith(prefixes) for key in keys), [key for key in keys if not key.startswith(prefixes)][:3]
    assert {prefix for prefix in prefixes if any(key.startswith(prefix) for key in keys)} == set(prefixes)
    assert not any("lm_head" in key for key in keys)  # tied to the embeddings

    real = real_tokenizers.MEMBERS["gemma"]
    assert hashlib.sha256((replica_dir / "tokenizer.model").read_bytes()).hexdigest() == real.sha256


def test_stock_transformers_loads_it_as_it_would_load_the_real_files(replica_dir: Path) -> None:
    model, info = LlavaForConditionalGeneration.from_pretrained(replica_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.text_config.hidden_act == "gelu_pytorch_tanh"  # 4.42 ran "gelu" as the tanh GELU
    tokenizer = AutoTokenizer.from_pretrained(replica_dir)
    assert len(tokenizer) == 256001 and tokenizer.convert_tokens_to_ids("<image>") == 256000
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [2, 1, 0]
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [106, 107]
    assert tokenizer("Да")["input_ids"][0] == 2  # the tokenizer adds <bos>; the template does not
    # The trap: the processor loads, but its config lacks patch_size, so the first image fails.
    processor = AutoProcessor.from_pretrained(replica_dir)
    assert processor.patch_size is None
    with pytest.raises(TypeError):
        processor(images=[Image.new("RGB", (40, 30))], text="<image>", return_tensors="pt")
    # gqaru's loader repairs it from the model config: 576 image tokens, as the vision tower yields.
    repaired = load_processor(replica_dir)
    assert TrainingCollator(repaired).image_tokens == 576
    inputs = repaired(images=[Image.new("RGB", (40, 30))], text="<image>", return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    assert sum(feature.shape[0] for feature in features) == 576


def test_the_image_processor_backend_is_pinned_to_pil(replica_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision present, transformers 5 would pick its torchvision processor (other pixels)."""
    import transformers.models.auto.image_processing_auto as image_processing_auto

    resolved = []
    original = image_processing_auto._resolve_backend

    def spy(*args, **kwargs):
        resolved.append(original(*args, **kwargs))
        return resolved[-1]

    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(image_processing_auto, "_resolve_backend", spy)
    AutoProcessor.from_pretrained(replica_dir)
    assert resolved == ["torchvision"]  # what a machine with torchvision would get by default
    resolved.clear()
    processor = load_processor(replica_dir)
    assert resolved == ["pil"] and type(processor.image_processor).__name__ == "CLIPImageProcessorPil"


def test_without_the_real_tokenizer_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(real_tokenizers.CACHE_ENV, str(tmp_path / "empty-cache"))
    assert cli_main(["replica", HUB_ID, "--out", str(tmp_path / "replica")]) == 2
    error = capsys.readouterr().err
    assert "gqaru fetch-tokenizers" in error and "maxtext==0.2.5" in error
    assert not (tmp_path / "replica").exists()


def test_fetching_from_a_wheel_checks_the_member(tmp_path: Path) -> None:
    member = real_tokenizers.MEMBERS["gemma"]
    good = tmp_path / "good.whl"
    with zipfile.ZipFile(good, "w") as archive:
        for name, each in real_tokenizers.MEMBERS.items():
            archive.write(real_tokenizers.tokenizer_file(name), each.path)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr(member.path, b"not a sentencepiece model")
    with pytest.raises(ValueError, match="sha256"):
        real_tokenizers.fetch(wheel=bad, cache=tmp_path / "cache")
    paths = real_tokenizers.fetch(wheel=good, cache=tmp_path / "cache")
    for name, path in paths.items():
        assert path.read_bytes() == real_tokenizers.tokenizer_file(name).read_bytes()


def test_a_dir_of_other_files_is_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    assert cli_main(["replica", HUB_ID, "--out", str(foreign)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("family", ["vicuna", "llama3"])
def test_the_other_families_replicas_hold_the_real_facts(request, family: str) -> None:
    """REAL_MODELS.md's facts of llava-hf/llava-1.5-7b-hf and deepvk/llava-saiga-8b, as stock
    transformers reads the replica's files."""
    from gqaru.standins.replica import REPLICAS

    directory = request.getfixturevalue("vicuna_replica_dir" if family == "vicuna" else "saiga_replica_dir")
    hub_id = "llava-hf/llava-1.5-7b-hf" if family == "vicuna" else "deepvk/llava-saiga-8b"
    assert sorted(path.name for path in directory.iterdir()) == replica_files(REPLICAS[hub_id])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if family == "vicuna":
        assert tokenizer.chat_template is None  # lmms-eval (and gqaru) supply the Vicuna one
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
        assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
        assert tokenizer("Hello world")["input_ids"] == [1, 15043, 3186]
    else:
        ids = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
               "<|end_header_id|>": 128007, "<|eot_id|>": 128009}  # fmt: skip
        assert {token: tokenizer.convert_tokens_to_ids(token) for token in ids} == ids
        assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Где кот?"}], tokenize=False, add_generation_prompt=True)
        assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nГде кот?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
