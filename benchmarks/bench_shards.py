"""Shard benchmarks (not tests): build throughput (P3), peak memory as the source grows (P4), reading.

    python benchmarks/bench_shards.py [--workdir DIR]     # prints a table; ~30-60 s on 2 cores

or `run(workdir)` from benchmarks/run.py, which returns entries in the shared format
{"id", "measure", "ratio", "goal", "met", "details"}.

The source is the synthetic GQA-ru set (`gqaru.standins.synth.write_synthetic_gqa`, GQA-sized JPEGs of flat
shapes, ~11 KB each; real GQA photos are ~60 KB, which makes per-byte rates look better there).

- P3: JPEG bytes per second of `build_shards` over the 10x source, against a raw `tarfile` write of
  the same JPEG bytes read from the same parquet files with pyarrow (the floor: no join, no
  checks, no json). Best of 3 each, in this process after imports. ratio = ours / raw, goal >= 0.5.
  The details also time the decode check alone (every image decoded once, as the build must),
  since on small JPEGs that check is most of the difference.
- P4: peak RSS of a build of the 1x and of the 10x source, each in a fresh process that imports the
  same libraries first (so the ratio compares builds, not import sets). Nothing is subtracted, but
  on Linux the high-water mark is reset after the imports (/proc/self/clear_refs), so the peak is
  the build's (libraries included) and not an import-time transient, and it is read from VmHWM:
  a subprocess's ru_maxrss inherits its parent's peak. ratio = peak10x / peak1x, goal <= 1.2.
- Read: samples/s of `training_pipeline` (shuffle buffer 256, images decoded to RGB PIL) over the
  10x shards in one process. Informational (goal None); ratio holds the samples/s.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BASE_QUESTIONS = 2000
"""Train questions of the 1x source (~150 images); the 10x source has ten times as many."""
REPEATS = 3


def _proc_status_megabytes(field: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def _peak_rss_megabytes() -> float:
    """This process's peak RSS.

    On Linux, VmHWM of /proc/self/status: `ru_maxrss` of a child started by subprocess inherits
    the parent's peak (it is carried across exec), so a fresh process would report the benchmark
    driver's memory, not its own. Elsewhere, ru_maxrss (bytes on macOS, KiB on Linux).
    """
    high_water = _proc_status_megabytes("VmHWM")
    if high_water is not None:
        return high_water
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so import-time transients do not hide the build's peak."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return False
    try:
        clear_refs.write_text("5")
    except OSError:
        return False
    return True


def _import_everything() -> None:
    """The libraries a build touches, imported up front so every measured process holds the same set."""
    import datasets  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import webdataset  # noqa: F401

    import gqaru.shards  # noqa: F401


def make_source(directory: Path, train_questions: int) -> Path:
    from gqaru.standins.synth import write_synthetic_gqa

    if not (directory / "README.md").is_file():
        write_synthetic_gqa(directory, train_questions=train_questions, testdev_questions=30, seed=0)
    return directory


def _source_jpegs(source: Path) -> list[tuple[str, bytes]]:
    import pyarrow.parquet as pq

    images = []
    for path in sorted((source / "train_balanced_images").glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(columns=["id", "image"], batch_size=100):
            ids = batch.column("id").to_pylist()
            data = batch.column("image").field("bytes").to_pylist()
            images.extend(zip(ids, data, strict=True))
    return images


def _raw_tar_write(source: Path, out: Path) -> tuple[float, int]:
    """Seconds and JPEG bytes to copy every image of the source into one tar, with nothing else."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    total = 0
    with tarfile.open(out, "w") as tar:
        for path in sorted((source / "train_balanced_images").glob("*.parquet")):
            for batch in pq.ParquetFile(path).iter_batches(columns=["id", "image"], batch_size=100):
                ids = batch.column("id").to_pylist()
                for image_id, data in zip(ids, batch.column("image").field("bytes").to_pylist(), strict=True):
                    member = tarfile.TarInfo(f"{image_id}.jpg")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
                    total += len(data)
    return time.perf_counter() - started, total


