"""gqaru: fine-tune LLaVA vision-language models on GQA-ru (Russian GQA) with LoRA/QLoRA."""

__version__ = "0.1.0"
