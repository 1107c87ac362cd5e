"""Webdataset shards of GQA-ru: writing them (with a manifest) and the read pipelines.

Layout of a shard dir (see shards/README.md):

    DIR/manifest.json            source, split, selection, counts, per-shard records, rejections
    DIR/{split}-000000.tar ...   one sample per image: `{imageId}.jpg` + `{imageId}.json`

A sample's json is {"imageId", "width", "height", "qa": [{"id", "row", "question", "answer",
"fullAnswer", "types"}, ...]}; `row` is the question's row index in the source (dataset order),
width/height are those of the stored jpg. Keeping each image once, with all of its selected
questions, makes shards ~13x smaller than one sample per question.

Writing (`build_shards`, the `gqaru shards build` command):
- JPEG bytes pass through untouched unless a resize is asked; any other format or mode (PNG, RGBA,
  grayscale, CMYK, palette, 16-bit) becomes an RGB JPEG at quality 95 (alpha composited on white).
- Every image is decoded once to prove it decodes (pass-through JPEGs in grey at 1/8 scale: libjpeg
  still reads every entropy-coded byte, but skips most of the rest); bad input is skipped and counted under
  its reason (`gqaru.sources.REJECTION_REASONS`), never a crash, never silent.
- `workers` > 1 runs those checks (and any re-encoding) in a pool of processes, a bounded window of
  small batches at a time, and takes the results back in source order: the shards, the manifest
  and the rejection examples are byte-identical for any worker count, and memory stays flat.
- Shards are built in a hidden sibling dir, each written as `.partial` and renamed when complete;
  the finished dir then replaces DIR whole. Tar headers carry a fixed mtime, so the same input
  gives byte-identical shards (and sha256s). Members are written as webdataset's TarWriter
  wrote them (the same bytes), with tarfile's USTAR headers and no per-member pax check.

Reading:
- `read_manifest(dir)`, `verify_shards(dir)`, `inspect_shards(dir)`.
- `training_pipeline(dir, rank=, world_size=, num_workers=, seed=, epoch=)`: the training stream.
- `rank_plan(dir, rank, world_size, num_workers)`: what that stream will give a rank, from the
  manifest alone, so the trainer can give every rank the same number of optimizer steps.
- `iter_eval_samples(dir, question_ids=, rank=, world_size=)`: deterministic, no shuffle.
- `list_question_ids(dir)`: every question id in the shards (reads only the json members);
  `question_rows(dir)`: their source row indices, for the seed report's row-based selection.
Tar members are read in memory by webdataset's stages; nothing is ever extracted to a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tarfile
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from gqaru import __version__
from gqaru.sources import SEED_REPORT, SEEDED, ImageQuestions, Rejections, SplitReader

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gqaru-shards/1"
JPEG_QUALITY = 95
SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Image ids usable as webdataset keys as they are: a dot would split the key from the extension
(webdataset cuts a member name at its first dot), a slash would make a directory."""
_TAR_MTIME = 0  # fixed header time: the same input gives byte-identical shards
_TAR_MODE = 0o444  # what webdataset's TarWriter wrote: shards stay byte-identical to earlier builds
_TAR_OWNER = "gqaru"
_TAR_END = 2 * tarfile.BLOCKSIZE  # two zero blocks end an archive; the file is then padded to a record
_META_ENCODER = json.JSONEncoder(ensure_ascii=False)  # = json.dumps(meta, ensure_ascii=False), built once
CHECK_BATCH_IMAGES = 16
"""Images sent to a check worker at a time: amortises the inter-process call (~0.1 ms) over the batch."""
CHECK_BATCHES_PER_WORKER = 2
"""Batches in flight per worker: keeps every worker busy while bounding the image bytes held to
workers x 2 x 16 images, whatever the size of the source."""


class ShardError(ValueError):
    """A shard dir that cannot be used as asked: names the dir or shard and what is wrong."""


# --------------------------------------------------------------------------------------------
# Images


class ImageRejected(Exception):
    """An image that cannot go into a shard; `reason` is one of the rejection reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # check workers send rejections back pickled; the default would call __init__ with one argument
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class PreparedImage:
    """The bytes stored as a sample's `jpg`, with their size."""

    jpeg: bytes
    width: int
    height: int
    reencoded: bool


