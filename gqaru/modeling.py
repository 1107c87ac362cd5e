"""Model setup: precision policy, processor repair, base model (optionally 4-bit), LoRA, export.

Plain functions: nothing here knows about `accelerate`; the training loop calls them, then
prepares what they return.

    dtype = resolve_dtype(config.model.dtype, device)
    processor = load_processor(config.model.name_or_path, revision=config.model.revision)
    model = load_base_model(config.model, device, for_training=True)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = apply_lora(model, config.lora)                      # a PeftModel
    loss_sum, label_tokens = answer_only_loss(model, batch)     # LM head on answer positions only
    save_adapter(model, run_dir / "adapter")
    merge_and_export(model, processor, run_dir / "merged", base_model_config=config.model)

    model = load_for_inference(config.model, device)            # evaluation: base (+ adapter)

Choices worth knowing (each explained where it is made):
* fp16 is never used: Gemma overflows in it. CUDA: bf16; MPS and CPU: fp32 unless bf16 is asked.
* QLoRA (4-bit nf4) runs on CUDA only; elsewhere `load_base_model` refuses at start-up. Tests
  reach the 4-bit path on CPU through `allow_cpu_quantization=True`, with the AVX512-BF16 repack
  switched off (it silently corrupts LoRA gradients after an eval forward).
* `prepare_model_for_kbit_training` is not called (see `load_base_model`).
* LoRA targets are a regex over full module names, so CLIP's q/k/v stay untouched by default.
* The loss runs the model's own forward with `logits_to_keep=<bool mask>`: the LM head sees only
  the positions that predict a label, and DDP/DeepSpeed wrappers still see a normal forward.
* Merging never touches the training model: it folds the adapter into a separate copy of the
  base, and for a 4-bit base into the base reloaded unquantized.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    ProcessorMixin,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from gqaru.config import LoraConfig, ModelConfig
from gqaru.files import atomic_directory
from gqaru.prompts import VICUNA_TEMPLATE

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value of positions that are not trained (prompt, image, padding)."""

QUANTIZATION_SKIP_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
"""Modules that stay unquantized under QLoRA. transformers 5.x matches these from a module-name
boundary, so the full prefixes are needed (the 4.x idiom "vision_tower" skips nothing)."""

PROJECTOR_MODULE = "multi_modal_projector"

IMAGE_PROCESSOR_BACKEND = "pil"
"""transformers 5 picks the torchvision image processor when torchvision is installed and the PIL one
otherwise, and their pixels differ (resize and crop kernels). The real checkpoints were trained and
scored with the PIL/numpy `CLIPImageProcessor` of transformers 4.x, so the PIL backend is asked for by
name: the same pixels whatever else is installed."""

# Extra tokens a vision tower puts in front of its patch features (CLIP: the class token).
# "default" feature selection drops exactly one of them.
_ADDITIONAL_IMAGE_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


class ModelSetupError(RuntimeError):
    """A model setting that cannot run here: says which setting, why, and what to use instead."""


# --------------------------------------------------------------------------------------------------
# Precision


