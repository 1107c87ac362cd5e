"""Evaluation benchmark (not a test): P2, `gqaru.evaluate` against a per-question `generate` loop.

    python benchmarks/bench_eval.py [--workdir DIR] [--questions N]

or `run(workdir, ...)` from benchmarks/run.py (entries in the shared format
{"id", "measure", "ratio", "goal", "met", "details"}).

Both sides answer the same held-out synthetic testdev questions (`eval.max_samples` drawn by the
seeded rule) with the same model on the "real-shape" tiny LLaVA (576 image tokens per image), the
same greedy settings (lmms-eval's: at most 16 new tokens, stop at the tokenizer's eos only: the
`GenerationConfig` of `gqaru.evaluate.Answerer`), reading the same shards, one torch thread:

- **per-question loop** (how the seed report and lmms-eval's llava loop evaluate): for each
  question, the chat-templated prompt and its image go through the processor (image preprocessed
  per question), then one `model.generate(**inputs)` with `pixel_values`, batch 1.
- **gqaru**: `gqaru.evaluate.evaluate(config)`: batches of `eval.batch_size` questions, each
  image's prefix (vision tower + prefill) run once and its KV cache shared by its questions.

questions/s = questions / seconds of the answering loop (reading and decoding images included on
both sides; model loading and writing files excluded: `metrics["run"]["generation_seconds"]` of
gqaru's evaluation, the loop's wall time here). Each side runs in its own fresh process.

Two models, because one alone would hide something:
- "noisy": the untrained real-shape model with seeded N(0, 0.3) noise on every non-embedding
  matrix (as tests/test_evaluate.py does). An untrained model answers "\\n" to everything, which
  would make "identical answers" vacuous; the noisy one answers differently per question and runs
  to the 16-token limit, so every generated token is compared. It is the identity check.
- "trained": the model gqaru trained in P1 (adapter merged): real answer lengths (an answer word,
  then whatever the model says until `<eos>` or the 16-token limit), so its speed ratio is the
  headline; its answers are compared too.
The goal is met when the trained model's ratio is >= 10 and BOTH models give >= 99.5% identical
answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import (
    DEFAULT_THREADS,
    add_phase_arguments,
    run_requested_phase,
    run_script_phase,
    set_threads,
    write_phase_result,
)

SELECTION_SEED = 7
NOISE_STD = 0.3
NOISE_SEED = 1

DEFAULTS: dict[str, Any] = {
    "questions": 400,
    "batch_size": 16,
    "max_new_tokens": 16,
    "threads": DEFAULT_THREADS,
}
HERE = Path(__file__).resolve().parent


def make_noisy_model(base_dir: str, out_dir: Path) -> str:
    """`base_dir`'s model with seeded noise on its layer weights (answers that vary), saved to `out_dir`."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if (out_dir / "config.json").is_file():
        return str(out_dir)
    model = LlavaForConditionalGeneration.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "embed" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * NOISE_STD)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(base_dir).save_pretrained(out_dir)
    return str(out_dir)


def _config(model_dir: str, shards: str, settings: dict[str, Any], run_dir: Path) -> Any:
    from gqaru.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            "model.dtype=fp32",
            f"eval.shards={shards}",
            f"eval.max_samples={settings['questions']}",
            f"eval.seed={SELECTION_SEED}",
            f"eval.batch_size={settings['batch_size']}",
            f"eval.max_new_tokens={settings['max_new_tokens']}",
            "eval.report=false",
            f"output.dir={run_dir.parent}",
            f"output.run_name={run_dir.name}",
        ],
    )


