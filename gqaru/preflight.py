"""The front door of `python -m gqaru.train` and `python -m gqaru.evaluate`: `--help`, config errors
and pre-flight checks, answered before torch, transformers or accelerate are imported.

    config = command_line("train", sys.argv[1:])   # a Config, or an exit status already explained

A stage's work starts with a minute of imports and model loading; a mistake that the config and
the file system already show (a shard dir that does not exist, a model path with a typo, QLoRA on
a machine without CUDA) must not wait for it. Everything here reads only the config, the file
system and the environment, in well under a second (QLoRA asked: importing torch to ask for CUDA,
~1.5 s). Each problem is one line that names the key, its value, what is wrong and what to do;
the exit status is 2 and nothing is written. The stages still raise their own errors later for
what only the loaded model can tell (a chat template gqaru cannot read, an image size mismatch).

`--help` is generated from the typed config (`gqaru.config`, one line per key from the field
docstrings), so it cannot drift from what the stage accepts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from gqaru.config import STAGE_SECTIONS, Config, ConfigError, load_config

EXIT_USAGE = 2
"""Exit status of a command that cannot start as given (argparse's convention)."""

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gqaru-shards/1"
"""As `gqaru.shards` writes them (a test keeps the two equal); not imported from there, because
`gqaru.shards` imports torch."""

EXAMPLE_HUB_ID = "deepvk/llava-gemma-2b-lora"

LOCAL_DIRS = ("models", "runs", "shards", "data")
"""gqaru's own directories (the README builds models into models/): `models/x` names a local path
even on a fresh clone where models/ does not exist yet, never the hub user "models"."""

_SUMMARIES = {
    "train": "LoRA/QLoRA fine-tuning of a LLaVA model on GQA-ru shards; writes output.dir/run_name/.",
    "evaluate": "Batched evaluation of a LLaVA model (plus an optional LoRA adapter) on GQA-ru testdev shards;\n"
    "writes predictions.jsonl, metrics.json and the report into output.dir/run_name/.",
}
_DOCS = {
    "train": "README.md, sections 'The stages' (2. Training) and 'Configuration'",
    "evaluate": "README.md, sections 'The stages' (3. Evaluation) and 'Configuration'",
}


# --------------------------------------------------------------------------------------------
# The command line


def command_line(stage: str, argv: list[str]) -> Config | int:
    """`CONFIG.yaml [key=value ...]` of a stage: the checked config, or the exit status after printing
    the help (`-h`/`--help`: 0), the usage (no arguments: 2), or every problem, one line each (2)."""
    if not argv or argv[0] in {"-h", "--help"}:
        if argv:
            print(command_help(stage))
            return 0
        print(f"{_usage(stage)}\n(--help lists the config keys)", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(argv[0], argv[1:])
    except ConfigError as error:
        report_problems(str(error).splitlines())
        return EXIT_USAGE
    problems = check(stage, config)
    if problems:
        report_problems(problems)
        return EXIT_USAGE
    return config


def exit_unless_ready(stage: str) -> None:
    """For a stage module's `if __name__ == "__main__"` block placed above its heavy imports: exit
    now when the command line is answered already (help, a config error, a failed check)."""
    answer = command_line(stage, sys.argv[1:])
    if isinstance(answer, int):
        sys.exit(answer)


def report_problems(problems: list[str]) -> None:
    """Print each problem as `error: ...` on stderr, once per machine: under a multi-process launch
    every process finds the same problems, and the first process of each node speaks for it."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)


def _usage(stage: str) -> str:
    module = f"gqaru.{stage}"
    return (
        f"usage: python -m {module} CONFIG.yaml [section.key=value ...]\n"
        f"       accelerate launch --config_file launch/X.yaml -m {module} CONFIG.yaml [section.key=value ...]"
    )


# --------------------------------------------------------------------------------------------
# Help, generated from the typed config


def _type_text(annotation: Any) -> str:
    """`cosine|linear` for a Literal, `int or null` for an optional int, the type's name otherwise."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(choice) for choice in typing.get_args(annotation))
    arguments = typing.get_args(annotation)
    if arguments and typing.get_origin(annotation) is not list:
        names = [_type_text(argument) for argument in arguments if argument is not type(None)]
        return " or ".join(names + (["null"] if type(None) in arguments else []))
    if typing.get_origin(annotation) is list:
        return f"list of {_type_text(arguments[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    """A default as it would be written in the YAML or on the command line."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def config_keys(sections: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, one-line description) of every key of `sections`, in the order of
    the config classes; the description is the field docstring's first sentence (two when the first
    is a fragment such as "0 = off.")."""
    rows = []
    for section in sections:
        model: type[BaseModel] = Config.model_fields[section].annotation  # type: ignore[assignment]
        for name, field in model.model_fields.items():
            sentences = re.split(r"(?<=\.)\s+", " ".join((field.description or "").split()))
            summary = sentences[0]
            for sentence in sentences[1:]:
                if len(summary) >= 40:
                    break
                summary = f"{summary} {sentence}"
            rows.append((f"{section}.{name}", _type_text(field.annotation), _default_text(field.get_default()), summary))
    return rows


def command_help(stage: str) -> str:
    """The `--help` text of a stage: usage, the config keys it reads with defaults, where the docs are."""
    sections = STAGE_SECTIONS[stage]
    rows = config_keys(sections)
    key_width = max(len(key) for key, *_ in rows)
    default_width = min(28, max(len(default) for _, _, default, _ in rows))
    lines = [
        _usage(stage),
        "",
        _SUMMARIES[stage],
        "Values come from CONFIG.yaml, then the overrides, read as YAML scalars (train.max_steps=10,",
        "model.adapter=null); an unknown key or a wrong type is an error naming it.",
        "",
        f"config keys ({', '.join(sections)}): key, default, meaning",
    ]
    current = None
    for key, type_text, default, description in rows:
        section = key.split(".")[0]
        if section != current:
            lines.append(f"  {section}:")
            current = section
        choices = f" [{type_text}]" if "|" in type_text else ""
        lines.append(f"    {key:<{key_width}}  {default:<{default_width}}  {description}{choices}")
    other = [section for section in Config.model_fields if section not in sections]
    lines += [
        "",
        f"Other sections ({', '.join(other)}) belong to the other stage and are ignored here.",
        f"Docs: {_DOCS[stage]}; each key in gqaru/config.py.",
        "`gqaru config CONFIG.yaml [key=value ...]` prints the resolved config without running anything.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Checks


def check(stage: str, config: Config) -> list[str]:
    """Every problem the config and the file system show for `stage` ("train" or "evaluate"), one
    line each; empty when the stage may start."""
    checks: list[Callable[[Config], list[str]]] = [_model_checks, _quantization_checks]
    if stage == "train":
        checks += [
            lambda c: check_shards("data.shards", c.data.shards, split="train", for_training=True),
            _resume_checks,
        ]
    elif stage == "evaluate":
        checks += [
            lambda c: check_adapter(c.model.adapter),
            lambda c: check_shards("eval.shards", c.eval.shards, split="testdev"),
        ]
    else:
        raise ValueError(f"unknown stage {stage!r} (train or evaluate)")
    checks.append(check_output)
    return [problem for run in checks for problem in run(config)]


def _build_hint(path: str, split: str) -> str:
    return f"build it with `gqaru shards build --source <GQA-ru dir or hub id> --split {split} --out {path}`"


def check_shards(key: str, value: str, *, split: str, for_training: bool = False) -> list[str]:
    """A shard dir as `gqaru shards build` writes it: the dir, a readable manifest of our format, and
    every shard file it lists (existence only; `gqaru shards inspect` verifies checksums)."""
    path = Path(value).expanduser()
    where = f"{key}={value}"
    if not path.exists():
        return [f"{where}: no such directory; {_build_hint(value, split)}"]
    if not path.is_dir():
        return [f"{where}: a file, not a shard directory; give the directory `gqaru shards build --out` wrote"]
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
            return [
                f"{where}: a GQA-ru source (parquet files), not shards; "
                f"build shards from it with `gqaru shards build --source {value} --split {split} --out shards/<name>`"
            ]
        return [f"{where}: not a shard directory (no {MANIFEST_NAME}); {_build_hint(value, split)}"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"{where}: {MANIFEST_NAME} cannot be read ({error}); rebuild: {_build_hint(value, split)}"]
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        return [
            f"{where}: {MANIFEST_NAME} has format {found!r}, this gqaru reads {MANIFEST_FORMAT!r}; "
            f"rebuild: {_build_hint(value, split)}"
        ]
    shards = manifest.get("shards") or []
    missing = [str(shard.get("file")) for shard in shards if not (path / str(shard.get("file"))).is_file()]
    if missing:
        return [
            f"{where}: {len(missing)} of {len(shards)} shard files listed in {MANIFEST_NAME} are missing "
            f"(first: {missing[0]}); rebuild: {_build_hint(value, split)}"
        ]
    if for_training and not shards:
        return [f"{where}: holds no shards (0 images were written): nothing to train on; {_build_hint(value, split)}"]
    return []


def _looks_like_a_path(value: str) -> bool:
    """A value meant as a path, not a hub id: absolute, relative with ./ ../ ~, not exactly
    owner/name, under an existing local directory (`foo/x` when ./foo exists), or under one of
    gqaru's own directories (LOCAL_DIRS)."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or os.sep != "/" and os.sep in value:
        return True
    parts = value.split("/")
    return len(parts) != 2 or parts[0] in LOCAL_DIRS or Path(parts[0]).is_dir()


def check_model_source(key: str, value: str, revision: str | None = None) -> list[str]:
    """A local model dir (with config.json) or a hub id. A hub id is let through to the loader (the
    hub or its cache answers); offline (HF_HUB_OFFLINE=1), it must be in the local cache."""
    where = f"{key}={value}"
    build = f"build a tiny model with `gqaru tiny-model --out {value}` or give a hub id like {EXAMPLE_HUB_ID}"
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return [f"{where}: a directory without config.json, not a saved model; give the directory save_pretrained wrote"]
        return []
    if path.exists():
        return [f"{where}: a file, not a model directory; give the directory save_pretrained wrote, or a hub id"]
    if _looks_like_a_path(value):
        return [f"{where}: no such directory; {build}"]
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return [f"{where}: neither a local directory nor a hub id of the form owner/name; {build}"]
    if constants.is_offline_mode() and not isinstance(try_to_load_from_cache(value, "config.json", revision=revision), str):
        return [
            f"{where}: no such local directory, and as a hub id it is not in the local hub cache while "
            f"HF_HUB_OFFLINE=1; fetch it once online (`hf download {value}`), or give a local model dir"
        ]
    return []


def _model_checks(config: Config) -> list[str]:
    return check_model_source("model.name_or_path", config.model.name_or_path, config.model.revision)


def check_adapter(value: str | None) -> list[str]:
    """A PEFT adapter dir (adapter_config.json), as training writes to runs/<run>/adapter."""
    if value is None:
        return []
    path = Path(value).expanduser()
    where = f"model.adapter={value}"
    if not path.exists():
        return [f"{where}: no such directory; give a training run's adapter dir (runs/<run>/adapter) or model.adapter=null"]
    if not (path / "adapter_config.json").is_file():
        return [f"{where}: no adapter_config.json there, not a PEFT adapter dir; give a training run's runs/<run>/adapter"]
    return []


def _flag(name: str) -> bool:
    """An accelerate environment flag, read as accelerate reads it (str_to_bool)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "y", "on", "t"}


def _quantization_checks(config: Config) -> list[str]:
    """QLoRA needs bitsandbytes and a CUDA device for this process (`gqaru.modeling` says the same at
    load time; here it is said before anything loads)."""
    if config.model.quantization != "4bit":
        return []
    where = "model.quantization=4bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"{where}: QLoRA needs the bitsandbytes package (pip install bitsandbytes), or use model.quantization=none"]
    if _flag("ACCELERATE_USE_CPU"):
        device = "the CPU (the launch config says use_cpu)"
    else:
        import torch  # only here: a second or so, paid only by runs that ask for QLoRA

        if torch.cuda.is_available():
            return []
        device = "mps" if torch.backends.mps.is_available() else "the CPU (no CUDA device here)"
    return [
        f"{where}: QLoRA (model.quantization=4bit) needs a CUDA GPU, this process would run on {device}; "
        "use model.quantization=none (LoRA in fp32/bf16) or a CUDA launch config"
    ]


def _resume_checks(config: Config) -> list[str]:
    target = config.train.resume
    if target in {"none", "latest"}:
        return []
    if not (Path(target).expanduser() / "trainer_state.json").is_file():
        return [
            f"train.resume={target}: not a checkpoint dir (no trainer_state.json); give latest, none, "
            "or a runs/<run>/checkpoints/step-NNNNNN dir"
        ]
    return []


def check_output(config: Config) -> list[str]:
    """output.dir/run_name can be created and written (nothing is created here)."""
    run_dir = config.run_dir().expanduser()
    where = f"output.dir={config.output.dir}"
    if run_dir.exists() and not run_dir.is_dir():
        return [f"output.run_name={config.output.run_name}: {run_dir} is a file; choose another output.run_name"]
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{where}: {existing} is a file, so {run_dir} cannot be created; choose another output.dir"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{where}: no write permission on {existing.resolve()}, so {run_dir} cannot be written; choose another output.dir"]
    return []