def _probe_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (CUDA: Ampere or newer; MPS: a real op)."""
    if device.type == "cuda":
        # Emulated bf16 (pre-Ampere) is correct but slower than fp32: not worth choosing.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            return False
        try:
            probe = torch.ones(2, dtype=torch.bfloat16, device=device)
            return bool((probe @ probe).item() == 2.0)
        except (RuntimeError, TypeError):  # MPS before macOS 14 has no bf16 kernels
            return False
    return True  # CPU (and other backends) compute bf16, if slowly


def resolve_dtype(
    requested: Literal["auto", "fp32", "bf16"] | str,
    device: torch.device | str,
    *,
    bf16_supported: bool | None = None,
) -> torch.dtype:
    """The parameter/compute dtype for `model.dtype` on `device`.

    | device | auto                          | fp32 | bf16                        |
    |--------|-------------------------------|------|-----------------------------|
    | cuda   | bf16 (fp32 before Ampere)     | fp32 | bf16 (error if unsupported) |
    | mps    | fp32                          | fp32 | bf16 (error if unsupported) |
    | cpu    | fp32                          | fp32 | bf16                        |

    Never fp16: Gemma overflows to NaN in it. MPS defaults to fp32 because bf16 there is emulated
    on M1/M2 and needs macOS 14. `bf16_supported` overrides the device probe (tests of the table).

    Raises:
        ValueError: `requested` is not auto, fp32 or bf16 (fp16 is refused with the reason).
        ModelSetupError: bf16 asked on a device that cannot run it.
    """
    device = torch.device(device)
    if requested == "fp16":
        raise ValueError("model.dtype=fp16 is not supported: Gemma overflows to NaN in fp16; use bf16 or fp32")
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"model.dtype must be auto, fp32 or bf16, got {requested!r}")
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return torch.float32
    supported = _probe_bf16(device) if bf16_supported is None else bf16_supported
    if requested == "bf16" and not supported:
        raise ModelSetupError(f"model.dtype=bf16 was asked but {device.type} cannot compute in bf16 here; use model.dtype=fp32")
    if not supported:  # auto on a CUDA card without native bf16
        logger.warning("this CUDA device has no native bf16: using fp32 (fp16 is never used for Gemma)")
        return torch.float32
    return torch.bfloat16


# --------------------------------------------------------------------------------------------------
# Processor


def image_tokens_per_image(config_or_processor: LlavaConfig | ProcessorMixin) -> int:
    """How many `<image>` tokens (= image features) one image takes.

    From a `LlavaConfig` (what the vision tower really yields):
    (image_size // patch_size)^2 + the tower's extra tokens (CLIP: 1 class token), minus 1 for
    the "default" strategy, which drops the class token. 576 for CLIP ViT-L/14-336.
    From a processor: the same rule over the processor's own patch size and output image size.
    """
    if isinstance(config_or_processor, LlavaConfig):
        vision = config_or_processor.vision_config
        count = (vision.image_size // vision.patch_size) ** 2 + _additional_image_tokens(vision)
        if config_or_processor.vision_feature_select_strategy == "default":
            count -= 1
        return count
    from gqaru.collate import image_token_count, processor_image_size

    height, width = processor_image_size(config_or_processor)
    return image_token_count(config_or_processor, height, width)


def _additional_image_tokens(vision_config: Any) -> int:
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in _ADDITIONAL_IMAGE_TOKENS:
        raise ModelSetupError(
            f"unknown vision tower type {model_type!r}: cannot tell how many extra tokens it adds to the "
            f"patch features (known: {sorted(_ADDITIONAL_IMAGE_TOKENS)})"
        )
    return _ADDITIONAL_IMAGE_TOKENS[model_type]


def load_processor(
    name_or_path: str | os.PathLike[str], *, revision: str | None = None, trust_remote_code: bool = False
) -> ProcessorMixin:
    """The model's `LlavaProcessor`, repaired so its `<image>` expansion matches the vision tower,
    with the image processor's backend pinned (`IMAGE_PROCESSOR_BACKEND`).

    Processor configs on the hub predate transformers 5 and often carry `patch_size: null` (the
    processor then fails with `'int' and 'NoneType'`) or no feature-selection strategy (then it
    counts one token too many). The three values are set from the model's own config: patch size
    from the vision config, the strategy from the LLaVA config, the extra-token count from the
    tower type (CLIP: 1). A pad token is set (eos) when the tokenizer has none, and a tokenizer
    without a chat template gets lmms-eval's Vicuna prompt (`prompts.VICUNA_TEMPLATE`).

    Raises:
        ModelSetupError: the config is not a LLaVA config, or the processor's image size gives a
            different token count than the vision tower (the model would reject every batch).
    """
    name_or_path = str(name_or_path)
    model_config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if not isinstance(model_config, LlavaConfig):
        raise ModelSetupError(f"{name_or_path} is a {type(model_config).__name__}, not a LLaVA model config")
    processor = AutoProcessor.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code, backend=IMAGE_PROCESSOR_BACKEND
    )

    vision = model_config.vision_config
    wanted = {
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": model_config.vision_feature_select_strategy,
        "num_additional_image_tokens": _additional_image_tokens(vision),
    }
    for name, value in wanted.items():
        current = getattr(processor, name, None)
        if current is not None and current != value:
            # Hub processor configs written before transformers 5 lack these keys (the loader's
            # defaults then show here): deepvk's has none of the three.
            logger.info("processor %s=%r -> %r, from the model config", name, current, value)
        setattr(processor, name, value)

    expected = image_tokens_per_image(model_config)
    produced = image_tokens_per_image(processor)
    if produced != expected:
        raise ModelSetupError(
            f"{name_or_path}: the processor makes {produced} image tokens per image but the vision tower yields "
            f"{expected} (vision image_size {vision.image_size}, patch {vision.patch_size}); the image processor's "
            "size/crop_size must equal the vision config's image_size"
        )

    tokenizer = processor.tokenizer
    if not tokenizer.chat_template:
        # As the reference does: lmms-eval's llava_hf renders with the tokenizer's template, else its Vicuna one.
        tokenizer.chat_template = VICUNA_TEMPLATE
        logger.warning("%s has no chat template: using lmms-eval's Vicuna prompt (USER: ... ASSISTANT: ...</s>)", name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("the tokenizer has no pad token: padding with eos %r (padding is masked out)", tokenizer.eos_token)
    return processor


# --------------------------------------------------------------------------------------------------
# Base model


def _quantization_config() -> BitsAndBytesConfig:
    """QLoRA's 4-bit setting: nf4, double quantization, bf16 compute; vision side and head unquantized."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
    )


