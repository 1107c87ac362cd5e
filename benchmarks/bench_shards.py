"""Shard benchmarks (not tests): build throughput (P3), peak memory as the source grows (P4), reading.

    python benchmarks/bench_shards.py [--workdir DIR]     # prints a table; ~30-60 s on 2 cores

or `run(workdir)` from benchmarks/run.py, which returns entries in the shared format
{"id", "measure", "ratio", "goal", "met", "details"}.

The source is the synthetic GQA-ru set (`gqaru.standins.synth.write_synthetic_gqa`, GQA-sized JPEGs of flat
shapes, ~11 KB each; real GQA photos are ~60 KB, which makes per-byte rates look better there).

- P3-1, P3-2: JPEG bytes per second of `build_shards` over the 10x source with 1 worker (checks in
  the building process) and with 2 (a pool of two check processes beside it), against a raw
  `tarfile` write of the same JPEG bytes read from the same parquet files with pyarrow (the floor:
  no join, no checks, no json). In this process after imports, the three interleaved (raw, 1
  worker, 2 workers) 3 times, best of each, so drifting load hits all sides. ratio = ours / raw,
  goal >= 0.5. The details time the parts too: the decode check alone (every image decoded
  once, as the build must), the source reader alone (`SplitReader`: opening the configs, text
  checks, selection, the join), and the building process's CPU seconds.
- P4: peak memory of a build (2 workers) of the 1x and of the 10x source, each in a fresh process
  that imports the same libraries first (so the ratio compares builds, not import sets). Nothing
  is subtracted, but on Linux the high-water mark is reset after the imports (/proc/self/clear_refs),
  so the peak is the build's (libraries included) and not an import-time transient, and it is read
  from VmHWM: a subprocess's ru_maxrss inherits its parent's peak. The check workers are forked, so
  their RSS is mostly pages they share with the builder; what they add is their private memory
  (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup), sampled every 10 ms for every child
  and summed. peak = builder's VmHWM + the largest sum of the children's private memory.
  ratio = peak10x / peak1x, goal <= 1.2. The details give the same for 1 worker (no children) and
  the children's own VmHWM (shared pages included).
- Read: samples/s of `training_pipeline` (shuffle buffer 256, images decoded to RGB PIL) over the
  10x shards in one process. Informational (goal None); ratio holds the samples/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BASE_QUESTIONS = 2000
"""Train questions of the 1x source (~150 images); the 10x source has ten times as many."""
REPEATS = 3
WORKER_COUNTS = (1, 2)
"""P3 is measured with each; P4 with the last."""


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


def _load_average() -> list[float] | None:
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that ended and were waited for
    return usage.ru_utime + usage.ru_stime


def _timed_build(source: Path, out: Path, workers: int) -> tuple[float, float, float, dict[str, Any]]:
    """Wall seconds, CPU seconds of this process (the builder), CPU seconds of the builder and its
    workers together, and the manifest of one build."""
    from gqaru.shards import build_shards

    started, cpu_started, children_started = time.perf_counter(), time.process_time(), _children_cpu_seconds()
    manifest = build_shards(str(source), split="train", out_dir=out, workers=workers, verbose=False)
    seconds, builder_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, builder_cpu, builder_cpu + _children_cpu_seconds() - children_started, manifest


def _reader_seconds(source: Path) -> float:
    """Seconds to open the source, check and select its questions and join them to every image
    (`SplitReader`, what the builder does before any check or write), questions made into json dicts."""
    from gqaru.sources import SplitReader

    started = time.perf_counter()
    for item in SplitReader(str(source), "train"):
        [question.to_json() for question in item.questions]
    return time.perf_counter() - started


def measure_build_throughput(source: Path, workdir: Path) -> list[dict[str, Any]]:
    """P3 for each of WORKER_COUNTS, against one raw-write measurement (interleaved repeats)."""
    from gqaru.shards import prepare_image

    _import_everything()
    load_start = _load_average()
    raw_seconds = raw_cpu_seconds = float("inf")
    jpeg_bytes = 0
    best: dict[int, tuple[float, float, float]] = {workers: (float("inf"),) * 3 for workers in WORKER_COUNTS}
    manifests: dict[int, dict[str, Any]] = {}
    for _ in range(REPEATS):
        cpu_started = time.process_time()
        seconds, jpeg_bytes = _raw_tar_write(source, workdir / "raw.tar")
        raw_cpu_seconds = min(raw_cpu_seconds, time.process_time() - cpu_started)
        raw_seconds = min(raw_seconds, seconds)
        for workers in WORKER_COUNTS:
            *times, manifests[workers] = _timed_build(source, workdir / f"shards-10x-{workers}", workers)
            best[workers] = min(best[workers], tuple(times))
    images = _source_jpegs(source)
    assert sum(len(data) for _, data in images) == jpeg_bytes
    assert all(manifest["counts"]["images"] == len(images) for manifest in manifests.values())
    check_seconds = reader_seconds = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _, data in images:
            prepare_image(data)
        check_seconds = min(check_seconds, time.perf_counter() - started)
        reader_seconds = min(reader_seconds, _reader_seconds(source))
    load_end = _load_average()
    raw_rate = jpeg_bytes / raw_seconds
    entries = []
    for workers in WORKER_COUNTS:
        ours_seconds, ours_cpu_seconds, ours_total_cpu_seconds = best[workers]
        ours_rate = jpeg_bytes / ours_seconds
        ratio = ours_rate / raw_rate
        entries.append(
            {
                "id": f"P3-{workers}",
                "measure": (
                    f"build throughput, JPEG bytes/s: build_shards ({workers} worker{'s' if workers > 1 else ''}) "
                    "/ raw tarfile write of the same bytes"
                ),
                "ratio": round(ratio, 3),
                "goal": ">= 0.5",
                "met": ratio >= 0.5,
                "details": {
                    "workers": workers,
                    "images": len(images),
                    "questions": manifests[workers]["counts"]["questions"],
                    "jpeg_megabytes": round(jpeg_bytes / 1e6, 2),
                    "raw_seconds": round(raw_seconds, 3),
                    "build_seconds": round(ours_seconds, 3),
                    "raw_cpu_seconds": round(raw_cpu_seconds, 3),
                    "build_cpu_seconds_builder": round(ours_cpu_seconds, 3),
                    "build_cpu_seconds_with_workers": round(ours_total_cpu_seconds, 3),
                    "ratio_cpu_time": round(raw_cpu_seconds / ours_total_cpu_seconds, 3),
                    "raw_MB_per_s": round(raw_rate / 1e6, 1),
                    "build_MB_per_s": round(ours_rate / 1e6, 1),
                    "build_images_per_s": round(len(images) / ours_seconds, 1),
                    "decode_check_seconds": round(check_seconds, 3),
                    "reader_seconds": round(reader_seconds, 3),
                    "ratio_if_reader_were_free": round(raw_seconds / max(ours_seconds - reader_seconds, 1e-9), 3),
                    "loadavg_start": load_start,
                    "loadavg_end": load_end,
                },
            }
        )
    return entries


def _build_in_fresh_process(source: Path, out: Path, workers: int) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, "--build-child", str(source), str(out), str(workers)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child_pids() -> set[int]:
    """Pids of this process's children (any of its threads may have started them)."""
    pids: set[int] = set()
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids.update(int(pid) for pid in children.read_text().split())
        except OSError:  # the thread ended meanwhile
            continue
    return pids


