"""The demo's pipeline end to end through the same commands `make demo` runs, at a small size:
synth (one-hop set) -> pretrained tiny model (the session's, 600 steps) -> shards -> evaluate untrained -> train -> evaluate
trained -> score --against, then the blind baseline and the score against it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def gqaru(*args: str, cwd: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_demo_pipeline_trained_beats_untrained_on_the_paired_test(tmp_path: Path, pretrained_tiny_dir: Path) -> None:
    configs = REPO_ROOT / "configs"
    gqaru("gqaru.cli", "synth", "--out", "data/synth-gqa-ru", "--train-questions", "1500", "--testdev-questions", "400",
          "--templates", "one-hop", cwd=tmp_path)  # fmt: skip
    # The demo pretrains 2,800 steps (~6 min); the session's 600-step base (`gqaru tiny-model
    # --pretrain-steps 600`, tests/test_pretrain.py checks the command) runs every stage of it.
    shutil.copytree(pretrained_tiny_dir, tmp_path / "models" / "tiny-llava")
    for split in ("train", "testdev"):
        gqaru("gqaru.cli", "shards", "build", "--source", "data/synth-gqa-ru", "--split", split,
              "--out", f"shards/demo-{split}", cwd=tmp_path)  # fmt: skip
    launch = ["accelerate.commands.launch", "--config_file", str(REPO_ROOT / "launch/cpu.yaml")]
    evaluate = [*launch, "-m", "gqaru.evaluate", str(configs / "demo_eval.yaml"), "eval.report=false"]
    gqaru(*evaluate, "output.run_name=demo-untrained", cwd=tmp_path)
    gqaru(*launch, "-m", "gqaru.train", str(configs / "demo_train.yaml"), "train.save_every=null", cwd=tmp_path)
    gqaru(*evaluate, "model.adapter=runs/demo/adapter", "output.run_name=demo-trained", cwd=tmp_path)
    printed = gqaru(
        "gqaru.cli", "score", "runs/demo-trained/predictions.jsonl",
        "--against", "runs/demo-untrained/predictions.jsonl", "--out", "comparison.json", cwd=tmp_path,
    )  # fmt: skip

    comparison = json.loads((tmp_path / "comparison.json").read_text())["comparison"]
    assert comparison["n_shared"] == 400
    assert comparison["labels"]["b"] == "runs/demo-trained/predictions.jsonl"
    assert comparison["b"]["accuracy"] > comparison["a"]["accuracy"]
    assert comparison["mcnemar_exact_p"] < 0.01
    assert re.search(r"difference B - A: \+\d", printed)
    # The trained model answers in the task's format: one short answer, no chat debris.
    predictions = [json.loads(line) for line in (tmp_path / "runs/demo-trained/predictions.jsonl").read_text().splitlines()]
    assert all(record["prediction"] and len(record["prediction"].split()) <= 3 for record in predictions)

    # The demo's last step: the same comparison against the blind baseline (train answers only).
    gqaru("gqaru.cli", "blind-baseline", "--train", "shards/demo-train", "--questions", "runs/demo-trained/predictions.jsonl",
          "--out", "runs/demo-blind/predictions.jsonl", cwd=tmp_path)  # fmt: skip
    gqaru(
        "gqaru.cli", "score", "runs/demo-trained/predictions.jsonl",
        "--against", "runs/demo-blind/predictions.jsonl", "--out", "blind.json", cwd=tmp_path,
    )  # fmt: skip
    blind = json.loads((tmp_path / "blind.json").read_text())["comparison"]
    assert blind["n_shared"] == 400 and blind["labels"]["a"] == "runs/demo-blind/predictions.jsonl"


def _write_demo_runs(runs: Path, model: Path, right: dict[str, int], n: int = 200, seed: int = 0) -> None:
    """A finished demo's run directory: three predictions files whose first `right[label]` answers
    are right (the trained answers cut at the end of turn: 10 more), the training run's config.yaml
    naming `model`, whose tiny_model.json holds the base."""
    for label, name in (("trained", "demo-trained"), ("untrained", "demo-untrained"), ("blind", "demo-blind")):
        rows = [
            {"id": f"q{index}", "answer": "да", "prediction": "да" if index < right[label] else "нет"}
            for index in range(n)
        ]
        if label == "trained":
            for index, row in enumerate(rows):
                row["prediction_at_end_of_turn"] = "да" if index < right[label] + 10 else "нет"
        (runs / name).mkdir(parents=True)
        (runs / name / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (runs / "demo").mkdir()
    (runs / "demo" / "config.yaml").write_text(
        f"model:\n  name_or_path: {model}\ntrain:\n  seed: {seed}\nruntime:\n  torch_threads: 1\n"
    )
    model.mkdir(parents=True, exist_ok=True)
    build = {"seed": seed, "torch_threads": {"count": 1, "pinned": True},
             "pretraining": {"held_out_word_accuracy": {"all words": 0.5 + seed / 100}}}  # fmt: skip
    (model / "tiny_model.json").write_text(json.dumps(build))


def test_demo_spread_and_verdict_state_the_range_over_seeds(tmp_path: Path) -> None:
    from gqaru.demo import spread, spread_markdown, verdict
    from gqaru.files import replace_marked_block

    runs = []
    for seed, trained in ((0, 130), (1, 110), (2, 150)):
        runs.append(tmp_path / f"seed-{seed}")
        _write_demo_runs(runs[-1], tmp_path / f"model-{seed}", {"trained": trained, "untrained": 0, "blind": 80}, seed=seed)
    record = spread(runs)

    assert record["questions"] == 200
    assert [figures["trained"]["accuracy"] for figures in record["seeds"]] == [65.0, 55.0, 75.0]
    assert record["summary"]["trained_minus_blind"] == {"mean": 25.0, "min": 15.0, "max": 35.0}
    assert record["summary"]["blind"] == {"mean": 40.0, "min": 40.0, "max": 40.0}
    first = record["seeds"][0]
    assert first["seed"] == {"tiny_model": 0, "lora": 0} and first["base_held_out_word_accuracy"] == 0.5
    # The paired test: 50 questions right only after training, none the other way.
    assert first["trained_minus_blind"]["mcnemar_exact_p"] < 1e-10
    low, high = first["trained_minus_blind"]["interval_95"]
    assert low < 25.0 < high

    table = spread_markdown(record)
    assert "| 1 | 55.00% | 0.00% | 40.00% | +15.00 [" in table
    assert "margin over the blind baseline is **+15.00 to +35.00 points** (mean +25.00)" in table
    # Seed 1 cut at the end of turn: 110 + 10 right of 200; those 10 of 200 answers ran on past it.
    assert "| 60.00% (+20.00 over blind) | 5.00% |" in table
    assert (
        "Cut at the end of turn (secondary, not lmms-eval), the trained model beats the blind baseline by +20.00 to "
        "+40.00 points; 5.00–5.00% of its answers ran on past it." in table
    )
    readme = "intro\n<!-- demo_spread.md -->\nold table\n<!-- /demo_spread.md -->\nrest\n"
    assert replace_marked_block(readme, "demo_spread.md", table) == (
        f"intro\n<!-- demo_spread.md -->\n{table}<!-- /demo_spread.md -->\nrest\n"
    )

    said = verdict(record["seeds"][1], record)
    assert "LoRA beats the blind baseline by +15.00 points" in said
    assert "cut at the end of turn  60.00%  (secondary, not lmms-eval: +20.00 points over blind; 5.00% of the answers ran on" in said
    assert said.endswith("+15.00 to +35.00 points over blind -> inside")
    weak = tmp_path / "weak"
    _write_demo_runs(weak, tmp_path / "model-weak", {"trained": 70, "untrained": 0, "blind": 80})
    from gqaru.demo import run_figures

    said = verdict(run_figures(weak), record)
    assert "LoRA does NOT beat the blind baseline: -5.00 points" in said
    assert "OUTSIDE" in said.splitlines()[-1]

    for figures in record["seeds"]:  # answers that stop at the end of turn: the two readings agree
        figures["trained_cut_at_end_of_turn"]["ran_on"] = 0.0
    record["summary"]["trained_ran_on"] = {"mean": 0.0, "min": 0.0, "max": 0.0}
    assert "No trained answer of any seed ran on past the end of turn" in spread_markdown(record)


def test_demo_verdict_names_a_missing_run(tmp_path: Path, capsys) -> None:
    from gqaru.cli import main as cli_main

    assert cli_main(["demo", "verdict", str(tmp_path)]) == 2
    assert f"{tmp_path}/demo-trained/predictions.jsonl is missing" in capsys.readouterr().err


def test_readme_states_the_committed_demo_spread() -> None:
    """The README's figures of the demo come from benchmarks/demo_spread.json, never typed."""
    from gqaru.demo import MARKER, SPREAD_FILE, read_spread, spread_markdown
    from gqaru.files import replace_marked_block

    record = read_spread(SPREAD_FILE)
    assert record is not None, f"{SPREAD_FILE} is missing: `make demo-spread` writes it"
    assert len(record["seeds"]) >= 3
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert replace_marked_block(readme, MARKER, spread_markdown(record)) == readme
