"""The training recipe: LoRA/QLoRA fine-tuning of a LLaVA model on GQA-ru shards, on accelerate.

    accelerate launch --config_file launch/single_gpu.yaml -m gqaru.train configs/train_lora.yaml [key=value ...]
    python -m gqaru.train configs/demo_train.yaml        # one process, no launcher

One loop for a MacBook (MPS), one GPU, DDP and DeepSpeed ZeRO-2/3, CPU included:
  * image-grouped sequences (`data.questions_per_sequence`), answer-only labels, LM head on the
    answer positions only (`gqaru.modeling.answer_only_loss`);
  * the loss is the mean over every answer token of the optimizer step, across micro-batches and
    ranks (not a mean of per-batch means);
  * every rank runs the same number of optimizer steps and each question is trained once per
    epoch: steps are planned from the shards' questions before training, and a rank whose data
    ends first runs zero-weight batches so collectives stay matched;
  * the webdataset loader stays out of `accelerator.prepare` (it would split the data twice);
  * checkpoints every `train.save_every` steps, atomic, the last `train.keep_last` kept, with the
    position in the data stream; `train.resume=latest` continues exactly;
  * SIGTERM / SIGINT save a checkpoint and exit; a non-finite loss stops the run and keeps the last
    good checkpoint;
  * outputs: config.yaml, metrics.jsonl, tensorboard logs, adapter/, merged/, summary.json.

Raises (at start-up, before any step): ConfigError for a bad config (a DeepSpeed JSON whose
precision contradicts model.dtype included); ModelSetupError for QLoRA off CUDA; ShardError for
missing or inconsistent shards; accel.LaunchConfigError for a launch config's missing DeepSpeed JSON.
"""

from __future__ import annotations

# `python -m gqaru.train`: --help, config errors and pre-flight failures (gqaru.preflight) are answered
# here, in a fraction of a second, before the imports below load torch, transformers and accelerate.
if __name__ == "__main__":
    from gqaru.preflight import exit_unless_ready

    exit_unless_ready("train")

import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler

from gqaru import accel, modeling, preflight, prompts
from gqaru.collate import DropCounter, EncodedSequence, SequencePlanner, TrainingCollator, group_by_length
from gqaru.config import Config, ConfigError, save_config
from gqaru.shards import rank_sample_metas, training_pipeline

logger = logging.getLogger("gqaru.train")

TRAINABLE_WEIGHTS = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint stays."""


@dataclass
class TrainerState:
    """Where the run is: saved with every checkpoint, enough to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    micro_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed: the position in the data stream."""
    questions: int = 0
    """Questions trained so far (this rank counts its own; summaries add the ranks)."""
    tokens: int = 0
    """Tokens the model read in trained batches so far, text and image tokens (padding and the
    zero-weight batches that keep ranks in step excluded); this rank's, like `questions`."""
    elapsed: float = 0.0


@dataclass
class DataPlan:
    """What one epoch looks like, computed from the shards before any image is read."""

    sequences_per_rank: list[int]
    micro_batches_per_epoch: int
    """Micro-batches every rank runs per epoch (the largest rank's count, rounded up to whole steps)."""
    steps_per_epoch: int
    total_steps: int
    questions_per_epoch: int
    dropped: dict[str, int] = field(default_factory=dict)


def _sequence_length(sequence: Any) -> int:
    """Length to group by: the text tokens and the one `<image>` slot (every sequence has one image)."""
    return len(sequence.tokens.input_ids)


class _EncodedStream(IterableDataset):
    """Shard samples -> planned sequences (grouped by length if asked) -> encoded sequences
    (runs in DataLoader workers)."""

    def __init__(
        self,
        pipeline: Any,
        planner: SequencePlanner,
        collator: TrainingCollator,
        length_grouping: dict[str, Any] | None = None,
    ):
        self.pipeline, self.planner, self.collator = pipeline, planner, collator
        self.length_grouping = length_grouping

    def __iter__(self) -> Iterator[EncodedSequence]:
        sequences = self.planner.sequences(self.pipeline)
        if self.length_grouping:
            sequences = group_by_length(sequences, _sequence_length, **self.length_grouping)
        for sequence in sequences:
            yield self.collator.encode(sequence)


