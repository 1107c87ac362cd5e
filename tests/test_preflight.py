"""The first minute of a new user: --help and every mistake the config and the file system show are
answered in about a second, before torch loads, in one line that names the key, with exit status 2
and nothing written.

The command-line tests run `python -m gqaru.train/evaluate` as users do, with `-X importtime` to
prove that the answer came before torch, transformers or accelerate were imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gqaru import preflight
from gqaru.config import STAGE_SECTIONS, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate")


def run_stage(stage: str, *args: str, cwd: Path, launcher: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    command = [*launcher, "-m", f"gqaru.{stage}", *args] if launcher else [
        sys.executable, "-X", "importtime", "-m", f"gqaru.{stage}", *args
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return result, time.perf_counter() - started


def imported(stderr: str) -> set[str]:
    """Top-level packages in a `-X importtime` report."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """A shard dir as far as the checks look: a manifest of the right format and its shard files."""
    directory = tmp_path / "shards" / "ok"
    directory.mkdir(parents=True)
    (directory / "train-000000.tar").write_bytes(b"")
    manifest = {"format": preflight.MANIFEST_FORMAT, "shards": [{"file": "train-000000.tar"}]}
    (directory / preflight.MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models" / "tiny"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    return directory


def write_config(tmp_path: Path, model_dir: Path, shards: Path) -> Path:
    path = tmp_path / "config.yaml"
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"shards": str(shards)},
        "eval": {"shards": str(shards)},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "r"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_help_lists_every_key_with_its_default_before_torch(stage: str, tmp_path: Path) -> None:
    result, seconds = run_stage(stage, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not imported(result.stderr) & set(HEAVY), imported(result.stderr) & set(HEAVY)
    assert seconds < 10  # ~0.3 s on an idle laptop; the bound only catches the 50 s of heavy imports
    lines = result.stdout.splitlines()
    assert lines[0] == f"usage: python -m gqaru.{stage} CONFIG.yaml [section.key=value ...]"
    keys = preflight.config_keys(STAGE_SECTIONS[stage])
    for key, _, default, description in keys:
        line = next((line for line in lines if line.split()[:1] == [key]), None)
        assert line is not None, f"{key} missing from --help"
        assert line.split()[1] == default.split()[0] and description.split()[0] in line
    assert len(keys) > 15 and "README.md" in result.stdout
    # Only the stage's own sections: evaluation keys are no training option, and the reverse.
    foreign = "eval.batch_size" if stage == "train" else "train.lr"
    assert not any(line.split()[:1] == [foreign] for line in lines)


def test_help_is_generated_from_the_config_docstrings() -> None:
    rows = {key: (default, description) for key, _, default, description in preflight.config_keys(("train", "lora"))}
    assert rows["train.lr"] == ("0.0002", "Peak learning rate of AdamW.")
    assert rows["lora.target_modules"][0] == "[q_proj, k_proj, v_proj, o_proj]"
    assert all(description for _, description in rows.values()), "a key without a docstring in gqaru/config.py"


def test_a_missing_shard_dir_is_one_line_before_torch(tmp_path: Path, model_dir: Path) -> None:
    config = write_config(tmp_path, model_dir, tmp_path / "shards" / "ok")
    result, seconds = run_stage("train", str(config), "data.shards=shards/does-not-exist", cwd=tmp_path)
    assert result.returncode == 2
    assert messages(result.stderr) == [
        "error: data.shards=shards/does-not-exist: no such directory; build it with "
        "`gqaru shards build --source <GQA-ru dir or hub id> --split train --out shards/does-not-exist`"
    ]
    assert not imported(result.stderr) & set(HEAVY) and seconds < 10
    assert not (tmp_path / "runs").exists()


def test_a_missing_local_model_is_named_not_sent_to_the_hub(tmp_path: Path, shards: Path) -> None:
    config = write_config(tmp_path, tmp_path / "models" / "tiny", shards)
    missing_absolute = str(tmp_path / "models" / "no-such-model")
    for value in ("models/no-such-model", missing_absolute):
        result, seconds = run_stage("evaluate", str(config), f"model.name_or_path={value}", cwd=tmp_path)
        assert result.returncode == 2 and seconds < 10
        assert messages(result.stderr) == [
            f"error: model.name_or_path={value}: no such directory; build a tiny model with "
            f"`gqaru tiny-model --out {value}` or give a hub id like deepvk/llava-gemma-2b-lora"
        ]
        assert not (tmp_path / "runs").exists(), "a run that cannot start wrote its config.yaml"


def test_a_config_typo_is_one_line_before_torch(tmp_path: Path, model_dir: Path, shards: Path) -> None:
    config = write_config(tmp_path, model_dir, shards)
    result, _ = run_stage("train", str(config), "train.batchsize=4", cwd=tmp_path)
    assert result.returncode == 2 and not imported(result.stderr) & set(HEAVY)
    [line] = messages(result.stderr)
    assert line.startswith("error: override 'train.batchsize=4': unknown key 'train.batchsize' (known keys: ")


def test_under_accelerate_launch_the_error_comes_first_and_quiet_drops_the_traceback(tmp_path: Path, model_dir: Path) -> None:
    """accelerate re-raises a failed child as CalledProcessError (a traceback after our line);
    `accelerate launch -q` exits 1 without it. Either way the line arrives in seconds, not after
    the model loads."""
    config = write_config(tmp_path, model_dir, tmp_path / "shards" / "missing")
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(REPO_ROOT / "launch/cpu.yaml")]
    result, seconds = run_stage("train", str(config), cwd=tmp_path, launcher=(*accelerate, "-q"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: data.shards={tmp_path / 'shards' / 'missing'}: no such directory")
    assert "Traceback" not in result.stderr
    assert seconds < 60  # accelerate's own start-up (it imports torch) is most of it
    assert not (tmp_path / "runs").exists()


def test_shard_dir_problems(tmp_path: Path, shards: Path) -> None:
    assert preflight.check_shards("data.shards", str(shards), split="train") == []
    source = tmp_path / "gqa-ru"
    (source / "train").mkdir(parents=True)
    (source / "train" / "part.parquet").write_bytes(b"")
    [problem] = preflight.check_shards("data.shards", str(source), split="train")
    assert problem.startswith(f"data.shards={source}: a GQA-ru source (parquet files), not shards; ")
    empty = tmp_path / "empty"
    empty.mkdir()
    [problem] = preflight.check_shards("eval.shards", str(empty), split="testdev")
    assert problem.startswith(f"eval.shards={empty}: not a shard directory (no manifest.json); build it with")
    assert "--split testdev" in problem
    (shards / "train-000000.tar").unlink()
    [problem] = preflight.check_shards("data.shards", str(shards), split="train")
    assert "1 of 1 shard files listed in manifest.json are missing (first: train-000000.tar)" in problem
    (shards / "manifest.json").write_text(json.dumps({"format": "gqaru-shards/0", "shards": []}))
    [problem] = preflight.check_shards("data.shards", str(shards), split="train")
    assert "format 'gqaru-shards/0', this gqaru reads 'gqaru-shards/1'; rebuild" in problem


def test_manifest_constants_match_the_shard_writer() -> None:
    from gqaru import shards

    assert (preflight.MANIFEST_NAME, preflight.MANIFEST_FORMAT) == (shards.MANIFEST_NAME, shards.MANIFEST_FORMAT)


def test_model_adapter_resume_and_output_problems(
    tmp_path: Path, model_dir: Path, shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base = load_config(write_config(tmp_path, model_dir, shards))
    assert preflight.check("train", base) == [] and preflight.check("evaluate", base) == []

    def problems(stage: str, *overrides: str) -> list[str]:
        return preflight.check(stage, load_config(write_config(tmp_path, model_dir, shards), list(overrides)))

    (tmp_path / "models" / "empty").mkdir()
    assert problems("train", "model.name_or_path=models/empty") == [
        "model.name_or_path=models/empty: a directory without config.json, not a saved model; "
        "give the directory save_pretrained wrote"
    ]
    # A hub id is left to the loader, but offline it must be cached (the tests run with HF_HUB_OFFLINE=1).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    [problem] = problems("evaluate", "model.name_or_path=someone/not-cached-here")
    assert problem.startswith("model.name_or_path=someone/not-cached-here: no such local directory, and as a hub id it is")
    assert "HF_HUB_OFFLINE=1" in problem
    assert problems("evaluate", "model.adapter=runs/missing/adapter") == [
        "model.adapter=runs/missing/adapter: no such directory; give a training run's adapter dir "
        "(runs/<run>/adapter) or model.adapter=null"
    ]
    assert problems("train", f"train.resume={tmp_path}")[0].startswith(f"train.resume={tmp_path}: not a checkpoint dir")
    (tmp_path / "a-file").write_text("")
    assert problems("train", "output.dir=a-file") == [
        "output.dir=a-file: a-file is a file, so a-file/r cannot be created; choose another output.dir"
    ]
    # Several mistakes: all of them, one line each.
    assert len(problems("train", "model.name_or_path=models/nope", "data.shards=nope", "output.dir=a-file")) == 3


def test_qlora_off_cuda_is_refused_before_loading(tmp_path: Path, model_dir: Path, shards: Path, monkeypatch) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:  # Linux installs it (setup.cfg); the message differs without
        pytest.skip("bitsandbytes is not installed here")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    config = load_config(write_config(tmp_path, model_dir, shards), ["model.quantization=4bit"])
    [problem] = preflight.check("train", config)
    assert problem.startswith("model.quantization=4bit: QLoRA (model.quantization=4bit) needs a CUDA GPU")
    assert "use model.quantization=none" in problem


def test_stage_main_returns_2_and_writes_nothing(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same checks through the stages' `main` (what `gqaru train` / `gqaru evaluate` call)."""
    from gqaru import evaluate, train

    config = write_config(tmp_path, model_dir, tmp_path / "shards" / "missing")
    assert train.main([str(config)]) == 2
    assert evaluate.main([str(config)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in errors] == ["error", "error"]
    assert errors[0].startswith(f"error: data.shards={tmp_path / 'shards' / 'missing'}: no such directory")
    assert errors[1].startswith(f"error: eval.shards={tmp_path / 'shards' / 'missing'}: no such directory")
    assert not (tmp_path / "runs").exists()
