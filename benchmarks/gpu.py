"""GPU benchmark (not a test): tokens/s, model FLOPs utilisation and peak memory of the real gqaru
training loop on a full-size random-weight model with llava-gemma-2b's shapes.

    python benchmarks/gpu.py --out benchmarks/gpu_results.json          # on a CUDA machine (H100/H200)
    python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json          # any machine: tiny model, 2 steps

The model is `gqaru.standins.tiny` preset "gemma-2b-shapes": CLIP ViT-L/14-336 (24 layers, width 1024,
577 tokens per image) -> 2-layer MLP projector -> Gemma-2b (18 layers, hidden 2048, 8 heads,
1 KV head, head_dim 256, intermediate 16384, vocabulary 256,000), random weights, saved in bf16.
Data: the synthetic GQA-ru train split as shards, `data.questions_per_sequence` 8 (≈13 questions
per image, so sequences of ~8 and ~5 questions: 576 image tokens + ~30 text tokens per question).

Grid: LoRA in bf16 and QLoRA (nf4 base, bf16 compute) x batch 1 / 4 / 8 sequences x gradient
checkpointing on / off. Each cell is a fresh process running `gqaru.train.TrainingRun` (setup, then
`train()` for `warmup + measured` optimizer steps, grad_accum 1, no checkpoints, no export): the
real loop, collator, loss and optimizer, instrumented only by timing each optimizer step (with
`torch.cuda.synchronize()` around it). The first `--warmup-steps` steps are not measured.

Reported per cell:
- tokens/s: real (non-padding) tokens of the measured steps, image tokens included, divided by
  their summed step time (data loading excluded; `loop_tokens_per_s` includes it);
- peak memory: `torch.cuda.max_memory_allocated()` (and reserved) over the whole run, in GiB;
- MFU = model FLOPs of the measured steps / their time / the GPU's peak dense bf16 FLOP/s
  (H100 SXM and H200: 989 TFLOP/s; H100 PCIe 756; override with --peak-tflops).

Model FLOPs (counted per sequence from its real length T, its label count N_lab and its image;
checkpointing's recomputation and QLoRA's dequantisation are NOT counted: this is MFU, not
hardware FLOPs utilisation; padding is not counted either):
  forward  = 2*T*(N_text + N_lora) + 4*L*T^2*A              text Linear layers (all T tokens) and attention
           + 2*N_lab*V*H                                    LM head, run only at the label positions
           + 2*P*N_vis + 4*L_v*P^2*A_v + 2*I*N_proj         vision tower (P = 577 tokens) and projector
  backward = 2*T*N_text + 4*T*N_lora + 8*L*T^2*A + 2*N_lab*V*H
           (frozen base weights need only input gradients, 2 FLOPs per weight per token; LoRA weights
           need input and weight gradients, 4; attention backward is twice its forward; the vision
           tower and projector are frozen and nothing upstream trains, so they have no backward)
where N_text = Linear weights of the Gemma layers (q, k, v, o, gate, up, down), N_lora = LoRA
weights, A = heads*head_dim, L = text layers, V = vocabulary, H = hidden, N_vis = Linear weights
of the CLIP layers (+ patch embedding), A_v = CLIP width, L_v = CLIP layers, I = 576 image
features, N_proj = projector weights. Attention is counted in full (not halved for the causal
mask), as in the PaLM/Megatron MFU convention. This is the usual 6*N*T rule adapted to a frozen
base: about 4*N*T for the base plus 6*N_lora*T.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import machine_info, run_script_phase, write_phase_result

HERE = Path(__file__).resolve().parent

PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
"""Dense bf16 peak by device-name substring (first match wins)."""


# --------------------------------------------------------------------------------------------------
# FLOPs


def model_dimensions(model_dir: str) -> dict[str, int]:
    """The dimensions the FLOPs formula needs, read from the saved LlavaConfig."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text, vision = config.text_config, config.vision_config
    return {
        "hidden": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "intermediate": text.intermediate_size,
        "vocab": text.vocab_size,
        "vision_width": vision.hidden_size,
        "vision_layers": vision.num_hidden_layers,
        "vision_intermediate": vision.intermediate_size,
        "vision_tokens": (vision.image_size // vision.patch_size) ** 2 + 1,
        "patch_size": vision.patch_size,
        "image_features": (vision.image_size // vision.patch_size) ** 2,
    }


def preset_dimensions(preset: str = "gemma-2b-shapes") -> dict[str, int]:
    """The same dimensions for a `gqaru.standins.tiny` preset, without building it. The default is
    llava-gemma-2b's shapes (CLIP ViT-L/14-336 + Gemma-2b, 256k vocabulary): what FLOP predictions
    for the real model use."""
    from gqaru.standins.tiny import PRESETS

    dims = PRESETS[preset]
    if dims.text_vocab_size is None:
        raise ValueError(
            f"preset {preset!r} takes its vocabulary size from the tokenizer it is built with: "
            "use model_dimensions(MODEL_DIR) of a built model"
        )
    grid = dims.image_size // dims.patch_size
    return {
        "hidden": dims.text_hidden_size,
        "text_layers": dims.text_layers,
        "heads": dims.text_heads,
        "kv_heads": dims.text_kv_heads,
        "head_dim": dims.text_head_dim,
        "intermediate": dims.text_intermediate_size,
        "vocab": dims.text_vocab_size,
        "vision_width": dims.vision_hidden_size,
        "vision_layers": dims.vision_layers,
        "vision_intermediate": dims.vision_intermediate_size,
        "vision_tokens": grid**2 + 1,
        "patch_size": dims.patch_size,
        "image_features": grid**2,
    }


def parameter_counts(
    dims: dict[str, int], lora_r: int, lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
) -> dict[str, int]:
    """Linear weights of each part (biases ignored: they are O(N/width))."""
    hidden, attention = dims["hidden"], dims["heads"] * dims["head_dim"]
    kv = dims["kv_heads"] * dims["head_dim"]
    shapes = {
        "q_proj": (hidden, attention),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (attention, hidden),
    }
    per_layer = sum(a * b for a, b in shapes.values()) + 3 * hidden * dims["intermediate"]
    width = dims["vision_width"]
    vision = dims["vision_layers"] * (4 * width * width + 2 * width * dims["vision_intermediate"])
    vision += 3 * dims["patch_size"] ** 2 * width
    lora = dims["text_layers"] * sum(lora_r * (shapes[name][0] + shapes[name][1]) for name in lora_targets)
    return {
        "text": dims["text_layers"] * per_layer,
        "lora": lora,
        "vision": vision,
        "projector": width * hidden + hidden * hidden,
        "embedding": dims["vocab"] * hidden,
    }


def sequence_flops(dims: dict[str, int], counts: dict[str, int], tokens: int, label_tokens: int) -> float:
    """Model FLOPs (forward + backward) of one training sequence; see the module docstring."""
    attention = dims["heads"] * dims["head_dim"]
    head = 2 * label_tokens * dims["vocab"] * dims["hidden"]
    text_attention = 4 * dims["text_layers"] * tokens**2 * attention
    patches = dims["vision_tokens"]
    vision = 2 * patches * counts["vision"] + 4 * dims["vision_layers"] * patches**2 * dims["vision_width"]
    projector = 2 * dims["image_features"] * counts["projector"]
    forward = 2 * tokens * (counts["text"] + counts["lora"]) + text_attention + head + vision + projector
    backward = 2 * tokens * counts["text"] + 4 * tokens * counts["lora"] + 2 * text_attention + head
    return float(forward + backward)


def predicted_training_speedup(
    dims: dict[str, int],
    counts: dict[str, int],
    one_question_tokens: list[int],
    gqaru_sequences: list[tuple[int, int]],
) -> float:
    """Model FLOPs of training the same questions one per sample with the model's own loss, over
    those of gqaru's sequences: the speed-up the FLOP count alone predicts (same hardware efficiency).

    `one_question_tokens`: each question's length alone (image tokens included), as the seed-style
    `Trainer` trains it; its loss takes full-vocabulary logits at every position, so its LM head
    runs (forward and input gradient) at all of them. `gqaru_sequences`: (length, label tokens) of
    each planned sequence; gqaru's head runs at the label positions only (`sequence_flops`).
    """
    baseline = sum(sequence_flops(dims, counts, tokens, label_tokens=tokens) for tokens in one_question_tokens)
    ours = sum(sequence_flops(dims, counts, tokens, label_tokens) for tokens, label_tokens in gqaru_sequences)
    return baseline / ours


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return tflops
    return None


# --------------------------------------------------------------------------------------------------
# One cell of the grid (runs in its own process)


def _cell_config(settings: dict[str, Any], cell: dict[str, Any], workdir: Path) -> Any:
    from gqaru.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={settings['model_dir']}",
            f"model.quantization={'4bit' if cell['mode'] == 'qlora' else 'none'}",
            f"model.dtype={settings['dtype']}",
            "lora.r=16",
            "lora.alpha=32",
            "lora.dropout=0.05",
            "lora.scope=language",
            f"data.shards={settings['shards']}",
            f"data.questions_per_sequence={settings['questions_per_sequence']}",
            f"data.num_workers={settings['num_workers']}",
            f"train.batch_size={cell['batch_size']}",
            "train.grad_accum=1",
            f"train.max_steps={settings['warmup_steps'] + settings['steps']}",
            "train.lr=1e-4",
            f"train.gradient_checkpointing={str(cell['gradient_checkpointing']).lower()}",
            "train.save_every=null",
            "train.log_every=1000000",
            "train.save_merged=false",
            "train.seed=0",
            f"output.dir={workdir}",
            f"output.run_name={cell['name']}",
        ],
    )