def _setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    for noisy in ("transformers", "datasets", "deepspeed", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def make_accelerator(config: Config) -> Accelerator:
    """The training Accelerator (`gqaru.accel`: right rank bookkeeping on every backend, CPU
    DeepSpeed included), with DeepSpeed's "auto" values filled from the gqaru config.

    Precision lives in one place, gqaru's `model.dtype`, and under DeepSpeed it is settled before
    the Accelerator exists: accelerate resolves the JSON's `"bf16": "auto"` from its
    `mixed_precision` while being built and hands transformers a copy of that config, which
    `from_pretrained` under ZeRO-3 `zero.Init` builds the parameters from (TRAPS.md).

    Raises:
        ConfigError: the DeepSpeed JSON fixes a precision that contradicts `model.dtype`.
    """
    run_dir = config.run_dir()
    device_type = accel.launched_device_type()
    weights_dtype = modeling.resolve_dtype(config.model.dtype, torch.device(device_type))
    kwargs: dict[str, Any] = {}
    if accel.is_deepspeed_launch():
        bf16 = weights_dtype == torch.bfloat16
        fixed = (accel.deepspeed_json() or {}).get("bf16", {}).get("enabled", "auto")
        if fixed != "auto" and fixed != bf16:
            raise ConfigError(
                f"the DeepSpeed JSON sets bf16.enabled={json.dumps(fixed)} but model.dtype={config.model.dtype} "
                f"means {weights_dtype} here: write \"bf16\": {{\"enabled\": \"auto\"}} in the JSON (it follows "
                "model.dtype) or change model.dtype"
            )
        kwargs["mixed_precision"] = "bf16" if bf16 else "no"
    accelerator = accel.make_accelerator(
        gradient_accumulation_steps=config.train.grad_accum,
        log_with="tensorboard",
        # The tracker writes into logging_dir/<its project name>: init_trackers("tensorboard") -> run_dir/tensorboard/.
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        **kwargs,
    )
    if accelerator.device.type != device_type:
        raise accel.LaunchConfigError(
            f"expected accelerate to place this process on {device_type}, it chose {accelerator.device}: "
            "precision was decided for the wrong device"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # The loader is not prepared (TRAPS.md), so fill what accelerate would read from it.
        ds_config["train_micro_batch_size_per_gpu"] = config.train.batch_size
        ds_config["gradient_accumulation_steps"] = config.train.grad_accum
        ds_config["train_batch_size"] = config.effective_batch(accelerator.num_processes)
        ds_config["gradient_clipping"] = config.train.max_grad_norm or 0.0
    return accelerator


def precision_mode(accelerator: Accelerator) -> str:
    """The mixed-precision mode in force: DeepSpeed's own (from its resolved config) or accelerate's autocast."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("bf16", {}).get("enabled") is True:
            return "DeepSpeed bf16 (fp32 master weights in the optimizer)"
        return "DeepSpeed fp32"
    return "none" if accelerator.mixed_precision == "no" else f"{accelerator.mixed_precision} autocast"


def describe_backend(accelerator: Accelerator) -> str:
    """The launch in words for the start-up summary ("single process", "DDP (gloo), 2 processes",
    "DeepSpeed ZeRO-2, 2 processes"), not accelerate's enum names."""
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes != 1 else ''}"
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", "?")
        return f"DeepSpeed ZeRO-{stage}, {processes}"
    if kind == DistributedType.NO:
        return "single process"
    if kind.value.startswith("MULTI_"):  # MULTI_GPU, MULTI_CPU, MULTI_XPU, ...: DDP
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "not initialised"
        return f"DDP ({backend}), {processes}"
    return f"{kind.value.replace('_', ' ')}, {processes}"  # FSDP, XLA, ...: accelerate's name


def _fill_deepspeed_sizes(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Resolve the ZeRO bucket sizes the JSON leaves "auto". accelerate derives them from
    `config.hidden_size`, which a LLaVA config keeps in its text_config."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    hidden = modeling.unwrap_model(model).config.text_config.hidden_size
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})
    for key, value in (
        ("reduce_bucket_size", hidden * hidden),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ("stage3_param_persistence_threshold", 10 * hidden),
    ):
        if zero.get(key) == "auto":
            zero[key] = value


