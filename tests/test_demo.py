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
