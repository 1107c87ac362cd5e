"""Typed configs: one section per concern, read from YAML with dotted `key=value` overrides.

    config = load_config("configs/train_lora.yaml", ["train.lr=1e-4", "lora.r=8"])
    config.train.lr  # 0.0001

Every section is a pydantic model with `extra="forbid"`: an unknown key or a value of the wrong
type is a `ConfigError` that names the key and where it came from (the file, or the override).
Overrides are parsed as YAML scalars (`train.max_steps=10` is an int, `model.adapter=null` is
None) and validated like the file, so a typo on the command line fails as loudly as one in YAML.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used: names the key, the source and what is wrong."""


class _Section(BaseModel):
    # Forbid unknown keys; validate assignments too, so code cannot smuggle in a bad value later.
    # The docstring under each field is its description: `--help` is generated from it (gqaru.preflight).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, use_attribute_docstrings=True)


class ModelConfig(_Section):
    name_or_path: str = "deepvk/llava-gemma-2b-lora"
    """Hub id or local dir of a LlavaForConditionalGeneration checkpoint."""
    adapter: str | None = None
    """A PEFT adapter dir applied on top of the base model (evaluation)."""
    quantization: Literal["none", "4bit"] = "none"
    """4bit = QLoRA (nf4, double quantization, bf16 compute); CUDA only."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on CUDA, fp32 on MPS and CPU. fp16 is not offered: Gemma overflows in fp16."""
    revision: str | None = None
    """A hub revision (branch, tag or commit) to pin the base model to."""
    trust_remote_code: bool = False
    """Off unless turned on by name: nothing from the hub is executed by default."""


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    """LoRA rank: the width of each low-rank update."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Projection names inside the attention blocks of the modules in `scope`."""
    scope: Literal["language", "all"] = "language"
    """language: only the language model's layers; all: the vision tower's too."""
    train_projector: bool = False
    """Also train the multi-modal projector (fully, saved with the adapter)."""


class DataConfig(_Section):
    shards: str = "shards/gqa-ru-train"
    """Training shards dir (from `gqaru shards build`)."""
    questions_per_sequence: int = Field(1, gt=0)
    """Questions about one image packed into one multi-turn conversation (1 = one per sample)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader workers per process (0 = read in the training process)."""
    shuffle_buffer: int = Field(256, ge=0)
    """Images held in the shuffle buffer of the training stream (0 = shard shuffle only)."""
    image_size: int | None = Field(None, gt=0)
    """Side the vision tower sees; None takes the processor's. Checked against the model at start."""
    length_grouping_batches: int = Field(0, ge=0)
    """0 = off. N: each run of N x train.batch_size planned sequences is sorted by length, cut into
    batches and the batches shuffled (seeded), so a batch holds sequences of similar length: less
    padding when batch_size > 1 and lengths vary (`gqaru.collate.group_by_length`)."""