def answer_with_gqaru(model_dir: str, shards: str, settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """`gqaru.evaluate`: batched, image-prefix KV reuse. Returns its speed and predictions."""
    from gqaru.evaluate import evaluate

    result = evaluate(_config(model_dir, shards, settings, run_dir))
    run = result.metrics["run"]
    return {
        "questions": run["questions"],
        "seconds": run["generation_seconds"],
        "questions_per_s": round(run["questions"] / run["generation_seconds"], 3),
        "total_seconds": run["total_seconds"],
        "predictions": {record["id"]: record["prediction"] for record in result.records},
    }


def answer_per_question(model_dir: str, shards: str, settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One `generate` with `pixel_values` per question, the processor run per question."""
    import torch

    from gqaru import modeling
    from gqaru.evaluate import Answerer, select_questions
    from gqaru.prompts import INSTRUCTION
    from gqaru.shards import iter_eval_samples

    config = _config(model_dir, shards, settings, run_dir)
    selected = select_questions(config)
    processor = modeling.load_processor(model_dir)
    model = modeling.load_for_inference(config.model, "cpu")
    generation_config = Answerer(model, processor, max_new_tokens=config.eval.max_new_tokens).generation_config
    tokenizer = processor.tokenizer

    predictions: dict[str, str] = {}
    processor_seconds = 0.0
    images = 0
    started = time.perf_counter()
    for sample in iter_eval_samples(shards, question_ids=selected):
        images += 1
        for qa in sample["meta"]["qa"]:
            before = time.perf_counter()
            messages = [{"role": "user", "content": f"<image>\n{qa['question']}\n{INSTRUCTION}"}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # One <bos>: the tiny model's template writes it, so the tokenizer must not add another.
            add_bos = not prompt.startswith(tokenizer.bos_token)
            inputs = processor(text=[prompt], images=[sample["image"]], return_tensors="pt", add_special_tokens=add_bos)
            processor_seconds += time.perf_counter() - before
            with torch.no_grad():
                output = model.generate(**inputs, generation_config=generation_config)
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            predictions[qa["id"]] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    seconds = time.perf_counter() - started
    if sorted(predictions) != selected:
        raise RuntimeError(
            f"the per-question loop answered {len(predictions)} questions, {len(selected)} were selected"
        )
    return {
        "questions": len(predictions),
        "images": images,
        "seconds": round(seconds, 3),
        "questions_per_s": round(len(predictions) / seconds, 3),
        "processor_seconds": round(processor_seconds, 3),
        "predictions": predictions,
    }


PHASES = ("gqaru", "loop")


def run_phase(phase: str, workdir: Path, settings: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One side for one model, in this process; the result also goes to workdir/<phase>.json."""
    set_threads(settings["threads"])
    answer = {"gqaru": answer_with_gqaru, "loop": answer_per_question}[phase]
    result = answer(extra["model"], extra["shards"], settings, workdir / f"run-{phase}")
    write_phase_result(workdir, phase, result)
    return result


def compare(model_dir: str, shards: str, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Both sides on one model, each in a fresh process; speeds and the share of identical answers."""
    extra = {"model": model_dir, "shards": shards}
    script = Path(__file__).resolve()
    loop = run_script_phase(script, "loop", workdir, settings, extra)
    ours = run_script_phase(script, "gqaru", workdir, settings, extra)
    if sorted(loop["predictions"]) != sorted(ours["predictions"]):
        raise RuntimeError("the two sides answered different question sets")
    identical = sum(loop["predictions"][key] == ours["predictions"][key] for key in loop["predictions"])
    differing = [
        {"id": key, "loop": loop["predictions"][key], "gqaru": ours["predictions"][key]}
        for key in sorted(loop["predictions"])
        if loop["predictions"][key] != ours["predictions"][key]
    ]
    # What the loop would gain by preprocessing each image once instead of per question.
    preprocess_once_seconds = loop["seconds"] - loop["processor_seconds"] * (1 - loop["images"] / loop["questions"])
    return {
        "ratio": round(ours["questions_per_s"] / loop["questions_per_s"], 2),
        "identical_share": round(identical / len(loop["predictions"]), 4),
        "identical": identical,
        "questions": len(loop["predictions"]),
        "distinct_predictions": len(set(loop["predictions"].values())),
        "differing_examples": differing[:5],
        "loop": {key: value for key, value in loop.items() if key != "predictions"},
        "gqaru": {key: value for key, value in ours.items() if key != "predictions"},
        "ratio_if_loop_preprocessed_each_image_once": round(
            ours["questions_per_s"] / (loop["questions"] / preprocess_once_seconds), 2
        ),
    }


def run(workdir: Path, *, base_model: str, trained_model: str, shards: str, **overrides: Any) -> list[dict[str, Any]]:
    """P2 in the shared result format.

    base_model: the untrained real-shape model (the noisy model is made from it);
    trained_model: P1's gqaru-trained merged model; shards: the testdev shards.
    """
    settings = {**DEFAULTS, **overrides}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    noisy = make_noisy_model(base_model, workdir / "model-noisy")
    results = {
        "trained": compare(trained_model, shards, workdir / "trained", settings),
        "noisy": compare(noisy, shards, workdir / "noisy", settings),
    }
    ratio = results["trained"]["ratio"]
    identical = min(result["identical_share"] for result in results.values())
    return [
        {
            "id": "P2",
            "measure": "evaluation questions/s: gqaru.evaluate (batched, image-prefix KV reuse) / one generate "
            "per question; share of identical answers",
            "ratio": ratio,
            "goal": ">= 10x, >= 99.5% identical",
            "met": ratio >= 10 and identical >= 0.995,
            "details": {
                "speed_goal_met": ratio >= 10,
                "identity_goal_met": identical >= 0.995,
                "identical_share_min": identical,
                "settings": settings,
                "models": {
                    "trained": trained_model,
                    "noisy": f"{base_model} + N(0, {NOISE_STD}) noise, seed {NOISE_SEED}",
                },
                **results,
                "machine": results["trained"]["gqaru"]["machine"],
            },
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(HERE / "out" / "eval"), help="scratch dir (git-ignored default)")
    parser.add_argument("--questions", type=int, default=None, help="held-out questions answered by both sides")
    add_phase_arguments(parser, PHASES)
    args = parser.parse_args(argv)
    if run_requested_phase(args, run_phase, DEFAULTS):
        return 0
    # Standalone: the models and shards come from the training benchmark's preparation.
    import bench_train

    workdir = Path(args.workdir)
    training_settings = dict(bench_train.DEFAULTS)
    paths = bench_train.prepare(workdir / "data", training_settings)
    trained = workdir / "data" / "gqaru" / "run" / "merged"
    if not (trained / "config.json").is_file():
        bench_train.run_phase_in_fresh_process("gqaru-train", workdir / "data", training_settings)
    overrides = {"questions": args.questions} if args.questions else {}
    results = run(
        workdir, base_model=paths["model"], trained_model=str(trained), shards=paths["testdev_shards"], **overrides
    )
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