def _resized_size(width: int, height: int, image_size: int | None) -> tuple[int, int] | None:
    """The (width, height) with the shorter side at `image_size`, or None when no downscale is due."""
    if image_size is None or min(width, height) <= image_size:
        return None
    if width <= height:
        return image_size, max(1, round(height * image_size / width))
    return max(1, round(width * image_size / height)), image_size


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any PIL mode: alpha composited on white, 16-bit grey scaled to 8 bits.

    Transparent pixels carry arbitrary hidden colours (often black), so dropping alpha without
    compositing would show the model whatever the encoder left there.
    """
    if image.mode == "RGB":
        return image
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def prepare_image(data: bytes | None, image_size: int | None = None) -> PreparedImage:
    """Check that `data` decodes and return the bytes to store.

    An RGB JPEG that needs no resize is returned untouched (after a decode at 1/8 scale that still
    reads all of it). Everything else is decoded, converted to RGB, downscaled so its shorter side
    is `image_size` when it is longer, and encoded as JPEG (quality 95).

    Raises:
        ImageRejected: reason `undecodable_image` (no bytes, unknown format, truncated or corrupt
            data) or `oversized_image` (over PIL's decompression-bomb limit).
    """
    if not data:
        raise ImageRejected("undecodable_image", "the row has no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            target = _resized_size(width, height, image_size)
            if image.format == "JPEG" and image.mode == "RGB" and target is None:
                # Grey at 1/8 scale: libjpeg still entropy-decodes every component of every scan
                # (so truncated or broken data fails), but skips most IDCT and colour work (~30% less).
                image.draft("L", (max(1, width // 8), max(1, height // 8)))
                image.load()
                return PreparedImage(jpeg=data, width=width, height=height, reencoded=False)
            if target is not None and image.format == "JPEG":
                image.draft(image.mode, target)  # decode at the smallest DCT scale still >= target
            image.load()
            rgb = _to_rgb(image)
            if target is not None:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            return PreparedImage(jpeg=buffer.getvalue(), width=rgb.width, height=rgb.height, reencoded=True)
    except Image.DecompressionBombError as error:
        raise ImageRejected("oversized_image", str(error)) from error
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many types on hostile bytes
        # (OSError, SyntaxError, ValueError, struct.error, EOFError ...): any of them means "does
        # not decode". The image is counted under its reason by the caller, never dropped silently.
        raise ImageRejected("undecodable_image", f"{type(error).__name__}: {error}") from error


# --------------------------------------------------------------------------------------------
# Checking images, in this process or in a pool


def default_workers() -> int:
    """Check workers for a build when none is asked: the usable cores, at most 4.

    The checks are the only parallel part; the building process itself reads the source, joins
    the questions and writes the tar, and on pass-through JPEGs that serial part is already longer
    than a 1/8-scale decode, so more than a few workers wait on it. Re-encoding builds
    (`image_size`, PNG sources) are where 2-4 workers pay most.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def _check(data: bytes | None, image_size: int | None) -> PreparedImage | ImageRejected:
    """`prepare_image`, its rejection returned rather than raised."""
    try:
        return prepare_image(data, image_size)
    except ImageRejected as rejected:
        return rejected


def _check_batch(images: list[bytes | None], image_size: int | None) -> list[PreparedImage | ImageRejected]:
    """A check worker's job: `_check` on each image.

    A pass-through image comes back without its bytes (the building process holds them already),
    so only re-encoded JPEGs cross the process boundary twice.
    """
    outcomes = [_check(data, image_size) for data in images]
    return [
        dataclasses.replace(outcome, jpeg=b"") if isinstance(outcome, PreparedImage) and not outcome.reencoded else outcome
        for outcome in outcomes
    ]


def _pool_context() -> multiprocessing.context.BaseContext:
    """`fork` where there is one (Linux): a worker starts in milliseconds with this process's
    modules (a spawned one would import gqaru.shards, i.e. webdataset and torch: ~1-2 s each) and
    with its settings (PIL's MAX_IMAGE_PIXELS). Workers run nothing but PIL on the bytes they are
    sent. Elsewhere (macOS, Windows) `spawn`."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _checked_images(
    items: Iterable[ImageQuestions], image_size: int | None, workers: int
) -> Iterator[tuple[ImageQuestions, PreparedImage | ImageRejected]]:
    """(item, prepared image or its rejection) for each item, in the order of `items`.

    With one worker the checks run here. With more, batches of `CHECK_BATCH_IMAGES` go to a process
    pool while the source is still being read, at most `CHECK_BATCHES_PER_WORKER` per worker in
    flight, and results are taken back in submission order: what is written (and rejected) never
    depends on which worker finished first, and the bytes held stay bounded by the window.
    """
    if workers == 1:
        for item in items:
            yield item, _check(item.image_bytes, image_size)
        return

    def finished(batch: list[ImageQuestions], future: Future) -> Iterator[tuple[ImageQuestions, Any]]:
        for item, outcome in zip(batch, future.result(), strict=True):
            if isinstance(outcome, PreparedImage) and not outcome.reencoded:
                assert item.image_bytes is not None  # no bytes is a rejection, not a pass-through
                outcome = dataclasses.replace(outcome, jpeg=item.image_bytes)
            yield item, outcome

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    try:
        in_flight: deque[tuple[list[ImageQuestions], Future]] = deque()
        batch: list[ImageQuestions] = []
        for item in items:
            batch.append(item)
            if len(batch) < CHECK_BATCH_IMAGES:
                continue
            in_flight.append((batch, pool.submit(_check_batch, [each.image_bytes for each in batch], image_size)))
            batch = []
            if len(in_flight) >= workers * CHECK_BATCHES_PER_WORKER:
                yield from finished(*in_flight.popleft())
        if batch:
            in_flight.append((batch, pool.submit(_check_batch, [each.image_bytes for each in batch], image_size)))
        while in_flight:
            yield from finished(*in_flight.popleft())
    finally:
        # also on an error downstream: drop what has not started, wait for the (few) running batches
        pool.shutdown(wait=True, cancel_futures=True)


def _with_safe_keys(items: Iterable[ImageQuestions], rejections: Rejections, bar: tqdm) -> Iterator[ImageQuestions]:
    """The items whose image id is a usable key; the others are counted (their bytes never checked)."""
    for item in items:
        if SAFE_KEY.fullmatch(item.image_id):
            yield item
        else:
            bar.update(1)
            rejections.add("invalid_image_id", item.image_id, questions_lost=len(item.questions))


# --------------------------------------------------------------------------------------------
# Writing


class _HashingFile:
    """A write-only file that hashes and counts what goes through it (no second read for sha256)."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _tarfile_header(name: str, size: int) -> bytes:
    """The USTAR header tarfile makes for a member (`TarInfo.tobuf`), with the fields webdataset's
    TarWriter set: what `_tar_header` returns, byte for byte, ~20x slower."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uname = info.gname = _TAR_OWNER
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_HEADER_TEMPLATE = _tarfile_header("", 0)
_HEADER_MODE_TO_SIZE, _HEADER_MTIME, _HEADER_AFTER_CHECKSUM = (
    _HEADER_TEMPLATE[100:124], _HEADER_TEMPLATE[136:148], _HEADER_TEMPLATE[156:]
)
_HEADER_FIXED_SUM = sum(_HEADER_MODE_TO_SIZE) + sum(_HEADER_MTIME) + sum(_HEADER_AFTER_CHECKSUM) + 8 * ord(" ")
"""The checksum of a header is the sum of its bytes, its own 8-byte field counted as spaces."""


def _tar_header(name: str, size: int) -> bytes:
    """tarfile's USTAR header for a member (`_tarfile_header`), made from its template.

    Only the name (bytes 0-100), the size (124-136) and the checksum (148-156) differ between our
    members, so the rest is tarfile's own header of an empty name, and the checksum is the fixed
    part's sum plus the varying fields'. `TarInfo.tobuf` took ~15 us a member, as long as writing
    and hashing its bytes. USTAR directly, since these names never need a pax header (SAFE_KEY: <= 64
    ASCII characters) and `TarFile.addfile` would spend as long again checking that for every member.
    What the template does not cover (a name over 100 bytes, a size over 8 GiB) goes to tarfile.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not 0 <= size < 8**11:
        return _tarfile_header(name, size)
    size_field = b"%011o\x00" % size
    checksum = _HEADER_FIXED_SUM + sum(encoded) + sum(size_field)
    return b"".join(
        (encoded, bytes(100 - len(encoded)), _HEADER_MODE_TO_SIZE, size_field, _HEADER_MTIME, b"%06o\x00 " % checksum,
         _HEADER_AFTER_CHECKSUM)
    )


def _tar_member(name: str, data: bytes) -> bytes:
    """One tar member: its USTAR header (tarfile's own, `_tar_header`), `data`, and zero padding to
    the next 512-byte block."""
    return b"".join((_tar_header(name, len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE)))


class _ShardSetWriter:
    """Writes samples into `{split}-NNNNNN.tar` shards of at most `samples_per_shard` images.

    Each shard is written as `NAME.partial` and renamed to NAME once closed, so a `.tar` name
    always means a complete shard. A sample is its `.jpg` then its `.json` member (webdataset's
    order: sorted extensions).
    """

    def __init__(self, directory: Path, split: str, samples_per_shard: int) -> None:
        self.directory = directory
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.records: list[dict[str, Any]] = []
        self._file: _HashingFile | None = None
        self._questions_per_image: list[int] = []

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.records):06d}.tar"
        self._file = _HashingFile(self.directory / f"{name}.partial")
        self._questions_per_image = []
        self.records.append({"file": name})

    def _finish_current(self) -> None:
        if self._file is None:
            return
        # The end of archive as tarfile writes it: two zero blocks, then zeros to a whole record.
        self._file.write(bytes(_TAR_END + -(self._file.bytes + _TAR_END) % tarfile.RECORDSIZE))
        self._file.close()
        record = self.records[-1]
        os.replace(self.directory / f"{record['file']}.partial", self.directory / record["file"])
        record.update(
            images=len(self._questions_per_image),
            questions=sum(self._questions_per_image),
            bytes=self._file.bytes,
            sha256=self._file.sha256.hexdigest(),
            questions_per_image=self._questions_per_image,
        )
        self._file = None

    def write(self, key: str, jpeg: bytes, meta: dict[str, Any]) -> None:
        if self._file is None or len(self._questions_per_image) >= self.samples_per_shard:
            self._finish_current()
            self._open_next()
        assert self._file is not None
        self._file.write(_tar_member(f"{key}.jpg", jpeg))
        self._file.write(_tar_member(f"{key}.json", _META_ENCODER.encode(meta).encode("utf-8")))
        self._questions_per_image.append(len(meta["qa"]))

    def close(self) -> list[dict[str, Any]]:
        self._finish_current()
        return self.records


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but an empty dir or a previous shard dir (one with a manifest)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ShardError(f"--out {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ShardError(
            f"--out {out_dir} is a non-empty directory without {MANIFEST_NAME}: refusing to replace "
            "something that is not a shard dir; pick a new or empty directory"
        )


