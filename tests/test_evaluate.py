"""Evaluation: predictions equal the reference loop (lmms-eval's llava_hf, one plain `generate` per
question), whatever the batch size, prefix reuse or process count; each selected question is
answered once; the run's files appear and load.

Two models. The replica of deepvk/llava-gemma-2b-lora (real files, tokenizer and template; weights
biased so answers vary, often pass through `<end_of_turn>` and sometimes stop at `<eos>`), and the
tiny model with seeded noise on its layers (its template writes `<bos>` itself). Answers differ from
question to question and from image to image (checked below), so any slip in the prompt, the image
prefix, the positions, the padding or the stop rule shows up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lmms_eval_reference import reference_answers
from transformers import AutoProcessor, LlavaForConditionalGeneration

from gqaru.config import ModelConfig, load_config
from gqaru.cli import main as cli_main
from gqaru.evaluate import Answerer, EvaluationError, check_complete, main, predict, select_questions
from gqaru.metrics import exact_match, read_predictions
from gqaru.modeling import load_for_inference, load_processor
from gqaru.shards import ShardError, build_shards, iter_eval_samples, list_question_ids, read_manifest
from gqaru.sources import select_question_ids

REPO_ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = 40
SELECTION_SEED = 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny-model generation is hundreds of small ops: on a shared 2-core machine two torch threads
    spin against each other and ran this module 8x slower (163 s vs 20 s) than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def noisy_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA with N(0, 0.3) noise on every non-embedding matrix: answers that vary."""
    out = tmp_path_factory.mktemp("noisy") / "tiny-llava-noisy"
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "embed" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["replica", "tiny"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("replica_dir" if request.param == "replica" else "noisy_model_dir")


@pytest.fixture(scope="module")
def testdev_shards(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """310 synthetic testdev questions over 10 images, 3 images per shard."""
    out = tmp_path_factory.mktemp("eval-shards") / "testdev"
    build_shards(str(synth_dir), split="testdev", out_dir=out, samples_per_shard=3, verbose=False)
    return out


@pytest.fixture(scope="module")
def selected_ids(testdev_shards: Path) -> list[str]:
    return select_question_ids(list_question_ids(testdev_shards), QUESTIONS, SELECTION_SEED)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    model = load_for_inference(ModelConfig(name_or_path=str(model_dir), dtype="fp32"), "cpu")
    return model, load_processor(model_dir)


_REFERENCES: dict[str, dict[str, str]] = {}


def _reference(model_dir: Path, testdev_shards: Path, selected_ids: list[str]) -> dict[str, str]:
    """The reference loop's answers (tests/lmms_eval_reference.py): no gqaru code involved. Once per model."""
    if str(model_dir) not in _REFERENCES:
        items = [
            (qa["id"], sample["image"], qa["question"])
            for sample in iter_eval_samples(testdev_shards, question_ids=selected_ids)
            for qa in sample["meta"]["qa"]
        ]
        _REFERENCES[str(model_dir)] = reference_answers(model_dir, items)
    return _REFERENCES[str(model_dir)]


@pytest.fixture(scope="module")
def reference(model_dir: Path, testdev_shards: Path, selected_ids: list[str]) -> dict[str, str]:
    return _reference(model_dir, testdev_shards, selected_ids)


@pytest.fixture(scope="module")
def replica_reference(replica_dir: Path, testdev_shards: Path, selected_ids: list[str]) -> dict[str, str]:
    return _reference(replica_dir, testdev_shards, selected_ids)


@pytest.fixture(scope="module")
def replica_loaded(replica_dir: Path) -> tuple[torch.nn.Module, Any]:
    model = load_for_inference(ModelConfig(name_or_path=str(replica_dir), dtype="fp32"), "cpu")
    return model, load_processor(replica_dir)


def _predict(loaded, samples, batch_size: int, reuse: bool) -> dict[str, str]:
    model, processor = loaded
    answerer = Answerer(model, processor, max_new_tokens=16, reuse_image_prefix=reuse)
    return {record["id"]: record["prediction"] for record in predict(answerer, samples, batch_size)}


def test_reference_answers_vary(reference: dict[str, str], selected_ids: list[str]) -> None:
    assert sorted(reference) == selected_ids
    assert len(set(reference.values())) > QUESTIONS * 0.8  # otherwise the comparisons below are vacuous


@pytest.mark.parametrize(("batch_size", "reuse"), [(1, True), (16, True), (5, False)])
def test_predictions_equal_the_reference_loop(
    loaded, reference: dict[str, str], testdev_shards: Path, selected_ids: list[str], batch_size: int, reuse: bool
) -> None:
    samples = iter_eval_samples(testdev_shards, question_ids=selected_ids)
    predictions = _predict(loaded, samples, batch_size, reuse)
    differing = {key: (reference[key], predictions.get(key)) for key in reference if predictions.get(key) != reference[key]}
    assert not differing, f"{len(differing)} of {len(reference)} answers differ, e.g. {list(differing.items())[:3]}"


def test_loading_and_answering_make_no_float64_tensor(
    noisy_model_dir: Path, testdev_shards: Path, selected_ids: list[str], no_float64
) -> None:
    """MPS has no float64: loading, the image prefixes and batched generation make none."""
    with no_float64():
        model = load_for_inference(ModelConfig(name_or_path=str(noisy_model_dir), dtype="fp32"), "cpu")
        answerer = Answerer(model, load_processor(noisy_model_dir), max_new_tokens=8, reuse_image_prefix=True)
        records = predict(answerer, iter_eval_samples(testdev_shards, question_ids=selected_ids[:16]), 8)
    assert len(records) == 16


def test_answers_depend_on_the_image(loaded, reference: dict[str, str], testdev_shards: Path, selected_ids: list[str]) -> None:
    """Power check: give every question another image's pixels; most answers must change."""
    samples = list(iter_eval_samples(testdev_shards, question_ids=selected_ids))
    images = [sample["image"] for sample in samples]
    swapped = [dict(sample, image=images[(index + 1) % len(images)]) for index, sample in enumerate(samples)]
    predictions = _predict(loaded, swapped, batch_size=8, reuse=True)
    changed = sum(predictions[key] != reference[key] for key in reference)
    assert changed > QUESTIONS * 0.8


@pytest.mark.parametrize("reuse", [True, False])
def test_generation_stops_at_eos_only_and_the_end_of_turn_reading_is_second(
    replica_loaded, testdev_shards: Path, selected_ids: list[str], reuse: bool
) -> None:
    """Force "да", <end_of_turn>, "нет", <eos>, "да"...: lmms-eval's reading runs to <eos> and skips the
    special token ("данет"); the secondary reading stops at <end_of_turn> ("да")."""
    model, processor = replica_loaded
    tokenizer = processor.tokenizer
    yes, no = (tokenizer.convert_tokens_to_ids(piece) for piece in ("да", "нет"))
    script = [yes, tokenizer.convert_tokens_to_ids("<end_of_turn>"), no, tokenizer.eos_token_id]

    def force_next_token(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        logits = torch.full_like(output.logits[:, -1], -1e4)
        for row in range(input_ids.shape[0]):
            last = int(input_ids[row, -1])
            step = 0 if input_ids.shape[1] > 1 else script.index(last) + 1 if last in script[:-1] else -1
            logits[row, script[step] if step >= 0 else yes] = 0.0
        output.logits[:, -1] = logits
        return output

    handle = model.register_forward_hook(force_next_token, with_kwargs=True)
    try:
        samples = iter_eval_samples(testdev_shards, question_ids=selected_ids[:10])
        answerer = Answerer(model, processor, max_new_tokens=16, reuse_image_prefix=reuse)
        records = predict(answerer, samples, batch_size=4)
    finally:
        handle.remove()
    assert {record["prediction"] for record in records} == {"данет"}
    assert {record["prediction_at_end_of_turn"] for record in records} == {"да"}


def test_seed_report_selection_is_the_same_at_build_and_at_evaluation(
    synth_dir: Path, testdev_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its 300 testdev rows: chosen while building (`--selection seed-report`) or out of shards of the
    whole split (`eval.selection=seed-report`), the same questions; shards without them are refused."""
    named = tmp_path / "seed-report"
    assert cli_main(["shards", "build", "--source", str(synth_dir), "--split", "testdev", "--out", str(named),
                     "--selection", "seed-report"]) == 0  # fmt: skip
    built = list_question_ids(named)
    assert len(built) == 300 and read_manifest(named)["selection"]["name"] == "seed-report"
    for shards in (testdev_shards, named):
        assert select_questions(load_config(None, [f"eval.shards={shards}", "eval.selection=seed-report"])) == built

    subset = tmp_path / "subset"
    build_shards(str(synth_dir), split="testdev", out_dir=subset, max_samples=100, verbose=False)
    with pytest.raises(ShardError, match=r"of its 300 rows are not in"):
        select_questions(load_config(None, [f"eval.shards={subset}", "eval.selection=seed-report"]))
    capsys.readouterr()


def test_check_complete_names_every_kind_of_gap() -> None:
    check_complete([{"id": "a"}, {"id": "b"}], ["a", "b"])
    with pytest.raises(EvaluationError, match=r"1 answered more than once \['a'\], 1 missing \['b'\], 1 not selected \['c'\]"):
        check_complete([{"id": "a"}, {"id": "a"}, {"id": "c"}], ["a", "b"])


# --------------------------------------------------------------------------------------------
# Whole runs


def _write_config(directory: Path, model_dir: Path, shards: Path) -> Path:
    path = directory / "eval.yaml"
    path.write_text(
        f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\n"
        f"eval:\n  shards: {shards}\n  max_samples: {QUESTIONS}\n  seed: {SELECTION_SEED}\n  batch_size: 16\n"
        f"output:\n  dir: {directory / 'runs'}\n  run_name: one\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def one_process_run(replica_dir: Path, testdev_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`gqaru.evaluate` on the replica, batch 16, one process."""
    directory = tmp_path_factory.mktemp("eval-run")
    config_path = _write_config(directory, replica_dir, testdev_shards)
    assert main([str(config_path)]) == 0
    return directory


def test_run_writes_predictions_metrics_report_and_config(
    one_process_run: Path, selected_ids: list[str], replica_reference: dict[str, str]
) -> None:
    run_dir = one_process_run / "runs" / "one"
    lines = (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["id"] for record in records] == selected_ids  # each selected question once, sorted
    for record in records:
        assert list(record) == [
            "id", "imageId", "question", "answer", "prediction", "correct", "prediction_at_end_of_turn", "types",
        ]
        assert record["correct"] == exact_match(record["prediction"], record["answer"])
        assert record["prediction"] == replica_reference[record["id"]]
    assert read_predictions(run_dir / "predictions.jsonl") == records

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["headline"]["n"] == QUESTIONS
    assert metrics["headline"]["correct"] == sum(record["correct"] for record in records)
    assert metrics["run"]["processes"] == 1
    assert metrics["run"]["image_prefix_reuse"] is True
    assert metrics["run"]["questions_per_second"] > 0
    at_end_of_turn = sum(exact_match(record["prediction_at_end_of_turn"], record["answer"]) for record in records)
    assert metrics["end_of_turn_stop"]["correct"] == at_end_of_turn
    assert "NOT lmms-eval" in metrics["end_of_turn_stop"]["label"]
    assert sum(record["prediction"] != record["prediction_at_end_of_turn"] for record in records) > QUESTIONS / 4

    assert "<html" in (run_dir / "report.html").read_text(encoding="utf-8").lower()
    assert (run_dir / "report.md").read_text(encoding="utf-8").strip()
    config = load_config(run_dir / "config.yaml")
    assert config.eval.max_samples == QUESTIONS and config.output.run_name == "one"


def test_selection_and_predictions_do_not_depend_on_batch_size(one_process_run: Path) -> None:
    config_path = one_process_run / "eval.yaml"
    assert main([str(config_path), "eval.batch_size=1", "eval.report=false", "output.run_name=batch1"]) == 0
    first = (one_process_run / "runs" / "one" / "predictions.jsonl").read_text(encoding="utf-8")
    second_dir = one_process_run / "runs" / "batch1"
    assert (second_dir / "predictions.jsonl").read_text(encoding="utf-8") == first
    assert not (second_dir / "report.html").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("launcher", ["ddp", "ds_zero3"])
def test_two_processes_give_the_same_predictions_as_one(launcher: str, one_process_run: Path, tmp_path: Path) -> None:
    """Two CPU ranks under DDP, and under the shipped ZeRO-3 config launched from another directory
    (inference loads the model whole there: a partitioned one is empty shells, `'weight' must be 2-D`)."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if launcher == "ddp":
        launch_config = tmp_path / "two_cpu_processes.yaml"
        launch_config.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
            "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\nuse_cpu: true\n",
            encoding="utf-8",
        )
        environment["ACCELERATE_USE_CPU"] = "true"
    else:
        launch_config = REPO_ROOT / "launch" / "ds_zero3.yaml"  # DeepSpeed ignores a CPU flag: no ACCELERATE_USE_CPU
        environment.pop("ACCELERATE_USE_CPU", None)
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(launch_config),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "gqaru.evaluate",
        str(one_process_run / "eval.yaml"),
        f"output.run_name={launcher}",
        "eval.report=false",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two_dir = one_process_run / "runs" / launcher
    metrics = json.loads((two_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["run"]["processes"] == 2  # really two ranks, not two world-size-1 copies
    one = (one_process_run / "runs" / "one" / "predictions.jsonl").read_text(encoding="utf-8")
    assert (two_dir / "predictions.jsonl").read_text(encoding="utf-8") == one


def test_bad_config_key_is_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = tmp_path / "bad.yaml"
    config_path.write_text("eval:\n  batch_sise: 4\n", encoding="utf-8")
    assert main([str(config_path)]) == 2
    assert "batch_sise" in capsys.readouterr().err