def _check_quantization_possible(device: torch.device, allow_cpu_quantization: bool) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and allow_cpu_quantization:
        return
    raise ModelSetupError(
        f"QLoRA (model.quantization=4bit) needs a CUDA GPU: bitsandbytes 4-bit training is not supported on "
        f"{device.type} here; use model.quantization=none (LoRA in fp32/bf16)"
    )


def disable_cpu_4bit_repack(model: torch.nn.Module) -> int:
    """Switch off bitsandbytes' AVX512-BF16 weight repacking on every 4-bit Linear; returns how many.

    On CPUs with AVX512-BF16, an eval-mode forward without grad repacks each 4-bit weight into a
    CPU-specific layout, and every later backward through it gives silently wrong LoRA gradients
    (relative error 0.7-0.93, measured: the repacked path runs `gemv_4bit`, which has no autograd
    kernel). With the flag off the plain kernels are used throughout. No effect on CUDA (the
    repack is a CPU-only path). Must run before the first forward; the loader calls it.
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise ModelSetupError("a 4-bit weight was already repacked for CPU: disable the repack right after loading")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the (possibly PEFT-wrapped) model holds bitsandbytes 4-bit weights."""
    return bool(getattr(unwrap_model(model), "is_loaded_in_4bit", False))


def load_base_model(
    config: ModelConfig,
    device: torch.device | str,
    *,
    for_training: bool,
    allow_cpu_quantization: bool = False,
) -> LlavaForConditionalGeneration:
    """Load the LLaVA model of `config.name_or_path` (hub id or local dir, one code path) on `device`.

    Weights are read as safetensors only; `trust_remote_code` and `revision` come from the config.
    The dtype follows `resolve_dtype`. With `config.quantization == "4bit"` the language model's
    Linear layers are loaded in nf4 (see `_quantization_config`); vision tower, projector and LM
    head stay in the model dtype.

    `for_training=True` freezes every base parameter (LoRA adds the trainable ones) and turns the
    text model's KV cache off (useless in training, and it fights activation checkpointing).
    `for_training=False` returns the model in eval mode with the cache on.

    `prepare_model_for_kbit_training` is deliberately not called for 4-bit models. It would upcast
    every unquantized parameter to fp32: for gemma-2b that is the 256k x 2048 embedding and the
    whole CLIP tower (+~1.7 GB, slower vision), a protection meant for fp16, while here the compute
    dtype is bf16 (fp32's range) and Gemma's RMSNorm already computes in fp32. Its other parts are
    done here or elsewhere: freezing here, input gradients and checkpointing by
    `enable_gradient_checkpointing`; LoRA weights are created in fp32 by peft.

    Under DeepSpeed ZeRO-3 (an accelerate DeepSpeed plugin is active) the model is neither mapped
    nor moved: ZeRO-3 partitions it while loading and places it when the loop prepares it.

    `allow_cpu_quantization` exists for the tests only: it lets the 4-bit path run on CPU, where
    bitsandbytes works but is not a supported way to train.

    Raises:
        ModelSetupError: 4-bit asked off CUDA, bitsandbytes missing, or an unsupported dtype.
    """
    device = torch.device(device)
    quantize = config.quantization == "4bit"
    if quantize:  # first: the most useful message when both this and the dtype are wrong
        _check_quantization_possible(device, allow_cpu_quantization)
    dtype = resolve_dtype(config.dtype, device)
    zero3 = is_deepspeed_zero3_enabled()
    load_kwargs: dict[str, Any] = dict(
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
        dtype=dtype,
    )
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ModelSetupError(
                "model.quantization=4bit needs the bitsandbytes package (pip install bitsandbytes)"
            ) from error
        if zero3:
            raise ModelSetupError("model.quantization=4bit cannot be combined with DeepSpeed ZeRO-3 here; use ZeRO-2 or DDP")
        load_kwargs["quantization_config"] = _quantization_config()
    if not zero3:
        # Load straight onto the device (one copy, no CPU detour). Multi-GPU: each rank its own card.
        load_kwargs["device_map"] = {"": device}

    model = LlavaForConditionalGeneration.from_pretrained(str(config.name_or_path), **load_kwargs)
    if quantize:
        count = disable_cpu_4bit_repack(model)
        logger.info("loaded %s in 4-bit: %d quantized Linear layers", config.name_or_path, count)

    if for_training:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.config.text_config.use_cache = False
        model.train()
    else:
        model.config.text_config.use_cache = True
        model.eval()
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint activations of every decoder/encoder layer, non-reentrant.

    Uses `activation_checkpointing_enable` (transformers 5; `gradient_checkpointing_enable` is its
    deprecated alias). Non-reentrant checkpointing needs no `requires_grad` on the inputs and
    works with frozen base weights and unused parameters; transformers still turns on input
    gradients on the embeddings, which is harmless. The text model's cache is turned off, since
    a cache cannot be kept while layers are recomputed. Accepts the base or the PEFT model.
    """
    base = unwrap_model(model)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.config.text_config.use_cache = False


# --------------------------------------------------------------------------------------------------
# LoRA


def unwrap_model(model: torch.nn.Module) -> LlavaForConditionalGeneration:
    """The `LlavaForConditionalGeneration` inside DDP / DeepSpeed / PeftModel wrappers.

    For a PEFT model this is the base model with the LoRA layers injected (PeftModel ->
    LoraModel -> LlavaForConditionalGeneration), not a copy.
    """
    while not isinstance(model, LlavaForConditionalGeneration):
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif hasattr(model, "module"):  # DistributedDataParallel, DeepSpeedEngine
            model = model.module
        else:
            raise TypeError(f"expected a LlavaForConditionalGeneration (possibly wrapped), got {type(model).__name__}")
    return model


_SCOPE_PREFIXES = {"language": ("language_model",), "all": ("language_model", "vision_tower")}


def lora_target_regex(lora: LoraConfig) -> str:
    """The regex (full match over module names, as peft applies it) of the Linear layers LoRA wraps.

    A plain list such as ["q_proj", "v_proj"] would also hit CLIP's q/k/v; anchoring on
    `model.language_model.` (transformers 5 names) keeps the vision tower out unless
    `lora.scope == "all"`. Note CLIP names its attention output `out_proj`, not `o_proj`.
    """
    if not lora.target_modules:
        raise ValueError("lora.target_modules is empty: name the Linear layers to adapt, e.g. [q_proj, v_proj]")
    scopes = "|".join(_SCOPE_PREFIXES[lora.scope])
    names = "|".join(re.escape(name) for name in lora.target_modules)
    return rf"model\.(?:{scopes})\..*\.(?:{names})"


def apply_lora(model: LlavaForConditionalGeneration, lora: LoraConfig) -> PeftModel:
    """Wrap `model` with LoRA adapters as `lora` says; only adapter (and projector) weights train.

    r, alpha, dropout and target names come from the config; the scope regex is
    `lora_target_regex`. With `lora.train_projector` the multi-modal projector is trained in
    full and saved with the adapter (peft `modules_to_save`).

    Raises:
        ValueError: a target name matches no Linear layer in scope (a typo would otherwise train
            fewer layers than asked, silently).
    """
    pattern = lora_target_regex(lora)
    names_in_scope = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(name.startswith(f"model.{prefix}.") for prefix in _SCOPE_PREFIXES[lora.scope])
    ]
    leaf_names = {name.rsplit(".", 1)[-1] for name in names_in_scope}
    missing = [target for target in lora.target_modules if target not in leaf_names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no Linear layer in scope {lora.scope!r} "
            f"(available: {sorted(leaf_names)})"
        )
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=pattern,
        modules_to_save=[PROJECTOR_MODULE] if lora.train_projector else None,
        bias="none",
    )
    peft_model = get_peft_model(model, peft_config)
    upcast = _train_full_modules_in_fp32(peft_model)
    if upcast:
        logger.info("training %s in fp32 (the base stays in %s)", ", ".join(upcast), _floating_dtype(model))
    trainable, total = trainable_parameters(peft_model)
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def _train_full_modules_in_fp32(peft_model: PeftModel) -> list[str]:
    """Keep fully trained modules (the projector's `modules_to_save` copy) in fp32; their names.

    peft upcasts LoRA weights to fp32 but leaves a `modules_to_save` copy in the base dtype, and
    AdamW steps on bf16 weights round small updates away (8 mantissa bits). The copy is made fp32
    and casts at its boundary, as peft's LoRA layers do: inputs to the dtype its weights have at
    call time (fp32; bf16 if DeepSpeed's bf16 mode recasts the model, which then keeps fp32 master
    weights itself), outputs back to the model dtype. It works with or without autocast.
    """
    from peft.utils.other import ModulesToSaveWrapper

    upcast = []
    for name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for adapter_name, module in wrapper.modules_to_save.items():
            dtypes = {parameter.dtype for parameter in module.parameters()}
            if not dtypes & {torch.bfloat16, torch.float16}:
                continue
            (model_dtype,) = dtypes
            module.float()

            def inputs_to_weight_dtype(module: torch.nn.Module, args: tuple) -> tuple:
                dtype = next(module.parameters()).dtype
                return tuple(arg.to(dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)

            def output_to_model_dtype(_module: torch.nn.Module, _args: tuple, output: Any, dtype=model_dtype) -> Any:
                return output.to(dtype) if torch.is_tensor(output) else output

            module.register_forward_pre_hook(inputs_to_weight_dtype)
            module.register_forward_hook(output_to_model_dtype)
            upcast.append(f"{name}.modules_to_save.{adapter_name}")
    return upcast


def _parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter as the model sees it: a ZeRO-3 partition holds 0 locally (its full
    size is `ds_numel`), a 4-bit weight packs two values per byte."""
    count = getattr(parameter, "ds_numel", None) or parameter.numel()
    if parameter.__class__.__name__ == "Params4bit":
        count *= 2 * parameter.element_size()
    return count


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights once, 4-bit weights at their real size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = _parameter_count(parameter)
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


PARAMETER_GROUPS = {"frozen": "frozen base", "lora": "LoRA", "full": "trained in full"}
"""The groups of `parameter_report`: frozen weights, LoRA factors, modules trained whole (the
projector with `lora.train_projector`)."""


def parameter_report(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """What the parameters are, as they are now (after `accelerator.prepare`, not as asked):
    per group of `PARAMETER_GROUPS`, the element count, the count per dtype ("nf4" for 4-bit
    weights) and the devices. Empty groups are left out."""
    report: dict[str, dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        group = "lora" if "lora_" in name else "full" if parameter.requires_grad else "frozen"
        entry = report.setdefault(group, {"parameters": 0, "dtypes": {}, "devices": []})
        count = _parameter_count(parameter)
        dtype = "nf4" if parameter.__class__.__name__ == "Params4bit" else str(parameter.dtype).removeprefix("torch.")
        entry["parameters"] += count
        entry["dtypes"][dtype] = entry["dtypes"].get(dtype, 0) + count
        if str(parameter.device) not in entry["devices"]:
            entry["devices"].append(str(parameter.device))
    return {group: report[group] for group in PARAMETER_GROUPS if group in report}


def describe_parameters(report: dict[str, dict[str, Any]]) -> str:
    """One line of `parameter_report`: "frozen base 1,234 float32 on cpu; LoRA ..."."""
    parts = []
    for group, entry in report.items():
        dtypes = " + ".join(f"{dtype}" if len(entry["dtypes"]) == 1 else f"{dtype} ({count:,})"
                            for dtype, count in entry["dtypes"].items())
        parts.append(f"{PARAMETER_GROUPS[group]} {entry['parameters']:,} {dtypes} on {', '.join(entry['devices'])}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Loss


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions that `answer_only_loss` trains on: labels != -100 after the one-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def answer_only_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the answer tokens, and how many there are.

    The LM head (2048 x 256k for Gemma) runs only where the next label is trained: position t is
    kept when labels[t + 1] != -100, i.e. the positions that predict an answer token. The model's
    own forward does the selection (`logits_to_keep` as a (B, T) bool mask flattens the kept
    hidden states to (N, H) before the head), so:
      * DDP / DeepSpeed / PEFT wrappers see an ordinary forward call (gradient sync intact);
      * whatever the model applies to its logits is applied here too (LLaVA applies the plain
        `lm_head`: no softcapping or scaling, so this equals `model(..., labels=...)`).

    Returns the SUM (fp32) so the caller can normalise by the label count of the whole
    accumulation window and all ranks; `loss_sum / n_label_tokens` is the stock mean loss.

    batch: input_ids (B, T) with `<image>` already expanded, attention_mask (B, T),
    pixel_values (B, 3, H, W), labels (B, T) with -100 on untrained positions.
    """
    labels = batch["labels"]
    predicts_label = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][predicts_label[:, :-1]]  # (N,), row-major like the hidden-state mask
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    outputs = model(**inputs, logits_to_keep=predicts_label, use_cache=False)
    logits = outputs.logits.float()  # (N, V)
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss_sum, int(targets.numel())


# --------------------------------------------------------------------------------------------------
# Saving and export


def save_adapter(
    peft_model: PeftModel, out_dir: str | os.PathLike[str], *, state_dict: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapter (PEFT format, safetensors): LoRA weights, the projector if trained, config.

    `state_dict` is the full state dict of the PEFT model when the loop had to gather it
    (`accelerator.get_state_dict` under ZeRO-3); peft picks the adapter keys out of it. Call on
    the main process only. The directory is replaced atomically.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        peft_model.save_pretrained(staging, state_dict=dict(state_dict) if state_dict is not None else None)
    return out_dir


def _cpu_copy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies: merging works in place and must never write into the training model."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state_dict.items()}


@contextmanager
def _zero3_hooks_off() -> Iterator[None]:
    """Hide an active DeepSpeed ZeRO-3 config from transformers for the duration of the block.

    For models that must not be partitioned: the export (the main process alone, on plain CPU
    tensors) and inference. While transformers sees ZeRO-3 on, building a model enters `zero.Init`
    and saving gathers parameters: collectives that the other ranks never join (a hang), for
    tensors that are not partitioned anyway.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    weak_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = weak_ref() if weak_ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def _floating_dtype(model: torch.nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _peft_skeleton_from_state_dict(peft_model: PeftModel, state_dict: dict[str, torch.Tensor]) -> PeftModel:
    """A CPU copy of `peft_model` built from its full state dict (no second read of the base).

    The base is instantiated on the meta device (no memory, no init) and the tensors of
    `state_dict` are assigned in place of the meta ones, keeping their dtype. The config is
    copied so the export cannot change the training model's.
    """
    base = unwrap_model(peft_model)
    with torch.device("meta"):
        skeleton_base = LlavaForConditionalGeneration._from_config(copy.deepcopy(base.config))
    skeleton = get_peft_model(skeleton_base, peft_model.peft_config["default"])
    result = skeleton.load_state_dict(state_dict, strict=False, assign=True)
    skeleton.get_base_model().tie_weights()
    tied_targets = set(getattr(skeleton_base, "all_tied_weights_keys", {}) or {})
    missing = [key for key in result.missing_keys if not any(key.endswith(target) for target in tied_targets)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the state dict does not fit the PEFT model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    still_meta = [name for name, parameter in skeleton.named_parameters() if parameter.is_meta]
    if still_meta:
        raise ValueError(f"the state dict left parameters unset: {still_meta[:5]}")
    return skeleton


def _peft_on_reloaded_base(
    peft_model: PeftModel,
    adapter_state: dict[str, torch.Tensor],
    base_model_config: ModelConfig | None,
    dtype: torch.dtype,
) -> PeftModel:
    """The adapter on the base reloaded unquantized on CPU (4-bit weights cannot take a merge)."""
    peft_config = peft_model.peft_config["default"]
    if base_model_config is None:
        base_model_config = ModelConfig(
            name_or_path=str(peft_config.base_model_name_or_path or unwrap_model(peft_model).name_or_path),
            revision=peft_config.revision,
        )
    logger.info("merging a 4-bit run: reloading %s unquantized (%s) on CPU", base_model_config.name_or_path, dtype)
    base = LlavaForConditionalGeneration.from_pretrained(
        str(base_model_config.name_or_path),
        revision=base_model_config.revision,
        trust_remote_code=base_model_config.trust_remote_code,
        use_safetensors=True,
        dtype=dtype,
        device_map={"": "cpu"},
    )
    skeleton = get_peft_model(base, peft_config)
    result = set_peft_model_state_dict(skeleton, adapter_state)
    if result.unexpected_keys:
        raise ValueError(f"adapter weights that fit no layer of the reloaded base: {result.unexpected_keys[:5]}")
    return skeleton


def merge_and_export(
    peft_model: PeftModel,
    processor: ProcessorMixin,
    out_dir: str | os.PathLike[str],
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    base_model_config: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Fold the adapter into the base and save a stock LLaVA model: safetensors + processor +
    tokenizer + chat template. The result loads with `LlavaForConditionalGeneration.from_pretrained`
    and `AutoProcessor.from_pretrained`, no gqaru (and no peft) needed.

    The training model is left untouched: the merge happens on a CPU copy.
    * Unquantized base: the copy is built from the PEFT model's full state dict, `state_dict`
      (as `accelerator.get_state_dict` gathers it under ZeRO-3) or else the model's own.
    * 4-bit base: nf4 weights cannot take a merge, so the base is reloaded unquantized
      (`base_model_config`, default: the name the adapter records) and the adapter applied to
      it. The merged model is base + LoRA in full precision: the standard QLoRA export, close to
      but not bit-equal with the 4-bit model that was trained.

    `dtype` of the saved weights defaults to the training model's (bf16 on CUDA, fp32 on CPU).
    The saved config has the KV cache back on. Call on the main process only; `out_dir` is
    replaced atomically.
    """
    out_dir = Path(out_dir)
    base = unwrap_model(peft_model)
    dtype = dtype or _floating_dtype(base)
    full_state = state_dict if state_dict is not None else peft_model.state_dict()
    with _zero3_hooks_off():
        if is_quantized(peft_model):
            adapter_state = _cpu_copy(get_peft_model_state_dict(peft_model, state_dict=dict(full_state)))
            skeleton = _peft_on_reloaded_base(peft_model, adapter_state, base_model_config, dtype)
        else:
            skeleton = _peft_skeleton_from_state_dict(peft_model, _cpu_copy(full_state))
        merged = skeleton.merge_and_unload().to(dtype)
        merged.config.dtype = dtype
        merged.config.text_config.use_cache = True
        merged.generation_config = copy.deepcopy(base.generation_config)
        with atomic_directory(out_dir) as staging:
            merged.save_pretrained(staging)
            processor.save_pretrained(staging)
            if not _has_chat_template(staging):
                raise ValueError("the processor has no chat template to export: the merged model would lose its prompt format")
    return out_dir


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    tokenizer_config = directory / "tokenizer_config.json"
    return tokenizer_config.is_file() and '"chat_template"' in tokenizer_config.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Evaluation


def load_for_inference(
    model_config: ModelConfig, device: torch.device | str, *, merge_adapter: bool = True
) -> torch.nn.Module:
    """The model to evaluate: base (hub id or dir) plus the PEFT adapter `model_config.adapter`.

    Eval mode, KV cache on. An adapter on an unquantized base is merged in (`merge_adapter`):
    generation then runs at base-model speed and the result is a plain
    `LlavaForConditionalGeneration`. On a 4-bit base the adapter stays unmerged (a merge into nf4
    weights would round the update away), and a `PeftModel` is returned; both have `generate`.

    Inference never partitions: under a DeepSpeed ZeRO-3 launch the model is loaded whole on every
    process (ZeRO-3 shards training state; without a DeepSpeed engine a partitioned model is empty
    shells), and the processes share the questions as under any other launcher.

    Raises:
        ModelSetupError: as `load_base_model` (e.g. 4-bit off CUDA).
        FileNotFoundError: the adapter dir has no adapter_config.json.
    """
    adapter = Path(model_config.adapter) if model_config.adapter is not None else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"model.adapter={adapter}: no adapter_config.json there (expected a PEFT adapter dir)")
    with _zero3_hooks_off():
        model = load_base_model(model_config, device, for_training=False)
        if adapter is None:
            return model
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    peft_model.eval()
    if merge_adapter and not is_quantized(model):
        return peft_model.merge_and_unload().eval()
    return peft_model