def _peak_rss_gib() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2


def run_cell(settings: dict[str, Any], cell: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train one grid cell through `TrainingRun`, timing every optimizer step."""
    import torch

    from gqaru.train import TrainingRun

    cuda = torch.cuda.is_available()
    config = _cell_config(settings, cell, workdir)
    run = TrainingRun(config)
    started = time.perf_counter()
    run.setup()
    setup_seconds = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    dims = model_dimensions(settings["model_dir"])
    counts = parameter_counts(dims, config.lora.r)
    steps: list[dict[str, float]] = []
    original_step = run._optimizer_step

    def timed_step(micro_batches: list[tuple[dict[str, Any], bool]]) -> Any:
        tokens = flops = questions = padding = 0.0
        for batch, real in micro_batches:
            if not real:
                continue
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            labels = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
            tokens += sum(lengths)
            padding += batch["padding_tokens"]
            questions += batch["questions"]
            flops += sum(sequence_flops(dims, counts, int(t), int(n)) for t, n in zip(lengths, labels))
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = original_step(micro_batches)
        if cuda:
            torch.cuda.synchronize()
        steps.append({"seconds": time.perf_counter() - began, "tokens": tokens, "flops": flops,
                      "questions": questions, "padding": padding})
        return result

    run._optimizer_step = timed_step
    started = time.perf_counter()
    run.train()
    loop_seconds = time.perf_counter() - started

    measured = steps[settings["warmup_steps"] :]
    if not measured:
        raise RuntimeError(f"only {len(steps)} steps ran, {settings['warmup_steps']} are warm-up: raise --steps")
    seconds = sum(step["seconds"] for step in measured)
    tokens = sum(step["tokens"] for step in measured)
    flops = sum(step["flops"] for step in measured)
    padding = sum(step["padding"] for step in measured)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device_name, settings.get("peak_tflops")) if cuda else None
    result = {
        **cell,
        "status": "ok",
        "device": device_name,
        "steps_measured": len(measured),
        "step_seconds_mean": round(seconds / len(measured), 4),
        "tokens_per_step": round(tokens / len(measured), 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "questions_per_s": round(sum(step["questions"] for step in measured) / seconds, 2),
        "padding_pct": round(100 * padding / max(tokens + padding, 1), 1),
        "loop_tokens_per_s": round(sum(step["tokens"] for step in steps) / loop_seconds, 1),
        "model_tflops_per_step": round(flops / len(measured) / 1e12, 3),
        "achieved_tflops": round(flops / seconds / 1e12, 2),
        "peak_tflops": peak,
        "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else None,
        "setup_seconds": round(setup_seconds, 1),
        "trainable_parameters": run.trainable,
        "parameter_counts": counts,
    }
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 1024**3, 2)
    else:
        result["peak_rss_gib"] = round(_peak_rss_gib(), 2)
    return result


def run_phase(phase: str, workdir: Path, settings: dict[str, Any], cell: dict[str, Any]) -> None:
    """Child entry: one cell; an out-of-memory error is a result ("oom"), not a crash."""
    import torch

    torch.set_num_threads(settings["threads"])
    try:
        result = run_cell(settings, cell, workdir)
    except torch.OutOfMemoryError as error:
        result = {**cell, "status": "oom", "error": str(error).splitlines()[0]}
        if torch.cuda.is_available():
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    write_phase_result(workdir, phase, result)


# --------------------------------------------------------------------------------------------------
# The grid


def prepare(workdir: Path, preset: str, train_questions: int) -> dict[str, str]:
    """The model (bf16 weights on disk) and the train shards, built once per workdir."""
    import torch

    from gqaru.shards import build_shards
    from gqaru.standins.synth import write_synthetic_gqa
    from gqaru.standins.tiny import build_tiny_model

    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, source, shards = workdir / f"model-{preset}", workdir / "synth", workdir / "train-shards"
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        dtype = torch.bfloat16 if preset == "gemma-2b-shapes" else torch.float32
        build_tiny_model(model_dir, preset=preset, seed=0, dtype=dtype)
        print(f"built {preset} in {time.perf_counter() - started:.0f} s: {model_dir}", flush=True)
    if not (source / "README.md").is_file():
        write_synthetic_gqa(source, train_questions=train_questions, testdev_questions=40, seed=0)
    if not (shards / "manifest.json").is_file():
        build_shards(str(source), split="train", out_dir=shards, samples_per_shard=16, verbose=False)
    return {"model_dir": str(model_dir), "shards": str(shards)}


def grid(modes: list[str], batch_sizes: list[int], checkpointing: list[bool]) -> list[dict[str, Any]]:
    return [
        {"name": f"{mode}-b{batch}-{'ckpt' if ckpt else 'nockpt'}", "mode": mode, "batch_size": batch,
         "gradient_checkpointing": ckpt}
        for mode in modes
        for ckpt in checkpointing
        for batch in batch_sizes
    ]


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | batch | checkpointing | tokens/s | questions/s | MFU | peak memory (GiB) | status |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        memory = result.get("peak_memory_gib", result.get("peak_rss_gib", "-"))
        mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") is not None else "-"
        lines.append(
            f"| {result['mode']} | {result['batch_size']} | {'on' if result['gradient_checkpointing'] else 'off'} | "
            f"{result.get('tokens_per_s', '-')} | {result.get('questions_per_s', '-')} | {mfu} | {memory} | "
            f"{result['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(HERE / "gpu_results.json"), help="results JSON (a .md table is written beside it)"
    )
    parser.add_argument(
        "--workdir", default=str(HERE / "out" / "gpu"), help="model, shards and runs (git-ignored default)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny preset, 2 measured steps, CPU allowed: checks the code paths"
    )
    parser.add_argument("--modes", nargs="+", choices=("lora", "qlora"), default=["lora", "qlora"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per cell")
    parser.add_argument("--warmup-steps", type=int, default=3, help="unmeasured steps first (allocator, kernels)")
    parser.add_argument("--questions-per-sequence", type=int, default=8)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        run_phase(args.phase, Path(args.workdir), json.loads(args.settings), json.loads(args.extra))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here): it measures the full-size "
            "llava-gemma-2b-shaped model in bf16 and 4-bit. Run it on an H100/H200, or use --smoke to check "
            "its code paths on this machine with the tiny model.",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir) / ("smoke" if args.smoke else "full")
    modes = list(args.modes)
    skipped = []
    if not cuda and "qlora" in modes:
        modes.remove("qlora")  # QLoRA runs on CUDA only (gqaru refuses it elsewhere, by design)
        skipped.append({"mode": "qlora", "reason": "CUDA only: gqaru refuses 4-bit training off CUDA"})
    preset = "tiny" if args.smoke else "gemma-2b-shapes"
    steps = 2 if args.smoke else args.steps
    warmup = 1 if args.smoke else args.warmup_steps
    largest_step = max(args.batch_sizes) * args.questions_per_sequence * (steps + warmup)
    paths = prepare(workdir, preset, train_questions=max(600, 2 * largest_step))
    settings = {
        **paths,
        "dtype": "auto",  # bf16 on CUDA (fp32 before Ampere), fp32 on CPU
        "questions_per_sequence": args.questions_per_sequence,
        "num_workers": 0 if args.smoke else 4,
        "steps": steps,
        "warmup_steps": warmup,
        "threads": 1 if args.smoke else min(8, os.cpu_count() or 1),
        "peak_tflops": args.peak_tflops,
    }
    results = []
    started = time.perf_counter()
    for cell in grid(modes, args.batch_sizes, [value == "on" for value in args.checkpointing]):
        print(f"{cell['name']} ...", flush=True)
        result = run_script_phase(Path(__file__).resolve(), cell["name"], workdir / "cells", settings, cell)
        results.append(result)
        print(f"  {result['status']}: {result.get('tokens_per_s', '-')} tokens/s, MFU {result.get('mfu')}, "
              f"peak {result.get('peak_memory_gib', result.get('peak_rss_gib'))} GiB", flush=True)
    report = {
        "preset": preset,
        "smoke": args.smoke,
        "settings": settings,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "flops_formula": "see benchmarks/gpu.py docstring: forward 2T(N_text+N_lora) + 4LT^2A + 2N_lab*V*H + vision; "
        "backward 2T*N_text + 4T*N_lora + 8LT^2A + 2N_lab*V*H; recompute and dequantisation not counted",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    table = format_table(results)
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
