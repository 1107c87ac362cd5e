"""The reference: lmms-eval 0.7.3's `gqa_ru` task with its `llava_hf` model, as a plain loop.

Written from the protocol (shared/REAL_MODELS.md), with stock transformers calls only and no gqaru
code, so that gqaru's prompts and predictions are checked against the reference itself:

    text = "<image>\\n" + question + "\\nОтветь одним словом."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")   # default special tokens
    output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=16,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True).strip()

Two things lmms-eval does not do, because transformers 4.x did not need them:
* transformers 5 cannot expand `<image>` with a processor config that lacks `patch_size` (the real
  one does): the three values are set from the model config, as REAL_MODELS.md says to;
* a template that writes `{{ bos_token }}` itself (the tiny model's, not deepvk's) would get a second
  `<bos>` from the processor; `one_bos=True` leaves the tokenizer's out then. gqaru's rule is one
  `<bos>`; for deepvk's template the switch changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

INSTRUCTION = "\nОтветь одним словом."

# lmms-eval's llava_hf default for a tokenizer without a chat template (llava-1.5 checkpoints).
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %} "
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def reference_processor(model_dir: str | Path):
    """AutoProcessor with the image expansion values transformers 5 needs, from the model config.

    The PIL image processor, as the real checkpoint's transformers 4.x processor was. A tokenizer
    without a chat template gets lmms-eval's Vicuna one, as llava_hf gives it."""
    config = AutoConfig.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    processor.patch_size = config.vision_config.patch_size
    processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    processor.num_additional_image_tokens = 1  # CLIP's class token
    if processor.tokenizer.chat_template is None:
        processor.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    return processor


def prompt_text(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": "<image>\n" + question + INSTRUCTION}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reference_inputs(processor, image: Image.Image, question: str, *, one_bos: bool = True) -> dict[str, torch.Tensor]:
    """What lmms-eval feeds the model for one question."""
    text = prompt_text(processor.tokenizer, question)
    writes_bos = text.startswith(processor.tokenizer.bos_token or "\x00")
    add_special_tokens = not (one_bos and writes_bos)
    return processor(images=[image.convert("RGB")], text=text, return_tensors="pt", add_special_tokens=add_special_tokens)


def reference_answers(
    model_dir: str | Path, items: Iterable[tuple[str, Image.Image, str]], *, max_new_tokens: int = 16
) -> dict[str, str]:
    """{question id: answer} for (id, image, question) items, one `generate` per question."""
    processor = reference_processor(model_dir)
    tokenizer = processor.tokenizer
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = {}
    for question_id, image, question in items:
        inputs = reference_inputs(processor, image, question)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answers[question_id] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return answers
