"""What the benchmark modules share: machine facts, fresh child processes, the thread policy.

Thread policy: every measured process runs torch with ONE thread unless told otherwise. On this
project's 2-core machines, shared with other work, two torch threads spin against each other at
every parallel region: one LoRA step of the real-shape tiny model took 10 s with 2 threads and
0.11 s with 1 (measured here, load average ~3.7). Both sides of every comparison get the same
setting, so ratios stay fair; `--threads N` changes it for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_THREADS = 1

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout these benchmarks belong to: its `gqaru` is the one measured, in this process and in
every child process (PYTHONPATH), even where the environment's editable install points at another
checkout (an `pip install -e` elsewhere re-points a shared venv)."""
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, load average and library versions: what a number was measured on."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def child_environment(threads: int) -> dict[str, str]:
    """The environment of a measured child: offline, quiet tokenizers, `threads` OpenMP threads."""
    environment = dict(os.environ)
    environment.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    environment.pop("ACCELERATE_USE_CPU", None)
    return environment


def run_script_phase(
    script: Path, phase: str, workdir: Path, settings: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run `script --phase PHASE --workdir W --settings JSON --extra JSON` in a fresh process.

    The child writes its result to W/<phase>.json (read back here) and its output goes to
    W/<phase>.log. A fresh process per phase keeps one side's caches, threads and accelerate's
    process-wide state away from the other side's measurement.

    Raises:
        RuntimeError: the child failed; the message holds the end of its log.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{phase}.log"
    result_file = workdir / f"{phase}.json"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable, str(script), "--phase", phase, "--workdir", str(workdir),
        "--settings", json.dumps(settings), "--extra", json.dumps(extra or {}),
    ]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as stream:
        completed = subprocess.run(
            command,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=child_environment(settings.get("threads", DEFAULT_THREADS)),
        )
    if completed.returncode != 0 or not result_file.is_file():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"benchmark phase {phase} of {script.name} failed (exit {completed.returncode}); end of {log}:\n{tail}"
        )
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def add_phase_arguments(parser: argparse.ArgumentParser, phases: tuple[str, ...]) -> None:
    """The hidden arguments `run_script_phase` passes to a benchmark script's child process."""
    parser.add_argument("--phase", choices=phases, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)


def run_requested_phase(args: argparse.Namespace, run_phase: Any, defaults: dict[str, Any]) -> bool:
    """In a child started by `run_script_phase`: run its phase and say so (False: not a child)."""
    if not args.phase:
        return False
    run_phase(args.phase, Path(args.workdir), {**defaults, **json.loads(args.settings)}, json.loads(args.extra))
    return True


def write_phase_result(workdir: Path, phase: str, result: dict[str, Any]) -> None:
    """What a child does last: its result plus the machine facts, as workdir/<phase>.json."""
    result["machine"] = machine_info()
    (workdir / f"{phase}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