def _replace_directory(built: Path, out_dir: Path) -> None:
    """Put the finished `built` dir at `out_dir`, replacing a previous shard dir whole."""
    _check_replaceable(out_dir)
    if not out_dir.exists():
        os.replace(built, out_dir)
        return
    retired = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, retired)
    os.replace(built, out_dir)
    shutil.rmtree(retired)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


def build_shards(
    source: str,
    *,
    split: str,
    out_dir: str | os.PathLike[str],
    max_samples: int | None = None,
    seed: int = 0,
    selection: str = SEEDED,
    samples_per_shard: int = 256,
    image_size: int | None = None,
    workers: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Build webdataset shards of one GQA-ru split; returns the manifest (also in DIR/manifest.json).

    Args:
        source: hub id (`deepvk/GQA-ru`) or a local dir in its layout.
        split: `train` or `testdev`.
        out_dir: the shard dir; an existing shard dir (or empty dir) is replaced whole.
        max_samples, seed: select this many questions (`gqaru.sources.select_question_ids`);
            None keeps all.
        selection: "seeded" (max_samples, seed) or "seed-report" (the seed report's rows of
            this split, `gqaru.sources.seed_report_rows`).
        samples_per_shard: images per shard.
        image_size: downscale so the shorter side is this many pixels (never upscales).
        workers: processes that check (and re-encode) images; 1 does it in this process, None
            takes `default_workers()`. The shards and manifest are the same bytes for any value.
        verbose: show a progress bar and print the summary paragraph.

    Raises:
        SourceError: the source lacks a config or required columns.
        ShardError: `out_dir` exists and is not a shard dir.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive or None, got {image_size}")
    if workers is None:
        workers = default_workers()
    if workers <= 0:
        raise ValueError(f"workers must be a positive number of processes (1: check in this process), got {workers}")
    out = Path(out_dir)
    _check_replaceable(out)
    started = time.perf_counter()
    reader = SplitReader(source, split, max_samples=max_samples, seed=seed, selection=selection)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    reencoded = 0
    try:
        writer = _ShardSetWriter(staging, split, samples_per_shard)
        with tqdm(total=reader.selected_images, unit="img", desc=f"shards {split}", disable=not verbose) as bar:
            checked = _checked_images(_with_safe_keys(reader, reader.rejections, bar), image_size, workers)
            with contextlib.closing(checked):  # now, not when collected: a failed write leaves no worker running
                for item, prepared in checked:
                    bar.update(1)
                    if isinstance(prepared, ImageRejected):
                        logger.debug("image %s rejected: %s", item.image_id, prepared)
                        reader.rejections.add(prepared.reason, item.image_id, questions_lost=len(item.questions))
                        continue
                    reencoded += prepared.reencoded
                    meta = {
                        "imageId": item.image_id,
                        "width": prepared.width,
                        "height": prepared.height,
                        "qa": [question.to_json() for question in item.questions],
                    }
                    writer.write(item.image_id, prepared.jpeg, meta)
        shards = writer.close()
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "created_with": f"gqaru {__version__}",
            "source": str(source),
            "split": split,
            "selection": reader.selection(),
            "image_size": image_size,
            "samples_per_shard": samples_per_shard,
            "counts": {
                "images": sum(shard["images"] for shard in shards),
                "questions": sum(shard["questions"] for shard in shards),
                "shards": len(shards),
                "bytes": sum(shard["bytes"] for shard in shards),
                "reencoded_images": reencoded,
            },
            "rejected": reader.rejections.to_json(),
            "shards": shards,
        }
        _write_json(staging / MANIFEST_NAME, manifest)
        _replace_directory(staging, out)
    finally:
        if staging.exists():  # only when something failed: on success it was renamed to `out`
            shutil.rmtree(staging)
    elapsed = time.perf_counter() - started
    if verbose:
        print(_build_summary(manifest, out, elapsed, reader.rejections.summary()))
    return manifest


