"""Shared fixtures: the offline default (synthetic GQA-ru + tiny LLaVA), built once per test session.

Everything is built at test time from the package itself: no download, no checked-in binaries.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic GQA-ru dataset in the hub repo's layout (both splits)."""
    from gqaru.standins.synth import write_synthetic_gqa

    out = tmp_path_factory.mktemp("synth") / "gqa-ru"
    write_synthetic_gqa(out, train_questions=600, testdev_questions=310, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA (preset "tiny"), saved with save_pretrained."""
    from gqaru.standins.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "tiny-llava"
    build_tiny_model(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA pretrained 600 steps (~100 s on 2 cores; `make demo` builds it with 2,800):
    the same seed as `tiny_model_dir`, so its random starting point is that model."""
    from gqaru.standins.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("pretrained") / "tiny-llava"
    build_tiny_model(out, preset="tiny", seed=0, pretrain_steps=600)
    return out


@pytest.fixture(scope="session")
def replica_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica of deepvk/llava-gemma-2b-lora: the hub's files and configs, the real Gemma tokenizer
    and chat template, narrow random weights biased so that greedy answers vary (`--vary-answers`).

    Needs the real tokenizer in the cache (`make setup` fetches it); without it this fixture fails with
    the message saying how to get it: these tests never skip silently.
    """
    from gqaru.standins.replica import build_replica

    out = tmp_path_factory.mktemp("replica") / "llava-gemma-2b"
    build_replica("deepvk/llava-gemma-2b-lora", out, seed=0, vary_answers=True)
    return out


@pytest.fixture(scope="session")
def vicuna_replica_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica of llava-hf/llava-1.5-7b-hf (Vicuna on Llama-2): the real Llama-2 tokenizer, no chat
    template (lmms-eval's Vicuna one applies), an untied LM head; answers vary."""
    from gqaru.standins.replica import build_replica

    out = tmp_path_factory.mktemp("replica") / "llava-1.5-7b"
    build_replica("llava-hf/llava-1.5-7b-hf", out, seed=0, vary_answers=True)
    return out


@pytest.fixture(scope="session")
def saiga_replica_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica of deepvk/llava-saiga-8b (Llama-3): the real Llama-3 tokenizer and chat format
    (`<|eot_id|>` ends a turn; the template writes `<|begin_of_text|>`), an untied LM head; answers vary."""
    from gqaru.standins.replica import build_replica

    out = tmp_path_factory.mktemp("replica") / "llava-saiga-8b"
    build_replica("deepvk/llava-saiga-8b", out, seed=0, vary_answers=True)
    return out


class _Float64Recorder(TorchDispatchMode):
    """Counts the torch ops whose output is a float64 tensor, on any device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if any(isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float64 for leaf in tree_leaves(output)):
            self.ops[str(func)] += 1
        return output


@contextmanager
def _forbid_float64() -> Iterator[None]:
    recorder = _Float64Recorder()
    with recorder:
        yield
    assert not recorder.ops, f"float64 tensors made (MPS has no float64, the run would crash there): {dict(recorder.ops)}"


@pytest.fixture(scope="session")
def no_float64() -> Callable[[], AbstractContextManager[None]]:
    """MPS's rule, checked on the CPU: `with no_float64(): ...` fails if any torch op in the block
    makes a float64 tensor. Our runs make none at all, so no device bookkeeping is needed."""
    return _forbid_float64
