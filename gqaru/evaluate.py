"""Sharded, batched evaluation of a LLaVA model on GQA-ru testdev shards.

    accelerate launch --config_file launch/single_gpu.yaml -m gqaru.evaluate configs/eval_testdev.yaml [key=value ...]
    python -m gqaru.evaluate configs/demo_eval.yaml        # one process, no launcher

What it does, in order:
  * selects `eval.max_samples` questions (or all) with `gqaru.sources.select_question_ids` over the
    sorted question ids of `eval.shards`: the same rule and seed as shard building, so the
    selection depends on nothing but (ids, max_samples, seed) — not on process count or batch size;
  * deals the images to processes round-robin (`iter_eval_samples`); data never goes through
    `accelerator.prepare` (it would split it a second time) and the model is not prepared either
    (nothing is trained: it is loaded whole straight onto `accelerator.device`, under a DeepSpeed
    ZeRO-3 launch too);
  * answers each question as lmms-eval's `gqa_ru` task with the `llava_hf` model does: greedy, at
    most `eval.max_new_tokens` new tokens, stopping at the tokenizer's eos only (for Gemma `<eos>`,
    not `<end_of_turn>`), `eval.batch_size` questions per `generate` call, batches spanning images,
    with image-prefix KV reuse (below);
  * gathers every process's records, checks that each selected question was answered exactly once,
    and writes into `config.run_dir()`: config.yaml (resolved), predictions.jsonl (sorted by id:
    id, imageId, question, answer, prediction, correct, types), metrics.json
    (`gqaru.metrics.compute_metrics` plus a "run" block: processes, batch size, timings) and, with
    `eval.report`, report.md / report.html / the chart (`gqaru.report.write_report`).

Image-prefix KV reuse. Every prompt of an image starts with the same tokens: `<bos>`,
`<start_of_turn>user\\n` and the image tokens. That prefix (everything up to and including the last
image token) runs ONCE per image, vision tower included, with `use_cache=True` and the LM head on
its last position only. A batch's cache is the per-layer concatenation of its rows' image prefixes;
each row is laid out as prefix + left padding + question suffix, with attention mask 0 on the
padding, and `generate(input_ids=<full rows>, attention_mask=..., cache=...)` runs without
`pixel_values`: generate sees the cache length, feeds only the suffix columns, and derives
positions as `cumsum(attention_mask) - 1`, so a question's suffix gets positions P, P+1, ... (P =
prefix length) exactly as in an unpadded prompt, whatever padding sits between. transformers 5.24
takes the cache as `cache=` (`past_key_values=` is deprecated) and extends it in place, so each
batch gets a freshly built cache. Answers are identical to the reference loop, one plain `generate`
with the processor's inputs per question (tests/test_evaluate.py, on the replica of the real
checkpoint and on the tiny model). A text model with
sliding-window layers cannot take a prefix cache this way; such a model falls back to plain
batched `generate` with `pixel_values`.

The prediction is the decoded new tokens up to eos (special tokens skipped) with surrounding
whitespace stripped: the number lmms-eval would print for the same model and questions. The headline
rule itself does not strip (gqaru.metrics); stripping the generated text is the producer's job, as
in lmms-eval's task loop. Each record also keeps `prediction_at_end_of_turn`, the same tokens cut at
the first end-of-turn token of the model's template (`<end_of_turn>` for Gemma; what a chat-style stop
would give), scored as a second, labelled figure.
"""

from __future__ import annotations

# `python -m gqaru.evaluate`: --help, config errors and pre-flight failures (gqaru.preflight) are answered
# here, in a fraction of a second, before the imports below load torch, transformers and accelerate.
if __name__ == "__main__":
    from gqaru.preflight import exit_unless_ready

    exit_unless_ready("evaluate")

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerBase, ProcessorMixin

from gqaru import accel, modeling, preflight
from gqaru.collate import GenerationCollator, TrainingCollator, generation_prompt_ids
from gqaru.config import Config, save_config
from gqaru.metrics import compute_metrics, exact_match, write_json, write_predictions
from gqaru.prompts import ChatFormatError, tokenizer_habits
from gqaru.report import error_analysis, write_report
from gqaru.shards import (
    ShardError,
    iter_eval_metas,
    iter_eval_samples,
    list_question_ids,
    question_rows,
    read_manifest,
)
from gqaru.sources import SEED_REPORT, seed_report_rows, select_question_ids