def _build_summary(manifest: dict[str, Any], out: Path, elapsed: float, rejects: str) -> str:
    counts, selection = manifest["counts"], manifest["selection"]
    megabytes = counts["bytes"] / 1e6
    return (
        f"Wrote {counts['images']} images with {counts['questions']} questions into {counts['shards']} "
        f"shard(s) in {out} ({megabytes:.1f} MB, {elapsed:.1f} s, "
        f"{counts['images'] / max(elapsed, 1e-9):.0f} images/s, {megabytes / max(elapsed, 1e-9):.1f} MB/s) "
        f"from {manifest['source']} {manifest['split']}: selected {selection['selected']} of "
        f"{selection['available']} valid questions ({describe_selection(selection)}); "
        f"{counts['reencoded_images']} image(s) re-encoded to JPEG; "
        f"skipped: {rejects}."
    )


# --------------------------------------------------------------------------------------------
# Manifest, verification, inspection


def describe_selection(selection: dict[str, Any]) -> str:
    """`max_samples=N, seed=S` or `seed-report: R rows of N`, for summaries."""
    if selection.get("name") == SEED_REPORT:
        return f"seed-report: {selection['rows']} rows of {selection['source_rows']}"
    return f"max_samples={selection['max_samples']}, seed={selection['seed']}"