class TrainConfig(_Section):
    epochs: float = Field(1, gt=0)
    """Passes over the training shards (fractions allowed); `max_steps` overrides it."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; overrides `epochs` when set."""
    batch_size: int = Field(1, gt=0)
    """Sequences per process per micro-step."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the trainable parameters."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after the warm-up."""
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    """Fraction of the total steps spent warming the learning rate up from 0."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this (None = no clipping)."""
    max_seq_len: int = Field(512, gt=0)
    """Bound on the TEXT tokens of a sequence; image tokens come on top and are never cut."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less activation memory, more compute."""
    seed: int = 42
    """Seed of the LoRA initialisation, the data order and dropout."""
    save_every: int | None = Field(200, gt=0)
    """Checkpoint every N optimizer steps (None = only at the end)."""
    keep_last: int = Field(2, gt=0)
    """Checkpoints kept (older ones are deleted)."""
    resume: str = "none"
    """none | latest | a checkpoint dir."""

    @field_validator("resume")
    @classmethod
    def _resume_target(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be none, latest or a checkpoint dir")
        return value
    log_every: int = Field(10, gt=0)
    """Optimizer steps between metrics lines (metrics.jsonl, tensorboard, the progress bar)."""
    save_merged: bool = True
    """Also write merged/ (base + LoRA folded in) at the end."""


class EvalConfig(_Section):
    shards: str = "shards/gqa-ru-testdev"
    """Evaluation shards dir (from `gqaru shards build --split testdev`)."""
    selection: Literal["seeded", "seed-report"] = "seeded"
    """seeded: `max_samples` questions drawn with `seed` (or all); seed-report: the seed report's 300
    testdev rows exactly (`gqaru.sources.seed_report_rows`; needs shards of the whole split)."""
    max_samples: int | Literal["all"] = 300
    """Questions to evaluate, drawn by the seeded selection rule, or all."""

    @field_validator("max_samples", mode="before")
    @classmethod
    def _count_or_all(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("must be a positive integer or 'all'")
    seed: int = 42
    """Seed of the question selection (the same rule and seed as shard building)."""
    batch_size: int = Field(16, gt=0)
    """Questions generated together (questions of one image share its encoding)."""
    max_new_tokens: int = Field(16, gt=0)
    """Most tokens generated per answer (greedy; lmms-eval's gqa_ru uses 16)."""
    reuse_image_prefix: bool = True
    """Run each image's prefix (its vision features and KV cache) once for all its questions;
    off: plain batched generate with pixel_values per question (same answers, slower)."""
    report: bool = True
    """Write report.md / report.html / plots beside the predictions."""

    @model_validator(mode="after")
    def _named_selection_is_fixed(self) -> "EvalConfig":
        given = sorted({"max_samples", "seed"} & self.model_fields_set)
        if self.selection == "seed-report" and given:
            raise ValueError(
                f"eval.selection=seed-report fixes the questions (the seed report's 300 rows); "
                f"{' and '.join('eval.' + name for name in given)} would be ignored: drop them, or use eval.selection=seeded"
            )
        return self


class OutputConfig(_Section):
    dir: str = "runs"
    """Where runs land: everything of a run goes to dir/run_name/."""
    run_name: str = "run"
    """The run's directory name under `dir` (a plain name, no '/')."""

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or value in {".", ".."}:
            raise ValueError("run_name must be a plain directory name (no '/')")
        return value


class RuntimeConfig(_Section):
    torch_threads: int | None = Field(None, gt=0)
    """Torch intra-op threads of every process (None: torch's own choice, one per core). Pinned,
    CPU runs give the same bytes on the same machine kind whatever the environment (`make demo`)."""


class Config(_Section):
    """The whole config. Training and evaluation read the sections they need."""

    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def run_dir(self) -> Path:
        """Where everything of this run lands: output.dir/run_name."""
        return Path(self.output.dir) / self.output.run_name

    def effective_batch(self, num_processes: int = 1) -> int:
        """Sequences per optimizer step across all processes."""
        return self.train.batch_size * self.train.grad_accum * num_processes


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from error
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[: depth + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _key_of(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location)


def _describe(error: ValidationError, origins: dict[str, str], default_origin: str) -> str:
    lines = []
    for item in error.errors():
        key = _key_of(item["loc"])
        origin = _origin_of(key, origins, default_origin)
        if item["type"] == "extra_forbidden":
            section = _key_of(item["loc"][:-1])
            known = _known_keys(section)
            hint = f" (known keys: {', '.join(known)})" if known else ""
            lines.append(f"{origin}: unknown key {key!r}{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{origin}: {key}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def _origin_of(key: str, origins: dict[str, str], default_origin: str) -> str:
    """The file or override a key came from; an overridden descendant wins (it was set last)."""
    if key in origins:
        return origins[key]
    below = [origin for name, origin in origins.items() if name.startswith(f"{key}.")]
    return below[-1] if below else default_origin


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys.extend(_leaf_keys(value, f"{key}."))
    return keys


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or only defaults when `path` is None) and apply dotted overrides.

    Raises:
        ConfigError: the file is missing or not a mapping, an override is malformed, a key is
            unknown or a value has the wrong type. The message names the key and its source.
    """
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror}") from error
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
        tree = loaded or {}
    origins = {key: origin for key in _leaf_keys(tree)}
    for text in overrides:
        key_path, value = _parse_override(text)
        _set_dotted(tree, key_path, value, f"override {text!r}")
        origins[".".join(key_path)] = f"override {text!r}"
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, origins, origin)) from None


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("model", "lora", "data", "train", "output", "runtime"),
    "evaluate": ("model", "eval", "output", "runtime"),
}
"""The sections each stage reads: its `--help` lists them and its run dir's config.yaml holds them."""


def to_dict(config: Config, stage: str | None = None) -> dict[str, Any]:
    """The config as plain data: every section, or only those `stage` reads (STAGE_SECTIONS); keys a
    named evaluation selection does not use are left out."""
    tree = config.model_dump(mode="json")
    if stage is not None:
        tree = {section: tree[section] for section in STAGE_SECTIONS[stage]}
    if config.eval.selection == "seed-report" and "eval" in tree:
        for unused in ("max_samples", "seed"):
            tree["eval"].pop(unused)
    return tree


def to_yaml(config: Config, stage: str | None = None) -> str:
    """The resolved config as YAML (only `stage`'s sections when given); `load_config` of it gives
    the same config back (the sections left out come back as their defaults)."""
    return yaml.safe_dump(to_dict(config, stage), sort_keys=False, allow_unicode=True)


def save_config(config: Config, path: str | Path, stage: str | None = None) -> None:
    Path(path).write_text(to_yaml(config, stage), encoding="utf-8")


def steps_per_epoch(sequences_per_process: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that one epoch of `sequences_per_process` sequences gives (last partial kept)."""
    micro_batches = math.ceil(sequences_per_process / batch_size)
    return math.ceil(micro_batches / grad_accum)