def _private_and_peak_megabytes(pid: int) -> tuple[float, float] | None:
    """(Private_Clean + Private_Dirty, VmHWM) of a process, or None once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = ("Private_Clean:", "Private_Dirty:")
    private = sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith(fields))
    peak = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return private / 1024, peak / 1024


class _ChildMemorySampler(threading.Thread):
    """Samples the children's memory every 10 ms: the largest sum of their private memory seen at
    one time, and each child's last VmHWM (shared pages included)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_private_sum_mb = 0.0
        self.peak_rss_mb: dict[int, float] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.01):
            total = 0.0
            for pid in _child_pids():
                measured = _private_and_peak_megabytes(pid)
                if measured is not None:
                    total += measured[0]
                    self.peak_rss_mb[pid] = measured[1]
            self.peak_private_sum_mb = max(self.peak_private_sum_mb, total)
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _build_child(source: str, out: str, workers: str) -> None:
    """Runs in the fresh process of P4: import, build, report the peak memory as the last stdout line."""
    _import_everything()
    import_peak = _peak_rss_megabytes()
    after_imports = _proc_status_megabytes("VmRSS")
    peak_was_reset = _reset_peak_rss()
    from gqaru.shards import build_shards

    sampler = _ChildMemorySampler()
    sampler.start()
    started = time.perf_counter()
    manifest = build_shards(source, split="train", out_dir=out, workers=int(workers), verbose=False)
    seconds = time.perf_counter() - started
    sampler.stop()
    builder_peak = _peak_rss_megabytes()
    print(
        json.dumps(
            {
                "workers": int(workers),
                "peak_mb": round(builder_peak + sampler.peak_private_sum_mb, 1),
                "builder_peak_rss_mb": round(builder_peak, 1),
                "workers_peak_private_mb": round(sampler.peak_private_sum_mb, 1),
                "workers_peak_rss_mb": [round(peak, 1) for peak in sampler.peak_rss_mb.values()],
                "memory_samples": sampler.samples,
                "peak_reset_after_imports": peak_was_reset,
                "import_peak_rss_mb": round(import_peak, 1),
                "rss_after_imports_mb": None if after_imports is None else round(after_imports, 1),
                "seconds": round(seconds, 3),
                "images": manifest["counts"]["images"],
                "questions": manifest["counts"]["questions"],
                "megabytes": round(manifest["counts"]["bytes"] / 1e6, 2),
            }
        )
    )


