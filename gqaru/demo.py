"""The demo's figures: one run's verdict, and their spread over seeds, which the README states.

`make demo` ends with `gqaru demo verdict runs`: the trained, untrained and blind scores of that
run with their intervals, the paired difference to the blind baseline, and whether it falls inside
the range that `make demo-spread` measured. That range is a property of the demo, not of one draw:
the demo pins torch's threads (the same machine kind gives the same bytes), but the figures still
move with the seeds of the tiny model and of the LoRA run, so the README states the spread over
several seeds. `make demo-spread` runs the demo once per seed and then `gqaru demo spread`, which
writes `benchmarks/demo_spread.json` and regenerates the README's table from it (never typed).

A demo run directory (`DEMO_RUNS` in the Makefile) holds the runs the Makefile names:

    demo/              training (config.yaml names the tiny model; its tiny_model.json the base)
    demo-untrained/    predictions.jsonl of the base
    demo-trained/      predictions.jsonl of base + adapter
    demo-blind/        predictions.jsonl of the blind baseline (training answers, no image)
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gqaru.files import replace_marked_block
from gqaru.metrics import END_OF_TURN_FIELD, compute_metrics, paired_comparison, read_predictions, write_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SPREAD_FILE = PROJECT_ROOT / "benchmarks" / "demo_spread.json"
"""Where `gqaru demo spread` writes the figures over seeds, and where the verdict reads its range."""
TRAINING_RUN = "demo"
SCORED_RUNS = {"trained": "demo-trained", "untrained": "demo-untrained", "blind": "demo-blind"}
MARKER = "demo_spread.md"
"""The README's table sits between `<!-- demo_spread.md -->` and `<!-- /demo_spread.md -->`."""


class DemoError(ValueError):
    """A demo run directory that lacks what the figures need; the message names the file."""


def _predictions(runs: Path, name: str) -> list[dict[str, Any]]:
    path = runs / name / "predictions.jsonl"
    if not path.is_file():
        raise DemoError(f"{path} is missing: is {runs} the DEMO_RUNS of a finished `make demo`?")
    return read_predictions(path)


def _percent_points(value: float) -> float:
    return round(100 * value, 2)


def run_figures(runs: str | Path) -> dict[str, Any]:
    """The figures of one demo run directory: scores, paired differences and what the run used."""
    runs = Path(runs)
    records = {label: _predictions(runs, name) for label, name in SCORED_RUNS.items()}
    figures: dict[str, Any] = {"runs": str(runs)}
    for label, rows in records.items():
        headline = compute_metrics(rows)["headline"]
        figures[label] = {
            "accuracy": _percent_points(headline["accuracy"]),
            "interval_95": [_percent_points(bound) for bound in headline["interval"]],
            "correct": headline["correct"],
            "n": headline["n"],
        }
    for against in ("blind", "untrained"):
        figures[f"trained_minus_{against}"] = _difference(records[against], records["trained"], against)
    # Secondary (not lmms-eval): the trained answers cut at the first end-of-turn token. Where they
    # differ from the headline's the answer ran on past the turn: <eos> came late or not at all.
    if all(END_OF_TURN_FIELD in record for record in records["trained"]):
        cut = [{**record, "prediction": record[END_OF_TURN_FIELD]} for record in records["trained"]]
        figures["trained_cut_at_end_of_turn"] = _difference(records["blind"], cut, "blind")
        figures["trained_cut_at_end_of_turn"]["accuracy"] = _percent_points(compute_metrics(cut)["headline"]["accuracy"])
        ran_on = sum(record["prediction"] != record[END_OF_TURN_FIELD] for record in records["trained"])
        figures["trained_cut_at_end_of_turn"]["ran_on"] = _percent_points(ran_on / len(records["trained"]))
    config_path = runs / TRAINING_RUN / "config.yaml"
    if not config_path.is_file():
        raise DemoError(f"{config_path} is missing: the training run of this demo did not finish")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    model = _model_dir(config["model"]["name_or_path"], runs)
    build = json.loads((model / "tiny_model.json").read_text(encoding="utf-8")) if (model / "tiny_model.json").is_file() else {}
    pretraining = build.get("pretraining") or {}
    figures["seed"] = {"tiny_model": build.get("seed"), "lora": config["train"]["seed"]}
    figures["torch_threads"] = {
        "tiny_model": (build.get("torch_threads") or {}).get("count"),
        "runs": (config.get("runtime") or {}).get("torch_threads"),
    }
    figures["base_held_out_word_accuracy"] = (pretraining.get("held_out_word_accuracy") or {}).get("all words")
    return figures