logger = logging.getLogger("gqaru.evaluate")

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


class EvaluationError(RuntimeError):
    """An evaluation that cannot give a trustworthy result: says what went wrong and where."""


# --------------------------------------------------------------------------------------------
# Answering


@dataclass
class ImageEntry:
    """One image of the stream. `image` is dropped once its prefix is encoded (memory stays flat)."""

    image_id: str
    image: Image.Image | None
    prefix_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer (keys, values), each (1, kv_heads, prefix_len, head_dim), once encoded."""


@dataclass(frozen=True)
class Answer:
    """A generated answer, read two ways."""

    prediction: str
    """As lmms-eval reads it (the headline): up to eos, special tokens skipped, stripped."""
    at_end_of_turn: str
    """Cut at the first end-of-turn token as well (a secondary, labelled figure; not lmms-eval's)."""


@dataclass
class PendingQuestion:
    """A question waiting for its answer: its output record so far, its image, its prompt ids."""

    record: dict[str, Any]
    image: ImageEntry
    prompt_ids: list[int]
    """The whole prompt, `<image>` still a single token."""


class Answerer:
    """Greedy answers for batches of questions; the vision tower runs once per image.

    `reuse_image_prefix=True` (the default) runs each image's prefix once and generates from its KV
    cache (see the module docstring); False runs one plain `generate` with `pixel_values` per batch
    (the reference path, and the fallback for models whose cache cannot take a prefix).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: ProcessorMixin,
        *,
        max_new_tokens: int,
        reuse_image_prefix: bool = True,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.collator = GenerationCollator(processor)
        layout = TrainingCollator(processor)
        self.image_token_id: int = layout.image_token_id
        self.image_tokens: int = layout.image_tokens
        self.pad_id: int = layout.pad_id
        base = modeling.unwrap_model(model)
        self.model_config = base.config
        self.device = base.device
        self.pixel_dtype = base.model.vision_tower.dtype
        self.generation_config = self._generation_config(max_new_tokens)
        self.eos_id: int = self.generation_config.eos_token_id
        self.end_of_turn_id: int = tokenizer_habits(self.tokenizer).end_of_turn_id
        self.reuse_image_prefix = reuse_image_prefix and self._cache_takes_prefix()
        if reuse_image_prefix and not self.reuse_image_prefix:
            logger.warning(
                "the text model has sliding-window layers: image-prefix KV reuse is off, every batch runs the "
                "vision tower through plain generate"
            )
        probe = generation_prompt_ids(self.tokenizer, "?")
        self.prefix_ids: list[int] = probe[: self._end_of_image(probe)]
        """The tokens every prompt starts with, `<image>` a single token: bos, user turn, image slot."""
        self.expanded_prefix_ids: list[int] = []
        """The same with the image slot expanded to `image_tokens` tokens: what the model sees."""
        for token in self.prefix_ids:
            self.expanded_prefix_ids += [token] * self.image_tokens if token == self.image_token_id else [token]

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """lmms-eval's llava_hf settings: greedy, at most `max_new_tokens`, stop at the tokenizer's eos
        only (for Gemma `<eos>`, not `<end_of_turn>`), eos also as the pad id."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise EvaluationError("the tokenizer has no eos token: generation would never stop")
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=eos,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def _cache_takes_prefix(self) -> bool:
        """Whether a DynamicCache for this model is all full-attention layers (no sliding windows)."""
        cache = DynamicCache(config=self.model_config)
        return not any(getattr(layer, "is_sliding", False) for layer in cache.layers)

    def split_prompt(self, prompt_ids: list[int]) -> int:
        """Where the image prefix of a prompt ends (one past its last `<image>` token).

        Raises:
            EvaluationError: the prompt has no image slot, or its prefix differs from earlier ones
                (the chat template would then not give one shared prefix per image).
        """
        cut = self._end_of_image(prompt_ids)
        if prompt_ids[:cut] != self.prefix_ids:
            raise EvaluationError(f"prompts do not share one image prefix: {prompt_ids[:cut]} != {self.prefix_ids}")
        return cut

    def _end_of_image(self, prompt_ids: list[int]) -> int:
        if self.image_token_id not in prompt_ids:
            raise EvaluationError("the generation prompt has no <image> token: the chat template dropped it")
        return len(prompt_ids) - prompt_ids[::-1].index(self.image_token_id)

    @torch.no_grad()
    def encode_prefixes(self, images: Sequence[ImageEntry]) -> None:
        """Run the shared prefix of `images` (vision tower + prefill) in one forward; store each cache."""
        prefix = torch.tensor([self.expanded_prefix_ids] * len(images), device=self.device)  # (I, P)
        pixel_values = self.processor.image_processor(images=[entry.image for entry in images], return_tensors="pt")[
            "pixel_values"
        ].to(self.device, self.pixel_dtype)
        output = self.model(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            pixel_values=pixel_values,
            use_cache=True,
            logits_to_keep=1,  # the prefix's logits are never used; skip the LM head over P x vocab
        )
        layers = [(keys, values) for keys, values, *_ in output.cache]
        for index, entry in enumerate(images):
            entry.prefix_cache = [(keys[index : index + 1], values[index : index + 1]) for keys, values in layers]
            entry.image = None

    @torch.no_grad()
    def answer(self, batch: Sequence[PendingQuestion]) -> list[Answer]:
        """The answers of a batch, in its order."""
        if self.reuse_image_prefix:
            # Images not encoded yet, each once (an image's questions share one ImageEntry object).
            new_images = list({id(item.image): item.image for item in batch if item.image.prefix_cache is None}.values())
            if new_images:
                self.encode_prefixes(new_images)
            generated, prompt_length = self._generate_from_prefixes(batch)
        else:
            generated, prompt_length = self._generate_plain(batch)
        return [self.decode(row) for row in generated[:, prompt_length:].tolist()]

    def decode(self, new_tokens: list[int]) -> Answer:
        """lmms-eval's reading of the generated tokens, and the end-of-turn reading beside it.

        The reference: the tokens up to the first eos (what follows in a batch is padding), decoded
        with special tokens skipped, stripped. The secondary reading also stops at the first
        end-of-turn token of the template (`<end_of_turn>` for Gemma): what stopping generation there
        would have given (greedy decoding makes it a prefix of the same tokens).
        """
        if self.eos_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(self.eos_id)]
        at_end_of_turn = new_tokens
        if self.end_of_turn_id in new_tokens:
            at_end_of_turn = new_tokens[: new_tokens.index(self.end_of_turn_id)]
        return Answer(
            prediction=self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
            at_end_of_turn=self.tokenizer.decode(at_end_of_turn, skip_special_tokens=True).strip(),
        )

    def _generate_from_prefixes(self, batch: Sequence[PendingQuestion]) -> tuple[torch.Tensor, int]:
        prefix = torch.tensor(self.expanded_prefix_ids)
        suffixes = [item.prompt_ids[self.split_prompt(item.prompt_ids) :] for item in batch]
        prefix_length, suffix_length = len(prefix), max(len(suffix) for suffix in suffixes)
        input_ids = torch.full((len(batch), prefix_length + suffix_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)  # (B, P + S): prefix, left padding, suffix
        input_ids[:, :prefix_length] = prefix
        attention_mask[:, :prefix_length] = 1
        for row, suffix in enumerate(suffixes):
            input_ids[row, input_ids.shape[1] - len(suffix) :] = torch.tensor(suffix)
            attention_mask[row, input_ids.shape[1] - len(suffix) :] = 1
        layer_count = len(batch[0].image.prefix_cache)
        cache = DynamicCache(
            [
                (
                    torch.cat([item.image.prefix_cache[layer][0] for item in batch]),
                    torch.cat([item.image.prefix_cache[layer][1] for item in batch]),
                )
                for layer in range(layer_count)
            ],
            config=self.model_config,
        )
        generated = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            cache=cache,
            generation_config=self.generation_config,
        )
        return generated, input_ids.shape[1]

    def _generate_plain(self, batch: Sequence[PendingQuestion]) -> tuple[torch.Tensor, int]:
        inputs = self.collator([{"image": item.image.image, "question": item.record["question"]} for item in batch])
        inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.pixel_dtype)
        generated = self.model.generate(**inputs, generation_config=self.generation_config)
        return generated, inputs["input_ids"].shape[1]