def plan_data(config: Config, planner: SequencePlanner, world_size: int) -> DataPlan:
    """Sequences per rank and the steps every rank runs, from the shards' questions alone.

    Each rank reads only the json of the samples the pipeline will give it (no image decoding)
    and plans its sequences exactly as the stream will; every rank computes every rank's count
    (same inputs, same answer), so nothing needs to be communicated.
    """
    sequences_per_rank, questions, drops = [], 0, DropCounter()
    for rank in range(world_size):
        count = 0
        for meta in rank_sample_metas(config.data.shards, rank, world_size, config.data.num_workers):
            groups = planner.plan(meta["qa"], drops)
            count += len(groups)
            questions += sum(len(group) for group, _ in groups)
        sequences_per_rank.append(count)
    if min(sequences_per_rank) == 0:
        raise ConfigError(
            f"{config.data.shards}: some rank gets no training sequence ({sequences_per_rank} for {world_size} "
            "processes): use fewer processes or more data"
        )
    batch, accum = config.train.batch_size, config.train.grad_accum
    micro = max(math.ceil(count / batch) for count in sequences_per_rank)
    steps_per_epoch = math.ceil(micro / accum)
    total = config.train.max_steps or math.ceil(config.train.epochs * steps_per_epoch)
    return DataPlan(
        sequences_per_rank=sequences_per_rank,
        micro_batches_per_epoch=steps_per_epoch * accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        questions_per_epoch=questions,
        dropped=dict(drops.counts),
    )