def measure_peak_memory(sources: dict[int, Path], workdir: Path) -> dict[str, Any]:
    runs = {
        workers: {
            scale: _build_in_fresh_process(source, workdir / f"memory-{scale}x-{workers}", workers)
            for scale, source in sources.items()
        }
        for workers in (WORKER_COUNTS[0], WORKER_COUNTS[-1])
    }
    ratios = {workers: scales[10]["peak_mb"] / scales[1]["peak_mb"] for workers, scales in runs.items()}
    workers = WORKER_COUNTS[-1]
    return {
        "id": "P4",
        "measure": (
            f"peak memory of a build ({workers} workers: builder's RSS + workers' private memory), "
            "source 10x / source 1x (fresh processes, same imports)"
        ),
        "ratio": round(ratios[workers], 3),
        "goal": "<= 1.2",
        "met": ratios[workers] <= 1.2,
        "details": {
            "1x": runs[workers][1],
            "10x": runs[workers][10],
            f"ratio_{WORKER_COUNTS[0]}_worker": round(ratios[WORKER_COUNTS[0]], 3),
            f"{WORKER_COUNTS[0]}_worker": runs[WORKER_COUNTS[0]],
        },
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
    builds = measure_build_throughput(sources[10], workdir)
    memory = measure_peak_memory(sources, workdir)
    read = measure_read_throughput(workdir / f"shards-10x-{WORKER_COUNTS[0]}")
    return [*builds, memory, read]


def _print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'id':<12} {'ratio':>9} {'goal':>7} {'met':>5}  measure")
    for result in results:
        met = "-" if result["met"] is None else ("yes" if result["met"] else "NO")
        print(f"{result['id']:<12} {result['ratio']:>9} {result['goal'] or '-':>7} {met:>5}  {result['measure']}")
        print(f"{'':<12} {json.dumps(result['details'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temporary one)")
    parser.add_argument("--build-child", nargs=3, metavar=("SOURCE", "OUT", "WORKERS"), help=argparse.SUPPRESS)
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