def pending_questions(
    samples: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> Iterator[PendingQuestion]:
    """Shard samples -> one PendingQuestion per question, an image's questions in a row."""
    for sample in samples:
        meta = sample["meta"]
        entry = ImageEntry(image_id=str(meta["imageId"]), image=sample["image"])
        for qa in meta["qa"]:
            record = {
                "id": str(qa["id"]),
                "imageId": entry.image_id,
                "question": qa["question"],
                "answer": qa["answer"],
                "types": qa.get("types", {}),
            }
            yield PendingQuestion(record, entry, generation_prompt_ids(tokenizer, qa["question"]))


def batched(items: Iterable[PendingQuestion], batch_size: int) -> Iterator[list[PendingQuestion]]:
    """Consecutive batches of `batch_size` (the last may be smaller); batches span images."""
    batch: list[PendingQuestion] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict(
    answerer: Answerer,
    samples: Iterable[dict[str, Any]],
    batch_size: int,
    progress: tqdm | None = None,
) -> list[dict[str, Any]]:
    """Answer every question of `samples`; records carry prediction and correct (headline rule)."""
    records = []
    for batch in batched(pending_questions(samples, answerer.tokenizer), batch_size):
        for item, answer in zip(batch, answerer.answer(batch)):
            question = item.record
            records.append(
                {
                    "id": question["id"],
                    "imageId": question["imageId"],
                    "question": question["question"],
                    "answer": question["answer"],
                    "prediction": answer.prediction,
                    "correct": exact_match(answer.prediction, question["answer"]),
                    "prediction_at_end_of_turn": answer.at_end_of_turn,
                    "types": question["types"],
                }
            )
        if progress is not None:
            progress.update(len(batch))
    return records


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class EvaluationResult:
    """What a run produced (complete on the main process; other ranks get their own share only)."""

    records: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    paths: dict[str, Path] = field(default_factory=dict)


def select_questions(config: Config) -> list[str]:
    """The evaluated question ids: the seeded selection over every id in the shards, or the seed
    report's rows (`eval.selection=seed-report`).

    Raises:
        ShardError: no questions; or for seed-report, shards of another split, or shards that
            miss some of the named rows (built from a subset, or rows rejected at build time).
    """
    if config.eval.selection == SEED_REPORT:
        return _seed_report_questions(config.eval.shards)
    max_samples = None if config.eval.max_samples == "all" else int(config.eval.max_samples)
    ids = list_question_ids(config.eval.shards)
    if not ids:
        raise ShardError(f"eval.shards={config.eval.shards} holds no questions")
    return select_question_ids(ids, max_samples, config.eval.seed)


def describe_eval_selection(config: Config) -> str:
    if config.eval.selection == SEED_REPORT:
        return "seed-report: the seed report's 300 testdev rows"
    return f"max_samples={config.eval.max_samples}, seed={config.eval.seed}"


def _seed_report_questions(shards_dir: str) -> list[str]:
    manifest = read_manifest(shards_dir)
    split, total_rows = manifest["split"], manifest["selection"].get("source_rows")
    if split != "testdev" or total_rows is None:
        raise ShardError(
            f"eval.selection=seed-report needs testdev shards built by this gqaru (they record the source's row "
            f"count); {shards_dir} holds {split} shards{'' if total_rows else ' without a row count: rebuild them'}"
        )
    wanted = seed_report_rows(split, total_rows)
    available = question_rows(shards_dir)
    missing = [row for row in wanted if row not in available]
    if missing:
        raise ShardError(
            f"eval.selection=seed-report: {len(missing)} of its {len(wanted)} rows are not in {shards_dir} "
            f"(e.g. rows {missing[:5]}); build the testdev shards over the whole split or with "
            "`--selection seed-report`, and see manifest.json's `rejected` for rows the build skipped"
        )
    return sorted(available[row] for row in wanted)


def rank_question_count(shards_dir: str, selected: Iterable[str], rank: int, world_size: int) -> int:
    """How many selected questions `iter_eval_samples` deals to `rank` (json members only; for the bar)."""
    metas = iter_eval_metas(shards_dir, question_ids=selected, rank=rank, world_size=world_size)
    return sum(len(meta["qa"]) for meta in metas)


def check_complete(records: Sequence[dict[str, Any]], selected: Sequence[str]) -> None:
    """Each selected question answered exactly once, nothing else.

    Raises:
        EvaluationError: duplicates, missing or unexpected question ids (with examples).
    """
    seen: dict[str, int] = {}
    for record in records:
        seen[record["id"]] = seen.get(record["id"], 0) + 1
    duplicates = sorted(question_id for question_id, count in seen.items() if count > 1)
    missing = sorted(set(selected) - set(seen))
    unexpected = sorted(set(seen) - set(selected))
    if duplicates or missing or unexpected:
        raise EvaluationError(
            f"the gathered predictions do not cover the {len(selected)} selected questions exactly once: "
            f"{len(duplicates)} answered more than once {duplicates[:5]}, {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} not selected {unexpected[:5]} (are the shards the same on every process?)"
        )


def gallery_images(shards_dir: str, records: Sequence[dict[str, Any]]) -> dict[str, Image.Image]:
    """The images the report's error gallery shows, read again from the shards (a few dozen at most).

    Re-reading them after the run keeps memory flat: no image is held while generating.
    """
    wanted = [example["id"] for example in error_analysis(records)["gallery"]]
    if not wanted:
        return {}
    return {sample["key"]: sample["image"] for sample in iter_eval_samples(shards_dir, question_ids=wanted)}


def _setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    for noisy in ("transformers", "datasets", "accelerate", "torch.distributed", "pymorphy3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def evaluate(
    config: Config, *, reuse_image_prefix: bool | None = None, accelerator: Accelerator | None = None
) -> EvaluationResult:
    """Run one evaluation as configured; every process calls it. `reuse_image_prefix` overrides
    `eval.reuse_image_prefix`.

    Raises:
        ShardError: `eval.shards` is missing or not a shard dir.
        ModelSetupError: the model cannot run here (e.g. 4-bit off CUDA).
        EvaluationError: the gathered predictions miss or repeat a selected question.
    """
    accelerator = accelerator or accel.make_accelerator()
    _setup_logging(accelerator)
    run_dir = config.run_dir()
    started = time.perf_counter()
    selected = select_questions(config)
    rank, world_size = accelerator.process_index, accelerator.num_processes

    processor = modeling.load_processor(
        config.model.name_or_path, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    )
    tokenizer_habits(processor.tokenizer)  # a chat format gqaru cannot read: stop before loading weights
    model = modeling.load_for_inference(config.model, accelerator.device)
    if accelerator.is_main_process:  # only once the model is loaded: a run that cannot start leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE, stage="evaluate")  # evaluation's sections only
    if reuse_image_prefix is None:
        reuse_image_prefix = config.eval.reuse_image_prefix
    answerer = Answerer(
        model, processor, max_new_tokens=config.eval.max_new_tokens, reuse_image_prefix=reuse_image_prefix
    )
    if accelerator.is_main_process:
        logger.info(
            "evaluating %s%s on %d questions of %s (%s): %d process(es), batch %d, "
            "%d image tokens per image, image-prefix KV reuse %s; %s",
            config.model.name_or_path,
            f" + adapter {config.model.adapter}" if config.model.adapter else "",
            len(selected),
            config.eval.shards,
            describe_eval_selection(config),
            world_size,
            config.eval.batch_size,
            answerer.image_tokens,
            "on" if answerer.reuse_image_prefix else "off",
            accel.describe_torch_threads(config.runtime.torch_threads),
        )

    samples = iter_eval_samples(config.eval.shards, question_ids=selected, rank=rank, world_size=world_size)
    progress = tqdm(
        total=rank_question_count(config.eval.shards, selected, rank, world_size),
        unit="q",
        desc=f"evaluate (rank 0 of {world_size})" if world_size > 1 else "evaluate",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    generation_started = time.perf_counter()
    with logging_redirect_tqdm():  # warnings while generating go above the bar, not into its line
        local_records = predict(answerer, samples, config.eval.batch_size, progress)
    progress.close()
    local_seconds = time.perf_counter() - generation_started

    # The last collectives of the run: every rank gets every record and checks them, so a gap
    # stops all ranks alike; afterwards only the main process works (writing), nobody waits on it.
    records = gather_object(local_records)
    seconds_per_rank = gather_object([local_seconds])
    check_complete(records, selected)
    if not accelerator.is_main_process:
        return EvaluationResult(records=local_records, metrics=None)

    records.sort(key=lambda record: record["id"])
    generation_seconds = max(seconds_per_rank)
    metrics = compute_metrics(records)
    metrics["run"] = {
        "model": config.model.name_or_path,
        "adapter": config.model.adapter,
        "shards": config.eval.shards,
        "selection": describe_eval_selection(config),
        "questions": len(records),
        "processes": world_size,
        "batch_size": config.eval.batch_size,
        "max_new_tokens": config.eval.max_new_tokens,
        "image_prefix_reuse": answerer.reuse_image_prefix,
        "device": str(accelerator.device),
        "dtype": str(modeling.unwrap_model(model).dtype).removeprefix("torch."),
        "generation_seconds": round(generation_seconds, 3),
        "questions_per_second": round(len(records) / max(generation_seconds, 1e-9), 3),
    }
    paths = {
        "config": run_dir / CONFIG_FILE,
        "predictions": write_predictions(run_dir / PREDICTIONS_FILE, records),
    }
    if config.eval.report:
        images = gallery_images(config.eval.shards, records)
        paths.update(write_report(run_dir, records, metrics, images=images))
    metrics["run"]["total_seconds"] = round(time.perf_counter() - started, 3)
    paths["metrics"] = write_json(run_dir / METRICS_FILE, metrics)
    print(summary(metrics, paths), flush=True)
    return EvaluationResult(records=records, metrics=metrics, paths=paths)


def summary(metrics: dict[str, Any], paths: dict[str, Path]) -> str:
    """The closing paragraph: headline with interval, n, time, speed, where the files are."""
    headline, run = metrics["headline"], metrics["run"]
    low, high = headline["interval"]
    files = ", ".join(str(path) for name, path in paths.items() if name != "chart")
    return (
        f"{headline['label']}: {100 * headline['accuracy']:.2f}% (95% CI {100 * low:.1f}–{100 * high:.1f}), "
        f"{headline['correct']}/{headline['n']} questions; lemma match (secondary) "
        f"{100 * metrics['lemma_match']['accuracy']:.2f}%; cut at the end of turn (secondary, not lmms-eval) "
        f"{100 * metrics['end_of_turn_stop']['accuracy']:.2f}%.\n"
        f"{run['processes']} process(es), batch {run['batch_size']}, image-prefix KV reuse "
        f"{'on' if run['image_prefix_reuse'] else 'off'}: generation {run['generation_seconds']:.1f} s, "
        f"{run['questions_per_second']:.1f} questions/s; total {run['total_seconds']:.1f} s.\n"
        f"Wrote {files}"
    )


def main(argv: list[str] | None = None) -> int:
    config = preflight.command_line("evaluate", sys.argv[1:] if argv is None else argv)
    if isinstance(config, int):
        return config
    accel.pin_torch_threads(config.runtime.torch_threads)
    accelerator = None
    try:
        accelerator = accel.make_accelerator()
        evaluate(config, accelerator=accelerator)
    except (
        ShardError, modeling.ModelSetupError, ChatFormatError, accel.RankBookkeepingError, accel.LaunchConfigError,
        FileNotFoundError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if accelerator is not None:
            accelerator.end_training()  # closes the process group of a multi-process launch
    return 0


if __name__ == "__main__":
    sys.exit(main())