def read_manifest(shards_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a shard dir, checked for the fields the readers rely on."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{shards_dir} has no {MANIFEST_NAME}: not a shard dir (build one with `gqaru shards build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ShardError(f"{path} is not valid JSON: {error}") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for shard in manifest["shards"]:
        missing = {"file", "images", "questions", "bytes", "sha256", "questions_per_image"} - set(shard)
        if missing:
            raise ShardError(f"{path}: shard record {shard.get('file')!r} lacks {', '.join(sorted(missing))}")
    return manifest


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(shards_dir: str | os.PathLike[str]) -> list[str]:
    """Problems found checking every shard against the manifest (present, size, sha256); [] if none."""
    directory = Path(shards_dir)
    manifest = read_manifest(directory)
    problems = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
            continue
        size = path.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{shard['file']}: {size} bytes, manifest says {shard['bytes']}")
            continue
        if _sha256_of(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest (corrupted or modified)")
    listed = {shard["file"] for shard in manifest["shards"]}
    for path in sorted(directory.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: a shard file the manifest does not list")
    return problems


def inspect_shards(shards_dir: str | os.PathLike[str], verify: bool = True) -> bool:
    """Print a shard dir's manifest summary and, with `verify`, check every shard's size and sha256.

    Returns False when the dir is not a readable shard dir or any check fails.
    """
    try:
        manifest = read_manifest(shards_dir)
    except ShardError as error:
        print(f"error: {error}")
        return False
    counts, selection = manifest["counts"], manifest["selection"]
    print(f"{shards_dir}: {manifest['split']} from {manifest['source']} ({manifest['created_with']})")
    print(
        f"  {counts['images']} images, {counts['questions']} questions, {counts['shards']} shards, "
        f"{counts['bytes'] / 1e6:.1f} MB; image_size={manifest['image_size']}"
    )
    print(
        f"  selection: {selection['selected']} of {selection['available']} questions "
        f"({describe_selection(selection)})"
    )
    rejected = {name: entry for name, entry in manifest["rejected"].items() if entry["count"]}
    if rejected:
        for name, entry in rejected.items():
            lost = f", {entry['questions_lost']} questions lost" if "questions_lost" in entry else ""
            print(f"  rejected {name}: {entry['count']} {entry['unit']}(s){lost}; e.g. {', '.join(entry['examples'])}")
    else:
        print("  rejected: none")
    if not verify:
        return True
    problems = verify_shards(shards_dir)
    for problem in problems:
        print(f"  FAILED {problem}")
    if problems:
        print(f"  verification failed: {len(problems)} problem(s)")
        return False
    print(f"  verified: {counts['shards']} shard(s) present with the manifest's sizes and sha256s")
    return True


# --------------------------------------------------------------------------------------------
# Reading: which rank and worker gets which sample


SHARDS_PER_SLOT_FOR_SHARD_SPLIT = 8
"""Whole shards go to ranks only when each (rank, worker) gets at least this many: shards differ
by up to one in count per slot, so fewer would leave ranks idle for a large share of every epoch
(they run zero-weight batches while the largest rank finishes)."""


def _splits_by_shard(num_shards: int, world_size: int, num_workers: int) -> bool:
    """True when there are enough shards to split by shard without a large imbalance."""
    slots = world_size * max(1, num_workers)
    return slots == 1 or num_shards >= SHARDS_PER_SLOT_FOR_SHARD_SPLIT * slots


def _check_slot(rank: int, world_size: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _current_worker(num_workers: int) -> int:
    """This process's DataLoader worker id, checked against the `num_workers` the pipeline was built for.

    A mismatch would silently drop or duplicate data, so it is an error.
    """
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    actual = 0 if info is None else info.num_workers
    if actual != num_workers:
        raise ShardError(
            f"the pipeline was built for num_workers={num_workers} but is read by {actual} DataLoader "
            "worker(s): pass the DataLoader's num_workers to training_pipeline"
        )
    return 0 if info is None else info.id


def _stream_rng(seed: int, epoch: int, rank: int, worker: int, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: the same stream on every platform and run.
    return random.Random(f"gqaru/{purpose}/seed={seed}/epoch={epoch}/rank={rank}/worker={worker}")


class _WorkerShards:
    """First pipeline stage: the shard files this (rank, worker) reads this epoch, shuffled."""

    def __init__(self, paths: list[str], rank: int, world_size: int, num_workers: int, seed: int, epoch: int) -> None:
        self.paths, self.rank, self.world_size = paths, rank, world_size
        self.num_workers, self.seed, self.epoch = num_workers, seed, epoch

    def __call__(self) -> Iterator[dict[str, str]]:
        worker = _current_worker(self.num_workers)
        indices = list(range(len(self.paths)))
        if _splits_by_shard(len(self.paths), self.world_size, self.num_workers):
            indices = indices[self.rank :: self.world_size][worker :: max(1, self.num_workers)]
        _stream_rng(self.seed, self.epoch, self.rank, worker, "shards").shuffle(indices)
        for index in indices:
            yield {"url": self.paths[index]}


def _number_samples(
    samples: Iterable[dict[str, Any]],
    paths: list[str],
    images_per_shard: list[int],
    keep_every: int,
    keep_offset: int,
) -> Iterator[dict[str, Any]]:
    """Give each sample its global index (manifest order) and keep those of this slot.

    The index is the sample's position in the manifest's shard order, whatever order the shards
    are read in, so the rank a sample goes to never depends on the epoch's shuffle. Also checks
    each shard's sample count against the manifest: a shard that disagrees would break the plan
    every rank's step count is computed from.
    """
    shard_of_path = {path: index for index, path in enumerate(paths)}
    offsets = np.concatenate([[0], np.cumsum(images_per_shard)]).tolist()
    current_path, position = None, 0

    def check_count() -> None:
        if current_path is not None and position != images_per_shard[shard_of_path[current_path]]:
            raise ShardError(
                f"{current_path} holds {position} samples, the manifest says "
                f"{images_per_shard[shard_of_path[current_path]]}: rebuild or re-verify the shards"
            )

    for sample in samples:
        if sample["__url__"] != current_path:
            check_count()
            current_path, position = sample["__url__"], 0
        index = offsets[shard_of_path[current_path]] + position
        position += 1
        if index % keep_every == keep_offset:
            sample["__index__"] = index
            yield sample
    check_count()


class _SlotSamples:
    """Pipeline stage: numbering, and the sample-level split when there are too few shards."""

    def __init__(
        self, paths: list[str], images_per_shard: list[int], rank: int, world_size: int, num_workers: int
    ) -> None:
        self.paths, self.images_per_shard = paths, images_per_shard
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker = _current_worker(self.num_workers)
        if _splits_by_shard(len(self.paths), self.world_size, self.num_workers):
            keep_every, keep_offset = 1, 0
        else:
            # global index g -> rank g % world_size, then that rank's k-th sample -> worker k % workers
            workers = max(1, self.num_workers)
            keep_every, keep_offset = self.world_size * workers, self.rank + self.world_size * worker
        return _number_samples(samples, self.paths, self.images_per_shard, keep_every, keep_offset)


class _SeededShuffle:
    """Pipeline stage: webdataset's shuffle buffer with an rng seeded by (seed, epoch, rank, worker)."""

    def __init__(self, buffer_size: int, seed: int, epoch: int, rank: int, num_workers: int) -> None:
        self.buffer_size, self.seed, self.epoch = buffer_size, seed, epoch
        self.rank, self.num_workers = rank, num_workers

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = _stream_rng(self.seed, self.epoch, self.rank, _current_worker(self.num_workers), "samples")
        return wds.shuffle(self.buffer_size, initial=self.buffer_size, rng=rng)(samples)


def _as_record(sample: dict[str, Any]) -> dict[str, Any]:
    return {"key": sample["__key__"], "image": sample["jpg"], "meta": sample["json"]}


def _shard_paths(directory: Path, manifest: dict[str, Any]) -> list[str]:
    return [str(directory / shard["file"]) for shard in manifest["shards"]]


def training_pipeline(
    shards_dir: str | os.PathLike[str],
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 256,
) -> wds.DataPipeline:
    """The training stream of one rank for one epoch: an IterableDataset of {"key", "image", "meta"}.

    `image` is an RGB PIL image, `meta` the sample's json dict (imageId, width, height, qa), `key`
    the imageId. Wrap it as `DataLoader(pipeline, batch_size=None or B, num_workers=num_workers,
    collate_fn=...)` with the same `num_workers` (checked; a mismatch raises), and do not pass that
    DataLoader through `accelerator.prepare()` (it would split the data a second time; TRAPS.md).
    Build a new pipeline per epoch.

    Which samples a rank gets (explicit `rank`/`world_size`; torch.distributed is not consulted):
    - shards >= 8 x world_size x max(1, num_workers) (or a single slot): by shard — rank r reads shards r, r+W, r+2W, ...
      of the manifest's order, and its workers split those shards the same way;
    - fewer shards (small sets, many ranks): by sample — every rank and worker reads every shard and
      keeps the samples whose global index g (position in manifest order) has g % W == rank; that
      rank's k-th sample goes to worker k % max(1, num_workers). Nothing is lost or read twice;
      the cost is reading each shard on every rank (logged).
    Either way the set a rank gets is fixed by the manifest, (rank, world_size) and the rule; the
    epoch and seed change only the order: the worker's shards are shuffled with an rng seeded by
    (seed, epoch, rank, worker), then a `shuffle_buffer`-sample buffer (same seeding; 0 turns it
    off) mixes samples across shards. So `rank_plan` can say from the manifest alone what each
    rank will see, and the stream is a pure function of the arguments and the manifest: a resumed
    run can rebuild it and skip the samples it already consumed.
    """
    _check_slot(rank, world_size, num_workers)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    directory = Path(shards_dir)
    manifest = read_manifest(directory)
    paths = _shard_paths(directory, manifest)
    if not paths:
        raise ShardError(f"{directory} holds no shards (0 images were written): nothing to train on")
    images_per_shard = [shard["images"] for shard in manifest["shards"]]
    if not _splits_by_shard(len(paths), world_size, num_workers):
        logger.warning(
            "%s: %d shard(s) for %d rank(s) x %d worker(s): splitting by sample, every rank reads every shard",
            directory,
            len(paths),
            world_size,
            max(1, num_workers),
        )
    stages: list[Any] = [
        _WorkerShards(paths, rank, world_size, num_workers, seed, epoch),
        wds.tarfile_to_samples(),
        _SlotSamples(paths, images_per_shard, rank, world_size, num_workers),
    ]
    if shuffle_buffer > 0:
        stages.append(_SeededShuffle(shuffle_buffer, seed, epoch, rank, num_workers))
    stages += [wds.decode("pil"), wds.map(_as_record)]
    return wds.DataPipeline(*stages)


def _rank_samples(manifest: dict[str, Any], rank: int, world_size: int, num_workers: int) -> tuple[list[int], int, int]:
    """The rule both `rank_plan` and `rank_sample_metas` follow, as the pipeline does:
    (shard indices the rank reads, keep every k-th global sample index, offset)."""
    shards = manifest["shards"]
    if _splits_by_shard(len(shards), world_size, num_workers):
        return list(range(rank, len(shards), world_size)), 1, 0
    return list(range(len(shards))), world_size, rank


def rank_plan(shards_dir: str | os.PathLike[str], rank: int, world_size: int, num_workers: int = 0) -> list[int]:
    """Questions per image of every sample `training_pipeline` gives `rank` in one epoch.

    Computed from the manifest alone (no tar is read), by the same rule as the pipeline, so the
    trainer can compute every rank's sequences and steps before reading any data — each rank can
    compute every other rank's plan too, with no communication. The list is in manifest order, not
    stream order; it is the same for every epoch and seed.
    """
    _check_slot(rank, world_size, num_workers)
    manifest = read_manifest(shards_dir)
    indices, keep_every, offset = _rank_samples(manifest, rank, world_size, num_workers)
    counts = [count for index in indices for count in manifest["shards"][index]["questions_per_image"]]
    if keep_every == 1:
        return counts
    return counts[offset::keep_every]


def rank_sample_metas(
    shards_dir: str | os.PathLike[str], rank: int, world_size: int, num_workers: int = 0
) -> Iterator[dict[str, Any]]:
    """The json (imageId, qa, ...) of every sample `training_pipeline` gives `rank` in one epoch.

    Manifest order, no image decoded: what the trainer needs to plan each rank's sequences
    exactly (their count depends on the question texts, through the tokenizer), before training.
    Reads only the shards the rank reads itself.
    """
    _check_slot(rank, world_size, num_workers)
    directory = Path(shards_dir)
    manifest = read_manifest(directory)
    indices, keep_every, offset = _rank_samples(manifest, rank, world_size, num_workers)
    paths = _shard_paths(directory, manifest)
    base = np.concatenate([[0], np.cumsum([shard["images"] for shard in manifest["shards"]])]).tolist()
    for index in indices:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([paths[index]]),
            wds.tarfile_to_samples(select_files=lambda name: name.endswith(".json")),
        )
        for position, sample in enumerate(pipeline):
            if keep_every == 1 or (base[index] + position) % keep_every == offset:
                yield json.loads(sample["json"])


# --------------------------------------------------------------------------------------------
# Reading: evaluation


class _EvalSelect:
    """Pipeline stage: keep the asked questions, drop images left without any, deal images to ranks."""

    def __init__(self, question_ids: frozenset[str] | None, rank: int, world_size: int) -> None:
        self.question_ids, self.rank, self.world_size = question_ids, rank, world_size

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        kept = 0
        for sample in samples:
            meta = json.loads(sample.pop("json"))
            if self.question_ids is not None:
                meta["qa"] = [qa for qa in meta["qa"] if qa["id"] in self.question_ids]
                if not meta["qa"]:
                    continue
            kept += 1
            if (kept - 1) % self.world_size != self.rank:
                continue
            sample["__meta__"] = meta
            yield sample


def _as_eval_record(sample: dict[str, Any]) -> dict[str, Any]:
    return {"key": sample["__key__"], "image": sample["jpg"], "meta": sample["__meta__"]}


def iter_eval_samples(
    shards_dir: str | os.PathLike[str],
    *,
    question_ids: Iterable[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """The evaluation stream: {"key", "image" (RGB PIL), "meta"} in a fixed order, no shuffle.

    Order: the manifest's shard order, then each shard's sample order (the order they were built
    in). With `question_ids`, each sample's `meta["qa"]` keeps only those questions and images left
    without any are skipped. Images are dealt to ranks round-robin in that order (the k-th kept
    image goes to rank k % world_size), so the union over ranks is every asked question exactly
    once, and the split does not depend on anything but (rank, world_size). Only the images this
    rank keeps are decoded. Read it in the calling process (not through DataLoader workers).
    """
    _check_slot(rank, world_size, 0)
    directory = Path(shards_dir)
    manifest = read_manifest(directory)
    wanted = None if question_ids is None else frozenset(question_ids)
    paths = _shard_paths(directory, manifest)
    if not paths:
        return iter(())
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.tarfile_to_samples(),
        _EvalSelect(wanted, rank, world_size),
        wds.decode("pil"),
        wds.map(_as_eval_record),
    )
    return iter(pipeline)


def iter_eval_metas(
    shards_dir: str | os.PathLike[str],
    *,
    question_ids: Iterable[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """The `meta` of every sample `iter_eval_samples` gives `rank`, reading only the json members
    (same filtering, same round-robin): how much work a rank has, without decoding an image."""
    _check_slot(rank, world_size, 0)
    directory = Path(shards_dir)
    paths = _shard_paths(directory, read_manifest(directory))
    if not paths:  # a shard dir of an empty source; webdataset refuses an empty shard list
        return iter(())
    wanted = None if question_ids is None else frozenset(question_ids)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.tarfile_to_samples(select_files=lambda name: name.endswith(".json")),
        _EvalSelect(wanted, rank, world_size),
    )
    return (sample["__meta__"] for sample in pipeline)


def list_question_ids(shards_dir: str | os.PathLike[str]) -> list[str]:
    """Every question id in a shard dir, sorted (reads only the json members).

    Evaluation draws its subset with `select_question_ids(list_question_ids(dir), N, seed)`.
    """
    return sorted(qa["id"] for meta in iter_eval_metas(shards_dir) for qa in meta["qa"])


def question_rows(shards_dir: str | os.PathLike[str]) -> dict[int, str]:
    """{row index in the source (dataset order): question id} of every question in a shard dir.

    Raises:
        ShardError: the shards were built before questions carried their row (rebuild them).
    """
    rows: dict[int, str] = {}
    for meta in iter_eval_metas(shards_dir):
        for qa in meta["qa"]:
            if "row" not in qa:
                raise ShardError(
                    f"{shards_dir}: question {qa['id']} has no source row index (shards built by an older gqaru); "
                    "rebuild them with `gqaru shards build` to use a row-based selection"
                )
            rows[int(qa["row"])] = qa["id"]
    return rows