def _model_dir(name: str, runs: Path) -> Path:
    """The training run's model dir: as given (relative to where `make demo` ran), else relative to
    an ancestor of the run directory (figures read from elsewhere)."""
    model = Path(name)
    if model.is_absolute() or model.is_dir():
        return model
    for ancestor in runs.resolve().parents:
        if (ancestor / model).is_dir():
            return ancestor / model
    return model


def _difference(baseline: Sequence[Mapping[str, Any]], trained: Sequence[Mapping[str, Any]], label: str) -> dict[str, Any]:
    compared = paired_comparison(baseline, trained, label_a=label, label_b="trained")
    return {
        "points": _percent_points(compared["difference"]["b_minus_a"]),
        "interval_95": [_percent_points(bound) for bound in compared["difference"]["interval"]],
        "mcnemar_exact_p": compared["mcnemar_exact_p"],
        "n_shared": compared["n_shared"],
    }


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


def spread(runs_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """The figures of several demo runs (one per seed) and their mean and range."""
    if not runs_dirs:
        raise DemoError("no demo run directories given")
    per_seed = [run_figures(runs) for runs in runs_dirs]
    questions = {figures["trained"]["n"] for figures in per_seed}
    if len(questions) != 1:
        raise DemoError(f"the runs answered different numbers of questions ({sorted(questions)}): not one demo")
    summary = {label: _summary([figures[label]["accuracy"] for figures in per_seed]) for label in SCORED_RUNS}
    for against in ("blind", "untrained"):
        key = f"trained_minus_{against}"
        summary[key] = _summary([figures[key]["points"] for figures in per_seed])
    if all("trained_cut_at_end_of_turn" in figures for figures in per_seed):
        cut = [figures["trained_cut_at_end_of_turn"] for figures in per_seed]
        summary["trained_cut_at_end_of_turn"] = _summary([figures["accuracy"] for figures in cut])
        summary["trained_cut_at_end_of_turn_minus_blind"] = _summary([figures["points"] for figures in cut])
        if all("ran_on" in figures for figures in cut):
            summary["trained_ran_on"] = _summary([figures["ran_on"] for figures in cut])
    return {
        "questions": questions.pop(),
        "seeds": per_seed,
        "summary": summary,
        "measured": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {_cpu_name()}",
        },
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _seed_text(figures: Mapping[str, Any]) -> str:
    seeds = figures["seed"]
    if seeds["tiny_model"] == seeds["lora"]:
        return str(seeds["lora"])
    return f"{seeds['tiny_model']}/{seeds['lora']}"


def _cut_text(figures: Mapping[str, Any]) -> str:
    cut = figures.get("trained_cut_at_end_of_turn")
    return "- | -" if cut is None else f"{cut['accuracy']:.2f}% ({cut['points']:+.2f} over blind) | {_ran_on_text(cut)}"


def _ran_on_text(cut: Mapping[str, Any]) -> str:
    return "-" if cut.get("ran_on") is None else f"{cut['ran_on']:.2f}%"


def _interval(bounds: Sequence[float], sign: bool = False) -> str:
    form = "{:+.2f}" if sign else "{:.2f}"
    return f"[{form.format(bounds[0])}, {form.format(bounds[1])}]"


def spread_markdown(record: Mapping[str, Any]) -> str:
    """The README's table of a spread record: one row per seed, then the claim it supports."""
    lines = [
        "| seed | trained | untrained | blind | trained − blind, points (95% CI) | trained, cut at the end of turn (not lmms-eval) "
        "| trained answers that ran on past the end of turn | base's held-out grounding |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for figures in record["seeds"]:
        difference = figures["trained_minus_blind"]
        base = figures["base_held_out_word_accuracy"]
        lines.append(
            f"| {_seed_text(figures)} | {figures['trained']['accuracy']:.2f}% | {figures['untrained']['accuracy']:.2f}% | "
            f"{figures['blind']['accuracy']:.2f}% | {difference['points']:+.2f} {_interval(difference['interval_95'], True)} | "
            f"{_cut_text(figures)} | {'-' if base is None else f'{100 * base:.1f}%'} |"
        )
    summary = record["summary"]
    over_blind, trained = summary["trained_minus_blind"], summary["trained"]
    seeds = ", ".join(_seed_text(figures) for figures in record["seeds"])
    lines += [
        "",
        f"Over seeds {seeds} ({record['questions']} testdev questions; measured {record['measured']['date']} on "
        f"{record['measured']['machine']}): the trained model's margin over the blind baseline is "
        f"**{over_blind['min']:+.2f} to {over_blind['max']:+.2f} points** (mean {over_blind['mean']:+.2f}); it scores "
        f"{trained['min']:.2f}–{trained['max']:.2f}% (mean {trained['mean']:.2f}%), the untrained base "
        f"{summary['untrained']['min']:.2f}–{summary['untrained']['max']:.2f}%, the blind baseline "
        f"{summary['blind']['min']:.2f}–{summary['blind']['max']:.2f}%."
        + _cut_summary(summary),
    ]
    return "\n".join(lines) + "\n"


def _cut_summary(summary: Mapping[str, Any]) -> str:
    """The sentence on the secondary figure: whether any answer ran on past the end of turn."""
    cut, ran_on = summary.get("trained_cut_at_end_of_turn_minus_blind"), summary.get("trained_ran_on")
    if cut is None:
        return ""
    if ran_on is not None and ran_on["max"] == 0:
        return " No trained answer of any seed ran on past the end of turn: cut there, the figures are the same."
    said = (
        f" Cut at the end of turn (secondary, not lmms-eval), the trained model beats the blind baseline by "
        f"{cut['min']:+.2f} to {cut['max']:+.2f} points"
    )
    return said + (f"; {ran_on['min']:.2f}–{ran_on['max']:.2f}% of its answers ran on past it." if ran_on else ".")


def verdict(figures: Mapping[str, Any], record: Mapping[str, Any] | None) -> str:
    """The lines `make demo` ends with: the run's scores, its margin over the blind baseline, and
    whether that margin is inside the range over seeds that the README states."""
    trained, untrained, blind = figures["trained"], figures["untrained"], figures["blind"]
    difference = figures["trained_minus_blind"]
    threads = figures["torch_threads"]["runs"]
    lines = [
        f"demo verdict (seed {_seed_text(figures)}, torch threads {threads if threads else 'unpinned'}, "
        f"{trained['n']} testdev questions; exact match, 95% intervals):",
        f"  trained    {trained['accuracy']:6.2f}%  {_interval(trained['interval_95'])}",
        f"  untrained  {untrained['accuracy']:6.2f}%  {_interval(untrained['interval_95'])}",
        f"  blind      {blind['accuracy']:6.2f}%  {_interval(blind['interval_95'])}  (the training answers, no image)",
        f"  LoRA beats the blind baseline by {difference['points']:+.2f} points {_interval(difference['interval_95'], True)}"
        f" (McNemar p {difference['mcnemar_exact_p']:.1e})"
        if difference["points"] > 0
        else f"  LoRA does NOT beat the blind baseline: {difference['points']:+.2f} points "
        f"{_interval(difference['interval_95'], True)}",
    ]
    if cut := figures.get("trained_cut_at_end_of_turn"):
        lines.insert(
            2,
            f"  trained, cut at the end of turn {cut['accuracy']:6.2f}%  (secondary, not lmms-eval: "
            f"{cut['points']:+.2f} points over blind; {_ran_on_text(cut)} of the answers ran on past the end of turn)",
        )
    if record is None:
        lines.append(f"  no spread on record ({SPREAD_FILE.name}): `make demo-spread` measures the range")
        return "\n".join(lines)
    low, high = record["summary"]["trained_minus_blind"]["min"], record["summary"]["trained_minus_blind"]["max"]
    seeds = ", ".join(_seed_text(seed_figures) for seed_figures in record["seeds"])
    inside = low <= difference["points"] <= high
    lines.append(
        f"  the README's range over seeds {seeds}: {low:+.2f} to {high:+.2f} points over blind -> "
        + ("inside" if inside else "OUTSIDE (see README, 'The demo's figures')")
    )
    return "\n".join(lines)


def read_spread(path: str | Path = SPREAD_FILE) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def verdict_command(runs: str, spread_file: str | None = None) -> int:
    try:
        print(verdict(run_figures(runs), read_spread(spread_file or SPREAD_FILE)))
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def spread_command(runs_dirs: Sequence[str], out: str | None = None, readme: str | None = None) -> int:
    try:
        record = spread(runs_dirs)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_path = write_json(out or SPREAD_FILE, record)
    table = spread_markdown(record)
    print(table, end="")
    print(f"wrote {out_path}")
    if readme:
        path = Path(readme)
        path.write_text(replace_marked_block(path.read_text(encoding="utf-8"), MARKER, table, str(path)), encoding="utf-8")
        print(f"regenerated the table in {path}")
    return 0
