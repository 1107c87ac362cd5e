"""The benchmark runner: one command, every performance goal measured as a ratio within one run.

    python benchmarks/run.py            # or: make bench      (~7 min on 2 shared CPU cores)

Prints a table (each ratio beside its goal, NOT MET said plainly) and writes
`benchmarks/results.json` ({"results": a list of {"id", "measure", "ratio", "goal", "met",
"details"}, "run": where and when it was measured}) and `benchmarks/results.md` (the same as a
Markdown table). A full run to the default results path also rewrites the block between the
`<!-- results.md -->` markers of README.md and benchmarks/README.md; `--readme-only` does only
that, from the results.json there (the tables are generated, never typed). Scratch files (data,
models, runs) go to `benchmarks/out/` (git-ignored), rebuilt on every run.

- P1: training questions/s, gqaru's loop vs a seed-style `Trainer`, and held-out accuracy, on
  GQA-ru train's shape (~1.45 questions per image; goal >= 2x at equal or better accuracy); P1-synth:
  the same on the synthetic default's ~13 per image (goal >= 5x). Each beside the ratio the FLOP
  count of llava-gemma-2b predicts for its shape.
- P2: evaluation questions/s, `gqaru.evaluate` vs one `generate` per question, and the share of
  identical answers; goal >= 10x, >= 99.5% identical.
- P3 (P3-1, P3-2: 1 and 2 workers): shard build bytes/s vs a raw tar write of the same JPEG bytes; goal >= 0.5x.
- P4: shard build peak RSS, 10x larger source vs 1x; goal <= 1.2x.
- P5: loader questions/s vs what the P1 training step consumes (GQA-ru train's shape); goal >= 10x.

How each is measured is in the docstrings of bench_train.py (P1, P5), bench_eval.py (P2) and
bench_shards.py (P3, P4). The GPU benchmark (tokens/s, MFU, memory on the full-size model) is
separate: benchmarks/gpu.py. Numbers from a shared machine move with its load: the details of
every entry hold the machine, torch threads and load averages at the time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import bench_eval
import bench_shards
import bench_train
from bench_common import DEFAULT_THREADS, machine_info

from gqaru.files import replace_marked_block

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "out"
"""The git-ignored scratch space."""
DEFAULT_RESULTS = HERE / "results.json"
READMES = (HERE.parent / "README.md", HERE / "README.md")
"""Files whose block between the markers is the generated results.md."""
RESULTS_MARKER = "results.md"
"""The block sits between `<!-- results.md -->` and `<!-- /results.md -->`."""
ORDER = ("P1", "P1-synth", "P2", "P3-1", "P3-2", "P3", "P4", "P5")
"""Table order: the real-shape P1 leads; ids not listed (info entries) come last."""
WORKDIR_MARKER = ".gqaru-benchmarks"
"""Marks another directory as run.py's scratch space: only such a directory (or the default) is
emptied at the start."""

QUICK_SETTINGS = {
    "train": {"train_questions": 40, "eval_questions": 24, "testdev_questions": 60},
    "eval": {"questions": 12},
    "shards_base_questions": 200,
}
"""Toy sizes for `--quick` (the smoke test): every code path in a minute, numbers meaningless."""


def _format_ratio(entry: dict[str, Any]) -> str:
    ratio = entry["ratio"]
    if entry["goal"] is None:
        return f"{ratio}"
    return f"{ratio}x"


def _met_text(entry: dict[str, Any]) -> str:
    if entry["met"] is None:
        return "(info)"
    return "met" if entry["met"] else "NOT MET"


def _why(entry: dict[str, Any]) -> str:
    """One line on which part of a two-part goal failed."""
    details = entry["details"]
    if entry["met"] is not False:
        return ""
    parts = [
        f"{name.removesuffix('_goal_met')} goal missed"
        for name, value in details.items()
        if name.endswith("_goal_met") and value is False
    ]
    return "; ".join(parts)


def table(results: list[dict[str, Any]]) -> str:
    """The plain-text table printed at the end."""
    rows = [("id", "ratio", "goal", "result", "measure")]
    for entry in results:
        rows.append((entry["id"], _format_ratio(entry), entry["goal"] or "-", _met_text(entry), entry["measure"]))
    widths = [max(len(str(row[column])) for row in rows) for column in range(4)]
    lines = []
    for row in rows:
        cells = [str(row[column]).ljust(widths[column]) for column in range(4)]
        lines.append("  ".join(cells) + "  " + row[4])
    return "\n".join(lines)


def _p1_line(entry: dict[str, Any]) -> str:
    details = entry["details"]
    accuracy = details["accuracy"]
    seed, ours = details["seed_style"], details["gqaru"]
    paired = details["paired_gqaru_minus_seed_style"]
    majority = details["majority_answer_baseline"]
    shape, flops = details.get("data_shape"), details.get("flop_predicted_ratio")
    padding = details.get("padding_pct")
    text = f"{entry['id']}: "
    if shape:
        text += (
            f"{shape['questions_per_image']} questions per image "
            f"({100 * shape['share_of_images_with_1_or_2_questions']:.0f}% of images with one or two), "
            f"{shape['questions_per_sequence']} per gqaru sequence; "
        )
    text += (
        f"{ours['questions_per_s']} vs {seed['questions_per_s']} questions/s ({ours['questions']} questions; "
        f"CPU-time ratio {details['ratio_cpu_time']}x)"
    )
    if flops:
        text += (
            f"; the FLOP count predicts {flops['llava-gemma-2b']}x for llava-gemma-2b at this shape "
            f"({flops['benchmarked_model']}x for the benchmarked model)"
        )
    if padding:
        planned = padding["planned_stream"]
        grouped = {size: next(value for key, value in row.items() if key.startswith("length_grouping"))
                   for size, row in planned.items()}  # fmt: skip
        text += (
            f"; padding gqaru {padding['gqaru']}% (batch {details['settings']['batch_size']}), seed-style "
            f"{padding['seed_style']}%; the planned stream at batch 4 / 8 pads {planned['batch 4']['stream_order']}% / "
            f"{planned['batch 8']['stream_order']}%, grouped by length {grouped['batch 4']}% / {grouped['batch 8']}%"
        )
    text += (
        f"; held-out accuracy gqaru {100 * accuracy['gqaru']:.1f}% vs "
        f"seed-style {100 * accuracy['seed-style']:.1f}% (difference {100 * paired['b_minus_a']:+.1f} points, 95% CI "
        f"{100 * paired['interval_95'][0]:+.1f} to {100 * paired['interval_95'][1]:+.1f}); always answering "
        f"\"{majority['answer']}\" scores {100 * majority['accuracy']:.1f}%"
    )
    if "gqaru-same-lr" in accuracy:
        text += f"; gqaru at the baseline's unscaled lr: {100 * accuracy['gqaru-same-lr']:.1f}%"
    if cut := details.get("accuracy_at_end_of_turn"):
        text += (
            f"; cut at <end_of_turn> (not lmms-eval): gqaru {100 * cut['gqaru']:.1f}% vs seed-style "
            f"{100 * cut['seed-style']:.1f}%"
        )
    return text


def _detail_lines(results: list[dict[str, Any]]) -> list[str]:
    """The few numbers behind the P1 entries and P2, in table order."""
    lines = []
    for entry in results:
        if entry["id"].startswith("P1"):
            lines.append(_p1_line(entry))
        elif entry["id"] == "P2":
            lines.append(_p2_line(entry))
    return lines


def _p2_line(entry: dict[str, Any]) -> str:
    details = entry["details"]
    trained, noisy = details["trained"], details["noisy"]
    return (
        f"P2: trained model {trained['gqaru']['questions_per_s']} vs {trained['loop']['questions_per_s']} questions/s, "
        f"{trained['identical']}/{trained['questions']} identical; noisy model (answers vary: "
        f"{noisy['distinct_predictions']} distinct) {noisy['ratio']}x, "
        f"{noisy['identical']}/{noisy['questions']} identical"
    )


def _parts(summary: dict[str, Any]) -> str:
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["part_seconds"].items())


def markdown(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """results.md: the table plus the few numbers behind P1 and P2, and where they were measured."""
    lines = ["| id | measure | ratio | goal | result |", "|---|---|---:|---|---|"]
    for entry in results:
        result = _met_text(entry)
        why = _why(entry)
        lines.append(
            f"| {entry['id']} | {entry['measure']} | {_format_ratio(entry)} | {entry['goal'] or '-'} | "
            f"{'**' + result + '**' if result == 'NOT MET' else result}{' (' + why + ')' if why else ''} |"
        )
    lines.append("")
    lines += [f"- {line}" for line in _detail_lines(results)]
    machine = summary["machine"]
    lines.append(
        f"- Measured {summary['finished']} on {machine['cpu']} ({machine['cores']} cores, shared), torch "
        f"{machine['torch']} with {summary['threads']} thread(s), transformers {machine['transformers']}; load average "
        f"{summary['loadavg_start']} at the start, {machine['loadavg_1_5_15']} at the end; whole run "
        f"{summary['total_seconds']:.0f} s ({_parts(summary)})."
    )
    return "\n".join(lines) + "\n"


def run_all(workdir: Path, *, quick: bool, threads: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every benchmark in order (shards, training, evaluation); returns the entries and a run summary."""
    started = time.perf_counter()
    load_start = machine_info()["loadavg_1_5_15"]
    part_seconds: dict[str, float] = {}
    results: list[dict[str, Any]] = []

    part = time.perf_counter()
    if quick:
        bench_shards.BASE_QUESTIONS = QUICK_SETTINGS["shards_base_questions"]
    results += bench_shards.run(workdir / "shards")
    part_seconds["shards (P3, P4)"] = time.perf_counter() - part
    print(f"shards done in {part_seconds['shards (P3, P4)']:.0f} s", flush=True)

    part = time.perf_counter()
    train_overrides = {**(QUICK_SETTINGS["train"] if quick else {}), "threads": threads}
    training, artefacts = bench_train.run(workdir / "train", **train_overrides)
    results += training
    part_seconds["training (P1, P1-synth, P5)"] = time.perf_counter() - part
    print(f"training done in {part_seconds['training (P1, P1-synth, P5)']:.0f} s", flush=True)

    part = time.perf_counter()
    eval_overrides = {**(QUICK_SETTINGS["eval"] if quick else {}), "threads": threads}
    results += bench_eval.run(
        workdir / "eval",
        base_model=artefacts["paths"]["model"],
        trained_model=artefacts["gqaru_merged"],
        shards=artefacts["paths"]["testdev_shards"],
        **eval_overrides,
    )
    part_seconds["evaluation (P2)"] = time.perf_counter() - part
    print(f"evaluation done in {part_seconds['evaluation (P2)']:.0f} s", flush=True)

    results.sort(key=lambda entry: ORDER.index(entry["id"]) if entry["id"] in ORDER else len(ORDER))
    summary = {
        "total_seconds": round(time.perf_counter() - started, 1),
        "part_seconds": {name: round(seconds, 1) for name, seconds in part_seconds.items()},
        "loadavg_start": load_start,
        "threads": threads,
        "quick": quick,
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
    }
    for entry in results:
        entry["details"].setdefault("machine", summary["machine"])
    return results, summary