class TrainingRun:
    """setup() -> train() -> finish(): one fine-tuning run as the config describes it."""

    def __init__(self, config: Config):
        self.config = config
        self.run_dir = config.run_dir()
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.state = TrainerState()
        self.stop_signal: int | None = None
        self.last_checkpoint_step: int | None = None
        self.trained_ids: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        config = self.config
        self.accelerator = accelerator = make_accelerator(config)
        _setup_logging(accelerator)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        set_seed(config.train.seed)  # the same LoRA init on every rank

        self.processor = modeling.load_processor(
            config.model.name_or_path, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
        prompts.tokenizer_habits(self.processor.tokenizer)  # a chat format gqaru cannot read: stop before loading weights
        self.collator = TrainingCollator(self.processor)
        self._check_image_size()
        model = modeling.load_base_model(config.model, accelerator.device, for_training=True)
        if config.train.gradient_checkpointing:
            modeling.enable_gradient_checkpointing(model)
        model = modeling.apply_lora(model, config.lora)
        self.trainable, self.total_parameters = modeling.trainable_parameters(model)
        self.trainable_names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]

        self.planner = SequencePlanner(self.processor.tokenizer, config.data.questions_per_sequence, config.train.max_seq_len)
        self.plan = plan_data(config, self.planner, self.world_size)

        _fill_deepspeed_sizes(accelerator, model)
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=accelerator.device.type == "cuda"
        )
        self.scheduler = get_scheduler(
            config.train.scheduler,
            optimizer,
            num_warmup_steps=round(config.train.warmup_ratio * self.plan.total_steps),
            num_training_steps=self.plan.total_steps,
        )
        # The scheduler is stepped by hand once per optimizer step (a prepared one would step once
        # per process), and checkpointed as a registered object.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # What the parameters are after preparation (DeepSpeed casts, ZeRO-3 partitions), not what was asked.
        self.precision = {
            "device": str(accelerator.device),
            "mixed_precision": precision_mode(accelerator),
            "parameters": modeling.parameter_report(self.model),
        }
        accelerator.register_for_checkpointing(self.scheduler)
        accelerator.register_save_state_pre_hook(self._save_trainable_only)
        accelerator.register_load_state_pre_hook(self._load_trainable_only)

        set_seed(config.train.seed + self.rank)  # dropout differs per rank, reproducibly
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml", stage="train")  # training's sections only
        accelerator.init_trackers("tensorboard", config={"lr": config.train.lr, "lora_r": config.lora.r})
        self._resume()
        self._log_startup()

    def _check_image_size(self) -> None:
        from gqaru.collate import processor_image_size

        height, width = processor_image_size(self.processor)
        wanted = self.config.data.image_size
        if wanted is not None and (height, width) != (wanted, wanted):
            raise ConfigError(
                f"data.image_size={wanted} but the processor of {self.config.model.name_or_path} produces "
                f"{height}x{width} images: set data.image_size={height} or leave it unset"
            )

    def _log_startup(self) -> None:
        config, plan, accelerator = self.config, self.plan, self.accelerator
        logger.info(
            "\n".join(
                [
                    f"gqaru train: {config.model.name_or_path} -> {self.run_dir}",
                    f"  device {accelerator.device}, {describe_backend(accelerator)}, "
                    f"mixed precision {self.precision['mixed_precision']}, quantization {config.model.quantization}",
                    f"  {accel.describe_torch_threads(config.runtime.torch_threads)}",
                    f"  parameters as prepared: {modeling.describe_parameters(self.precision['parameters'])}",
                    f"  trainable parameters {self.trainable:,} of {self.total_parameters:,} "
                    f"({100 * self.trainable / max(self.total_parameters, 1):.3f}%)",
                    f"  {plan.questions_per_epoch} questions/epoch in {sum(plan.sequences_per_rank)} sequences "
                    f"(<= {config.data.questions_per_sequence} questions per sequence; per rank {plan.sequences_per_rank})",
                    f"  image tokens per sequence {self.collator.image_tokens}, text tokens <= {config.train.max_seq_len}",
                    f"  effective batch {config.effective_batch(self.world_size)} sequences "
                    f"= {config.train.batch_size} x grad_accum {config.train.grad_accum} x {self.world_size} process(es)",
                    f"  steps per epoch {plan.steps_per_epoch}, total steps {plan.total_steps}, "
                    f"warmup {round(config.train.warmup_ratio * plan.total_steps)}, lr {config.train.lr} {config.train.scheduler}",
                    f"  dropped before training: {plan.dropped or 'none'}",
                ]
            )
        )

    # ------------------------------------------------------------------ data
    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[dict[str, Any], bool]]:
        """This rank's micro-batches of `epoch` as (batch, True), then padding up to the plan.

        Padding is the epoch's last real batch again, as (batch, False): it runs forward and
        backward with weight 0 so that collectives stay matched across ranks. Taking a batch fixed
        by the stream position (not whatever came first after a resume) keeps the RNG draws of
        dropout identical between an interrupted and an uninterrupted run.
        """
        config = self.config
        pipeline = training_pipeline(
            config.data.shards,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=config.data.num_workers,
            seed=config.train.seed,
            epoch=epoch,
            shuffle_buffer=config.data.shuffle_buffer,
        )
        length_grouping = None
        if config.data.length_grouping_batches:
            # Seeded per epoch and rank: a resumed run re-reads the epoch in the same order.
            length_grouping = {
                "batch_size": config.train.batch_size,
                "buffer_batches": config.data.length_grouping_batches,
                "seed": f"length-grouping:{config.train.seed}:{epoch}:{self.rank}",
            }
        loader = DataLoader(
            _EncodedStream(pipeline, self.planner, self.collator, length_grouping),
            batch_size=config.train.batch_size,
            num_workers=config.data.num_workers,
            collate_fn=self.collator.pad,
            persistent_workers=False,
            # Its own generator: iter(loader) draws a seed, which must not shift the global RNG that
            # dropout uses (a resumed run re-creates the loader mid-epoch).
            generator=torch.Generator().manual_seed(config.train.seed + epoch),
        )
        produced, last = 0, None
        for index, batch in enumerate(loader):
            if index >= skip:
                yield batch, True
            produced, last = produced + 1, batch
        expected = math.ceil(self.plan.sequences_per_rank[self.rank] / config.train.batch_size)
        if produced != expected:
            raise RuntimeError(
                f"rank {self.rank} read {produced} micro-batches in epoch {epoch}, the plan said {expected}: "
                "the shards changed under the run?"
            )
        for _ in range(max(produced, skip), self.plan.micro_batches_per_epoch):
            yield last, False

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        config, accelerator, plan = self.config, self.accelerator, self.plan
        state = self.state
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        progress = tqdm(
            total=plan.total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True
        )
        window = _Window()
        started = time.perf_counter() - state.elapsed
        try:
            while state.step < plan.total_steps:
                batches = self._batches(state.epoch, state.micro_in_epoch)
                while state.micro_in_epoch < plan.micro_batches_per_epoch and state.step < plan.total_steps:
                    micro_batches = [next(batches) for _ in range(config.train.grad_accum)]
                    loss_sum, stats = self._optimizer_step(micro_batches)
                    state.micro_in_epoch += config.train.grad_accum
                    state.step += 1
                    state.elapsed = time.perf_counter() - started
                    window.add(loss_sum, stats)
                    progress.update(1)
                    self._check_stop(loss_sum)
                    if state.step % config.train.log_every == 0 or state.step == plan.total_steps:
                        self._log(window, progress)
                    if config.train.save_every and state.step % config.train.save_every == 0:
                        self.save_checkpoint()
                    if self.stop_signal is not None:
                        return
                batches.close()
                if state.micro_in_epoch >= plan.micro_batches_per_epoch:
                    state.epoch += 1
                    state.micro_in_epoch = 0
        finally:
            progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _optimizer_step(self, micro_batches: list[tuple[dict[str, Any], bool]]) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step over `grad_accum` micro-batches; the loss is the mean per answer token
        over all of them on all ranks."""
        accelerator, model = self.accelerator, self.model
        device = accelerator.device
        local_tokens = sum(modeling.count_label_tokens(batch["labels"]) for batch, real in micro_batches if real)
        global_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=device), reduction="sum").item()
        # Gradients are averaged over ranks (DDP/DeepSpeed) and over micro-batches (accumulate):
        # undo both so the step's gradient is sum(loss) / all answer tokens of the step.
        scale = self.world_size * self.config.train.grad_accum / max(global_tokens, 1.0)
        loss_total = torch.zeros((), device=device)
        stats = {"questions": 0, "text_tokens": 0, "image_tokens": 0, "padding_tokens": 0, "label_tokens": local_tokens}
        for batch, real in micro_batches:
            inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "pixel_values", "labels")}
            inputs["pixel_values"] = inputs["pixel_values"].to(self._pixel_dtype())
            with accelerator.accumulate(model):
                loss_sum, _ = modeling.answer_only_loss(model, inputs)
                weight = 1.0 if real else 0.0
                accelerator.backward(loss_sum * (scale * weight))
                if accelerator.sync_gradients and self.config.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), self.config.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if real:
                loss_total = loss_total + loss_sum.detach() * weight
                for key in ("questions", "text_tokens", "image_tokens", "padding_tokens"):
                    stats[key] += batch[key]
                self.trained_ids += [(self.state.epoch, question_id) for question_id in batch["question_ids"]]
                self.state.questions += batch["questions"]
                self.state.tokens += batch["text_tokens"] + batch["image_tokens"]
        self.scheduler.step()
        return loss_total, stats

    def _pixel_dtype(self) -> torch.dtype:
        return modeling.unwrap_model(self.model).model.vision_tower.dtype

    def _check_stop(self, loss_sum: torch.Tensor) -> None:
        """Agree across ranks on stopping: a signal anywhere stops everyone; a bad loss anywhere fails."""
        flags = torch.tensor(
            [float(self.stop_signal is not None), float(not torch.isfinite(loss_sum).item())], device=self.accelerator.device
        )
        flags = self.accelerator.reduce(flags, reduction="sum")
        if flags[1] > 0:
            raise NonFiniteLoss(
                f"non-finite loss at step {self.state.step}: stopping. The last good checkpoint is kept in "
                f"{self.checkpoint_dir}; lower train.lr or check the data, then resume with train.resume=latest"
            )
        if flags[0] > 0 and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second ^C: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"\ngqaru: got {signal.Signals(signum).name}, saving a checkpoint after this step", file=sys.stderr)

    def _log(self, window: "_Window", progress: tqdm) -> None:
        accelerator = self.accelerator
        totals = accelerator.reduce(window.tensor(accelerator.device), reduction="sum").tolist()
        loss_sum, label_tokens, questions, text_tokens, image_tokens, padding, seconds = totals
        seconds = seconds / self.world_size
        record = {
            "step": self.state.step,
            "epoch": round(self.state.epoch + self.state.micro_in_epoch / self.plan.micro_batches_per_epoch, 4),
            "loss": loss_sum / max(label_tokens, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "questions_per_s": questions / max(seconds, 1e-9),
            "tokens_per_s": (text_tokens + image_tokens) / max(seconds, 1e-9),
            "padding_pct": 100 * padding / max(text_tokens + image_tokens + padding, 1),
        }
        window.reset()
        progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            q_s=f"{record['questions_per_s']:.1f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            pad=f"{record['padding_pct']:.0f}%",
        )
        accelerator.log({key: value for key, value in record.items() if key != "step"}, step=self.state.step)
        if accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {name: parameter.detach().cpu().contiguous() for name, parameter in model.named_parameters()
                if parameter.requires_grad}

    def _save_trainable_only(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        """save_state hook: write only the trainable tensors, not a multi-GB copy of the frozen base.

        DeepSpeed writes its own module and optimizer partitions (frozen parameters excluded)."""
        weights.clear()
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED and self.accelerator.is_main_process:
            save_file(self._trainable_state(), os.path.join(output_dir, TRAINABLE_WEIGHTS))

    def _load_trainable_only(self, models: list[torch.nn.Module], input_dir: str) -> None:
        """load_state hook: load the trainable tensors ourselves, strictly by name."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return
        path = os.path.join(input_dir, TRAINABLE_WEIGHTS)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{input_dir} has no {TRAINABLE_WEIGHTS}: not a gqaru checkpoint")
        tensors = load_file(path)
        model = self.accelerator.unwrap_model(models.pop())
        expected = set(self.trainable_names)
        if set(tensors) != expected:
            raise RuntimeError(
                f"{path} does not match this run's trainable parameters "
                f"(missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}): "
                "was it written with another lora/model config?"
            )
        model.load_state_dict(tensors, strict=False)

    def save_checkpoint(self) -> Path:
        """checkpoints/step-NNNNNN/, written under a temporary name and renamed when complete."""
        accelerator = self.accelerator
        final = self.checkpoint_dir / f"step-{self.state.step:06d}"
        staging = self.checkpoint_dir / f".step-{self.state.step:06d}.tmp"
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        kwargs = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        accelerator.save_state(str(staging), **kwargs)
        accelerator.wait_for_everyone()
        with open(staging / f"trained_ids_rank{self.rank}.json", "w", encoding="utf-8") as stream:
            json.dump(self.trained_ids, stream)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))
            (staging / "config.yaml").write_text((self.run_dir / "config.yaml").read_text())
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            self._prune_checkpoints()
        accelerator.wait_for_everyone()
        self.last_checkpoint_step = self.state.step
        self._truncate_metrics(self.state.step)
        logger.info("checkpoint %s", final)
        return final

    def _prune_checkpoints(self) -> None:
        checkpoints = sorted(_list_checkpoints(self.checkpoint_dir))
        for _, path in checkpoints[: -self.config.train.keep_last]:
            shutil.rmtree(path)

    def _resume(self) -> None:
        target = self.config.train.resume
        if target == "none":
            return
        if target == "latest":
            checkpoints = sorted(_list_checkpoints(self.checkpoint_dir))
            if not checkpoints:
                logger.info("train.resume=latest: no checkpoint in %s yet, starting fresh", self.checkpoint_dir)
                return
            path = checkpoints[-1][1]
        else:
            path = Path(target)
            if not (path / STATE_FILE).is_file():
                raise ConfigError(f"train.resume={target}: not a checkpoint dir (no {STATE_FILE})")
        kwargs = {"load_module_strict": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        self.accelerator.load_state(str(path), **kwargs)
        self.state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        self.trained_ids = [tuple(item) for item in json.loads((path / f"trained_ids_rank{self.rank}.json").read_text())]
        self.last_checkpoint_step = self.state.step
        # Each rank's RNG comes back from its own file (accelerate saves one per process).
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", path, self.state.step, self.state.epoch,
                    self.state.micro_in_epoch)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics lines the interrupted run wrote after the checkpoint: they are re-done."""
        path = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(f"{line}\n" for line in kept))

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        """Save adapter/ and merged/, write summary.json and trained_question_ids.tsv, print a summary."""
        accelerator, config = self.accelerator, self.config
        accelerator.wait_for_everyone()
        # Under ZeRO-3 the parameters are partitioned: every rank takes part in the gather.
        state_dict = accelerator.get_state_dict(self.model)
        unwrapped = accelerator.unwrap_model(self.model)
        trained_ids = gather_object(self.trained_ids)
        counts = torch.tensor([self.state.questions, self.state.tokens], device=accelerator.device)  # int64
        questions, tokens = (int(count) for count in accelerator.reduce(counts, "sum"))
        summary: dict[str, Any] = {}
        if accelerator.is_main_process:
            adapter_dir = modeling.save_adapter(unwrapped, self.run_dir / "adapter", state_dict=state_dict)
            merged_dir = None
            if config.train.save_merged:
                merged_dir = modeling.merge_and_export(
                    unwrapped, self.processor, self.run_dir / "merged", state_dict=state_dict, base_model_config=config.model
                )
            with open(self.run_dir / "trained_question_ids.tsv", "w", encoding="utf-8") as stream:
                stream.write("epoch\tquestion_id\n")
                stream.writelines(f"{epoch}\t{question_id}\n" for epoch, question_id in sorted(trained_ids))
            summary = {
                "steps": self.state.step,
                "epochs": self.state.epoch + self.state.micro_in_epoch / self.plan.micro_batches_per_epoch,
                "questions_trained": questions,
                "tokens_trained": tokens,
                "questions_per_epoch": self.plan.questions_per_epoch,
                "dropped": self.plan.dropped,
                "seconds": round(self.state.elapsed, 1),
                "processes": self.world_size,
                "precision": self.precision,
                "adapter": str(adapter_dir),
                "merged": str(merged_dir) if merged_dir else None,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            dropped = ", ".join(f"{count} {reason}" for reason, count in self.plan.dropped.items()) or "none"
            logger.info(
                "done: %d steps, %d questions trained in %.0f s; dropped: %s\n  adapter %s\n  merged  %s",
                self.state.step, questions, self.state.elapsed, dropped, adapter_dir, merged_dir or "(not written)",
            )
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary


class _Window:
    """Sums since the last log line: loss, label tokens, questions, text/image/padding tokens, time.

    Reduced across ranks as one float32 tensor: MPS has no float64, and a log line's rates need no
    more than float32's 7 digits.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values = [0.0] * 6
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, stats: dict[str, float]) -> None:
        keys = ("label_tokens", "questions", "text_tokens", "image_tokens", "padding_tokens")
        self.values[0] += float(loss_sum)
        for index, key in enumerate(keys, start=1):
            self.values[index] += stats[key]

    def tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([*self.values, time.perf_counter() - self.started], device=device, dtype=torch.float32)


def _list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return [(int(match.group(1)), path) for path in directory.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))]


def main(argv: list[str] | None = None) -> int:
    config = preflight.command_line("train", sys.argv[1:] if argv is None else argv)
    if isinstance(config, int):
        return config
    accel.pin_torch_threads(config.runtime.torch_threads)
    run = TrainingRun(config)
    try:
        run.setup()
        with logging_redirect_tqdm():  # log lines (checkpoints, warnings) above the progress bar, not into it
            run.train()
    except (
        ConfigError, modeling.ModelSetupError, prompts.ChatFormatError, accel.RankBookkeepingError, accel.LaunchConfigError
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if run.stop_signal is not None:
        if run.last_checkpoint_step != run.state.step:
            run.save_checkpoint()
        print(f"gqaru: stopped at step {run.state.step}; continue with train.resume=latest", file=sys.stderr)
        return 128 + int(run.stop_signal)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