def measure_build_throughput(source: Path, workdir: Path) -> dict[str, Any]:
    from gqaru.shards import build_shards, prepare_image

    _import_everything()
    raw_seconds, jpeg_bytes = min(_raw_tar_write(source, workdir / "raw.tar") for _ in range(REPEATS))
    ours_seconds = float("inf")
    manifest: dict[str, Any] = {}
    for _ in range(REPEATS):
        started = time.perf_counter()
        manifest = build_shards(str(source), split="train", out_dir=workdir / "shards-10x", verbose=False)
        ours_seconds = min(ours_seconds, time.perf_counter() - started)
    images = _source_jpegs(source)
    assert sum(len(data) for _, data in images) == jpeg_bytes and manifest["counts"]["images"] == len(images)
    check_seconds = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _, data in images:
            prepare_image(data)
        check_seconds = min(check_seconds, time.perf_counter() - started)
    raw_rate, ours_rate = jpeg_bytes / raw_seconds, jpeg_bytes / ours_seconds
    ratio = ours_rate / raw_rate
    return {
        "id": "P3",
        "measure": "build throughput, JPEG bytes/s: build_shards / raw tarfile write of the same bytes",
        "ratio": round(ratio, 3),
        "goal": ">= 0.5",
        "met": ratio >= 0.5,
        "details": {
            "images": len(images),
            "questions": manifest["counts"]["questions"],
            "jpeg_megabytes": round(jpeg_bytes / 1e6, 2),
            "raw_seconds": round(raw_seconds, 3),
            "build_seconds": round(ours_seconds, 3),
            "raw_MB_per_s": round(raw_rate / 1e6, 1),
            "build_MB_per_s": round(ours_rate / 1e6, 1),
            "build_images_per_s": round(len(images) / ours_seconds, 1),
            "decode_check_seconds": round(check_seconds, 3),
            "ratio_without_decode_check": round(raw_seconds / max(ours_seconds - check_seconds, 1e-9), 3),
        },
    }


def _build_in_fresh_process(source: Path, out: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, "--build-child", str(source), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _build_child(source: str, out: str) -> None:
    """Runs in the fresh process of P4: import, build, report the peak RSS as the last stdout line."""
    _import_everything()
    import_peak = _peak_rss_megabytes()
    after_imports = _proc_status_megabytes("VmRSS")
    peak_was_reset = _reset_peak_rss()
    from gqaru.shards import build_shards

    started = time.perf_counter()
    manifest = build_shards(source, split="train", out_dir=out, verbose=False)
    print(
        json.dumps(
            {
                "peak_rss_mb": round(_peak_rss_megabytes(), 1),
                "peak_reset_after_imports": peak_was_reset,
                "import_peak_rss_mb": round(import_peak, 1),
                "rss_after_imports_mb": None if after_imports is None else round(after_imports, 1),
                "seconds": round(time.perf_counter() - started, 3),
                "images": manifest["counts"]["images"],
                "questions": manifest["counts"]["questions"],
                "megabytes": round(manifest["counts"]["bytes"] / 1e6, 2),
            }
        )
    )


def measure_peak_memory(sources: dict[int, Path], workdir: Path) -> dict[str, Any]:
    runs = {scale: _build_in_fresh_process(source, workdir / f"memory-{scale}x") for scale, source in sources.items()}
    ratio = runs[10]["peak_rss_mb"] / runs[1]["peak_rss_mb"]
    return {
        "id": "P4",
        "measure": "peak RSS of a build, source 10x / source 1x (fresh processes, same imports)",
        "ratio": round(ratio, 3),
        "goal": "<= 1.2",
        "met": ratio <= 1.2,
        "details": {"1x": runs[1], "10x": runs[10]},
    }


def measure_read_throughput(shards: Path) -> dict[str, Any]:
    from gqaru.shards import training_pipeline

    started = time.perf_counter()
    samples = questions = 0
    for sample in training_pipeline(shards, seed=0, epoch=0, shuffle_buffer=256):
        samples += 1
        questions += len(sample["meta"]["qa"])
    seconds = time.perf_counter() - started
    return {
        "id": "shards-read",
        "measure": "training_pipeline read throughput, samples/s (images decoded to RGB PIL)",
        "ratio": round(samples / seconds, 1),
        "goal": None,
        "met": None,
        "details": {"samples": samples, "questions": questions, "seconds": round(seconds, 3),
                    "questions_per_s": round(questions / seconds, 1)},
    }


def run(workdir: Path) -> list[dict[str, Any]]:
    """All shard benchmarks, in the shared result format; scratch files go under `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sources = {
        1: make_source(workdir / "source-1x", BASE_QUESTIONS),
        10: make_source(workdir / "source-10x", 10 * BASE_QUESTIONS),
    }
    build = measure_build_throughput(sources[10], workdir)
    memory = measure_peak_memory(sources, workdir)
    read = measure_read_throughput(workdir / "shards-10x")
    return [build, memory, read]


def _print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'id':<12} {'ratio':>9} {'goal':>7} {'met':>5}  measure")
    for result in results:
        met = "-" if result["met"] is None else ("yes" if result["met"] else "NO")
        print(f"{result['id']:<12} {result['ratio']:>9} {result['goal'] or '-':>7} {met:>5}  {result['measure']}")
        print(f"{'':<12} {json.dumps(result['details'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temporary one)")
    parser.add_argument("--build-child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_child:
        _build_child(*args.build_child)
        return 0
    if args.workdir:
        results = run(Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-shards-") as scratch:
            results = run(Path(scratch))
    _print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