def load_results(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(entries, run summary) of a results.json.

    Raises:
        ValueError: the file is not in run.py's format (an older list-only file says so).
    """
    report = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or not {"results", "run"} <= set(report):
        raise ValueError(f"{path}: not a results file of this run.py (expected an object with results and run)")
    return report["results"], report["run"]


def write_tables(
    results: list[dict[str, Any]], summary: dict[str, Any], results_path: Path, readmes: tuple[Path, ...]
) -> None:
    """results.md beside `results_path`, and the same text in the results block of each of `readmes`."""
    block = markdown(results, summary)
    results_path.with_suffix(".md").write_text(block, encoding="utf-8")
    for readme in readmes:
        text = readme.read_text(encoding="utf-8")
        updated = replace_marked_block(text, RESULTS_MARKER, block, str(readme))
        if updated != text:
            readme.write_text(updated, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", default=str(DEFAULT_WORKDIR), help="scratch dir, emptied first (default benchmarks/out)"
    )
    parser.add_argument(
        "--results", default=str(DEFAULT_RESULTS), help="where results.json goes (results.md beside it)"
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads of every measured process")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the code paths, numbers mean nothing")
    parser.add_argument(
        "--readme-only",
        action="store_true",
        help="measure nothing: rewrite results.md and the README tables from the --results file",
    )
    args = parser.parse_args(argv)
    results_path = Path(args.results)

    if args.readme_only:
        results, summary = load_results(results_path)
        write_tables(results, summary, results_path, READMES)
        print(f"wrote {results_path.with_suffix('.md')} and the results blocks of {', '.join(map(str, READMES))}")
        return 0

    workdir = Path(args.workdir)
    if workdir.exists() and any(workdir.iterdir()):
        ours = (workdir / WORKDIR_MARKER).is_file() or workdir.resolve() == DEFAULT_WORKDIR
        if not ours:
            parser.error(f"--workdir {workdir} is not empty and not an earlier benchmark workdir: refusing to empty it")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).write_text("scratch space of benchmarks/run.py: emptied on every run\n")
    results, summary = run_all(workdir, quick=args.quick, threads=args.threads)

    results_path.parent.mkdir(parents=True, exist_ok=True)
    report = {"results": results, "run": summary}
    results_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    readmes_written = not args.quick and results_path.resolve() == DEFAULT_RESULTS
    write_tables(results, summary, results_path, READMES if readmes_written else ())

    print()
    print(table(results))
    for line in _detail_lines(results):
        print(line)
    missed = [entry for entry in results if entry["met"] is False]
    for entry in missed:
        print(f"NOT MET: {entry['id']} ({entry['goal']}): ratio {entry['ratio']}; {_why(entry) or 'see details'}")
    print(
        f"total {summary['total_seconds']:.0f} s ({_parts(summary)}); "
        f"load average {summary['loadavg_start']} -> {summary['machine']['loadavg_1_5_15']}; "
        f"wrote {results_path} and {results_path.with_suffix('.md')}"
        + (" and the README tables" if readmes_written else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
