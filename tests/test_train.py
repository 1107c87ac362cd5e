"""The training loop, end to end on CPU: one process, DDP (gloo) and DeepSpeed ZeRO-2/3 with two
real processes, exact resume after kill -9, signals, non-finite loss, and the shipped launch configs.

Runs go through subprocesses (`python -m gqaru.train`, `accelerate launch`), as users run them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gqaru.config import load_config
from gqaru.shards import build_shards, list_question_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 600


@pytest.fixture(scope="module")
def small_shards(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~200 questions in few shards: several epochs in seconds (ranks split it by sample)."""
    out = tmp_path_factory.mktemp("train-shards") / "small"
    build_shards(str(synth_dir), split="train", out_dir=out, max_samples=200, seed=1, samples_per_shard=8, verbose=False)
    return out


@pytest.fixture(scope="module")
def many_shards(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole synthetic train split in 2-image shards: ranks split it by shard, unevenly."""
    out = tmp_path_factory.mktemp("train-shards") / "many"
    manifest = build_shards(str(synth_dir), split="train", out_dir=out, samples_per_shard=2, verbose=False)
    assert manifest["counts"]["shards"] % 2 == 1, "an odd shard count makes the two ranks uneven"
    return out


def write_config(tmp_path: Path, model_dir: Path, shards: Path, **sections: dict) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "train_projector": True},
        "data": {"shards": str(shards), "questions_per_sequence": 4, "shuffle_buffer": 16},
        "train": {
            "epochs": 1,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.1,
            "gradient_checkpointing": False,
            "save_every": None,
            "log_every": 1,
            "seed": 3,
        },
        "output": {"dir": str(tmp_path / "runs"), "run_name": "run"},
    }
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/gqaru/torch_extensions"))
    env.update(extra)
    return env


def train_command(config: Path, *overrides: str, launch: str | None = None, launch_args: tuple[str, ...] = ()) -> list[str]:
    if launch is None:
        return [sys.executable, "-m", "gqaru.train", str(config), *overrides]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / "launch" / launch),
        *launch_args, "-m", "gqaru.train", str(config), *overrides,
    ]  # fmt: skip


def run(
    command: list[str], env: dict[str, str] | None = None, expect: int = 0, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=env or environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def trained_ids(run_dir: Path) -> Counter:
    lines = (run_dir / "trained_question_ids.tsv").read_text().splitlines()[1:]
    return Counter(tuple(line.split("\t")) for line in lines)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], atol: float) -> None:
    assert first.keys() == second.keys()
    worst = max((first[key] - second[key]).abs().max().item() for key in first)
    assert worst <= atol, f"adapters differ by {worst:.3g} (> {atol})"


def test_one_process_run_writes_everything_and_learns(tmp_path: Path, tiny_model_dir: Path, small_shards: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, small_shards, train={"epochs": 4, "lr": 3e-3, "save_every": 20})
    result = run(train_command(config))
    run_dir = tmp_path / "runs" / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json", "merged/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents*")), "no tensorboard events in runs/<run>/tensorboard/"
    assert not (run_dir / "tensorboard" / "tensorboard").exists()  # (hparams go to timestamped subdirs, as tensorboard does)
    assert list((run_dir / "merged").glob("*.safetensors"))
    assert "trainable parameters" in result.stderr and "steps per epoch" in result.stderr
    assert "device cpu, single process, mixed precision none" in result.stderr  # words, not DistributedType.NO
    # Log lines go above the progress bar, never onto its line (what follows the bar's last \r).
    checkpoint_lines = [line for line in result.stderr.split("\n") if "gqaru.train: checkpoint" in line]
    assert checkpoint_lines
    assert all(line.split("\r")[-1].lstrip()[:2].isdigit() for line in checkpoint_lines), checkpoint_lines
    # The run's config.yaml holds training's sections only, and loads back as the config that ran.
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert list(resolved) == ["model", "lora", "data", "train", "output", "runtime"]
    assert load_config(run_dir / "config.yaml") == load_config(config)

    summary = json.loads((run_dir / "summary.json").read_text())
    precision = summary["precision"]
    assert precision["device"] == "cpu" and precision["mixed_precision"] == "none"
    assert list(precision["parameters"]) == ["frozen", "lora", "full"]  # train_projector: the projector in full
    for group in precision["parameters"].values():
        assert group["dtypes"] == {"float32": group["parameters"]} and group["devices"] == ["cpu"]
    assert f"LoRA {precision['parameters']['lora']['parameters']:,} float32 on cpu" in result.stderr
    selected = list_question_ids(small_shards)
    assert summary["questions_trained"] == 4 * len(selected)
    counts = trained_ids(run_dir)
    assert all(counts[(str(epoch), question)] == 1 for epoch in range(4) for question in selected)

    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, f"loss did not go down markedly: {first:.3f} -> {last:.3f}"

    # The adapter loads in stock peft, the merged model in stock transformers (no gqaru import).
    check = (
        "import sys, torch\n"
        "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        "from peft import PeftModel\n"
        f"base = LlavaForConditionalGeneration.from_pretrained({str(tiny_model_dir)!r})\n"
        f"adapted = PeftModel.from_pretrained(base, {str(run_dir / 'adapter')!r}).eval()\n"
        f"merged = LlavaForConditionalGeneration.from_pretrained({str(run_dir / 'merged')!r}).eval()\n"
        f"processor = AutoProcessor.from_pretrained({str(run_dir / 'merged')!r})\n"
        "ids = torch.tensor([[processor.tokenizer.bos_token_id, 5, 6, 7]])\n"
        "with torch.no_grad():\n"
        "    gap = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()\n"
        "assert gap < 1e-4, gap\n"
        "assert not any(name.startswith('gqaru') for name in sys.modules)\n"
        "print('ok', gap)\n"
    )
    assert run([sys.executable, "-c", check]).stdout.startswith("ok")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(
    config: Path, launch: str, logs: Path, *overrides: str, env: dict[str, str], launch_args: tuple[str, ...] = ()
) -> list[str]:
    """Two launchers on this machine as two nodes of one process each (accelerate's rendezvous
    flags, as on a real cluster); returns each node's output."""
    port = str(free_port())
    processes, outputs = [], []
    for rank in (0, 1):
        node_args = ("--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                     "--main_process_ip", "127.0.0.1", "--main_process_port", port, *launch_args)  # fmt: skip
        log = open(logs / f"node{rank}.log", "w")  # a file, not a pipe: a full pipe would stall a node mid-collective
        processes.append((subprocess.Popen(train_command(config, *overrides, launch=launch, launch_args=node_args),
                                           cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    for process, log in processes:
        process.wait(timeout=LAUNCH_TIMEOUT)
        log.close()
        outputs.append(Path(log.name).read_text())
    for (process, _), output in zip(processes, outputs):
        assert process.returncode == 0, f"a node exited {process.returncode}:\n{output[-6000:]}"
    return outputs


def test_two_nodes_ddp_and_zero2_train_each_question_once_and_resume_exactly(
    tmp_path: Path, tiny_model_dir: Path, many_shards: Path
) -> None:
    """Two nodes of one process each (uneven shards): the same steps on both, no hang, every
    question once per epoch, one main process (it alone logs; each rank adds its own RNG state to a
    checkpoint), and a resume of the pair from a middle checkpoint ends where the straight run did.
    DDP and DeepSpeed ZeRO-2 (same data split, same seeds, fp32) give the same adapter."""
    selected = list_question_ids(many_shards)
    adapters = {}
    for launch, extra_env in (("multi_gpu.yaml", {"ACCELERATE_USE_CPU": "true"}), ("ds_zero2.yaml", {})):
        out = tmp_path / launch.removesuffix(".yaml")
        out.mkdir()
        env = environment(**extra_env)
        config = write_config(out, tiny_model_dir, many_shards, data={"questions_per_sequence": 8},
                              train={"epochs": 2, "save_every": 3, "keep_last": 10})  # fmt: skip
        launch_args = ("--mixed_precision", "no") if launch == "multi_gpu.yaml" else ()
        main_log, other_log = launch_two_nodes(config, launch, out, env=env, launch_args=launch_args)
        run_dir = out / "runs" / "run"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["processes"] == 2, main_log[-3000:]
        assert "x 2 process(es)" in main_log and "gqaru train:" not in other_log
        counts = trained_ids(run_dir)
        for epoch in ("0", "1"):
            assert sorted(question for trained_epoch, question in counts if trained_epoch == epoch) == selected
        assert set(counts.values()) == {1}
        checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
        assert checkpoints[0] == "step-000003" and len(checkpoints) >= 2, checkpoints
        first = run_dir / "checkpoints" / checkpoints[0]
        for rank in (0, 1):
            assert (first / f"random_states_{rank}.pkl").is_file() and (first / f"trained_ids_rank{rank}.json").is_file()
        adapters[launch] = adapter_tensors(run_dir)

        # Back to the first checkpoint, as if both nodes had died after it; then resume the pair.
        for name in ("adapter", "merged", "summary.json", "trained_question_ids.tsv", *checkpoints[1:]):
            path = run_dir / name if not name.startswith("step-") else run_dir / "checkpoints" / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        launch_two_nodes(config, launch, out, "train.resume=latest", env=env, launch_args=launch_args)
        assert_same_tensors(adapters[launch], adapter_tensors(run_dir), atol=1e-6)
        assert trained_ids(run_dir) == counts
    assert_same_tensors(adapters["multi_gpu.yaml"], adapters["ds_zero2.yaml"], atol=1e-5)


def test_zero3_in_bf16_from_another_directory(tmp_path: Path, tiny_model_dir: Path, small_shards: Path) -> None:
    """ZeRO-3 as the real model runs it: bf16, activation checkpointing on frozen weights (crashes
    before deepspeed 0.19.3), launched from a directory other than the project root. The weights are
    bf16 from the start (zero.Init builds them from the precision settled before the Accelerator),
    and the merged model is bf16."""
    config = write_config(
        tmp_path, tiny_model_dir, small_shards,
        model={"dtype": "bf16"}, train={"max_steps": 3, "gradient_checkpointing": True},
    )  # fmt: skip
    run(train_command(config, launch="ds_zero3.yaml", launch_args=("--num_processes", "2")), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    precision = summary["precision"]
    assert precision["mixed_precision"].startswith("DeepSpeed bf16")
    # The base as zero.Init built it (fp32 before the fix). LoRA and the projector, created after
    # it in fp32, stay fp32 partitions under ZeRO-3: reported as they are.
    assert precision["parameters"]["frozen"]["dtypes"] == {"bfloat16": precision["parameters"]["frozen"]["parameters"]}
    tensors = adapter_tensors(run_dir)
    assert tensors and all(tensor.numel() > 0 for tensor in tensors.values()), "ZeRO-3 saved empty partitions"
    check = (
        "import torch\n"
        "from transformers import LlavaForConditionalGeneration\n"
        f"model = LlavaForConditionalGeneration.from_pretrained({str(run_dir / 'merged')!r}, dtype='auto')\n"
        "assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, {p.dtype for p in model.parameters()}\n"
        "print('ok')\n"
    )
    assert run([sys.executable, "-c", check]).stdout.startswith("ok")


def test_a_missing_deepspeed_json_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gqaru import accel

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/deepspeed/zero2.json")
    accel.resolve_deepspeed_config_file()  # not here, but under the project root
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(REPO_ROOT / "launch/deepspeed/zero2.json")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/deepspeed/zero9.json")
    with pytest.raises(accel.LaunchConfigError, match=r"'launch/deepspeed/zero9.json'.*missing.*--deepspeed_config_file"):
        accel.resolve_deepspeed_config_file()


def test_a_deepspeed_json_against_model_dtype_is_refused(
    tmp_path: Path, tiny_model_dir: Path, small_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A JSON that fixes bf16 while model.dtype means fp32 would train in a precision nobody asked
    for: refused before any process group or model exists (the environment is what
    `accelerate launch --config_file launch/ds_zero2.yaml --deepspeed_config_file ...` sets)."""
    from gqaru import train

    json_path = tmp_path / "zero2_bf16.json"
    ds_config = json.loads((REPO_ROOT / "launch/deepspeed/zero2.json").read_text())
    json_path.write_text(json.dumps({**ds_config, "bf16": {"enabled": True}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(json_path))
    assert train.main([str(write_config(tmp_path, tiny_model_dir, small_shards))]) == 2
    error = capsys.readouterr().err
    assert "bf16.enabled=true but model.dtype=fp32" in error and '"enabled": "auto"' in error
    assert not (tmp_path / "runs").exists()


def test_a_chat_template_without_an_end_of_turn_token_stops_at_start_up(
    tmp_path: Path, tiny_model_dir: Path, small_shards: Path, capsys
) -> None:
    from gqaru import train

    model_dir = tmp_path / "no-end-of-turn"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}model:{% endif %}"
    )
    assert train.main([str(write_config(tmp_path, model_dir, small_shards))]) == 2
    error = capsys.readouterr().err
    assert "no-end-of-turn does not close a model turn with a special token" in error


def test_a_run_makes_no_float64_tensor(tmp_path: Path, tiny_model_dir: Path, small_shards: Path, no_float64) -> None:
    """MPS has no float64: one such tensor on the device (the log step's reduction made one) ended
    MacBook runs at step 10. Set-up, steps, log lines, a checkpoint and the export make none."""
    from gqaru import train

    config = write_config(tmp_path, tiny_model_dir, small_shards, train={"max_steps": 3, "log_every": 2, "save_every": 2})
    run = train.TrainingRun(load_config(config))
    with no_float64():
        run.setup()
        run.train()
        run.finish()
    assert (tmp_path / "runs" / "run" / "checkpoints" / "step-000002").is_dir()
    assert len((tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    # trainer_state.json counts the tokens read (text + image, no padding): the attention masks of
    # the first 2 steps' micro-batches (2 x grad_accum 2), re-read from the same seeded stream.
    state = json.loads((tmp_path / "runs" / "run" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    first_micro_batches = [batch for batch, real in itertools.islice(run._batches(0, 0), 4) if real]
    assert state["tokens"] == sum(int(batch["attention_mask"].sum()) for batch in first_micro_batches) > 0
    assert state["tokens"] < run.state.tokens


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_kill_9_then_resume_latest_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path, small_shards: Path
) -> None:
    options = {"max_steps": 36, "save_every": 4, "keep_last": 2}
    straight = tmp_path / "straight"
    straight.mkdir()
    run(train_command(write_config(straight, tiny_model_dir, small_shards, train=options)))

    broken = tmp_path / "broken"
    broken.mkdir()
    config = write_config(broken, tiny_model_dir, small_shards, train=options)
    run_dir = broken / "runs" / "run"
    process = subprocess.Popen(train_command(config), cwd=REPO_ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for(run_dir / "checkpoints" / "step-000020", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "adapter").exists(), "the run finished before it was killed"
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir() if not path.name.startswith("."))
    assert len(checkpoints) <= 2, f"keep_last=2 not honoured: {checkpoints}"

    run(train_command(config, "train.resume=latest"))
    assert_same_tensors(adapter_tensors(straight / "runs" / "run"), adapter_tensors(run_dir), atol=1e-6)
    # The resumed run also knows what the killed one trained: the id log is whole, and the metrics
    # have one line per step (the killed run's lines past its checkpoint are dropped).
    assert trained_ids(straight / "runs" / "run") == trained_ids(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 37))


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path: Path, tiny_model_dir: Path, small_shards: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, small_shards, train={"max_steps": 400})
    run_dir = tmp_path / "runs" / "run"
    process = subprocess.Popen(train_command(config), cwd=REPO_ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(run_dir / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoints = list((run_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and "train.resume=latest" in stderr
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 0 < step < 400


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, small_shards: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from gqaru import modeling, train

    calls = {"count": 0}
    real_loss = modeling.answer_only_loss

    def loss_that_explodes(model, batch):
        calls["count"] += 1
        loss_sum, tokens = real_loss(model, batch)
        return (loss_sum * float("nan") if calls["count"] > 10 else loss_sum), tokens

    monkeypatch.setattr(train.modeling, "answer_only_loss", loss_that_explodes)
    config = write_config(tmp_path, tiny_model_dir, small_shards, train={"max_steps": 20, "save_every": 2})
    assert train.main([str(config)]) == 1
    assert "non-finite loss at step" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "run"
    # grad_accum 2: micro-batch 11 is in step 6; checkpoints at 2 and 4 are good, nothing later.
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert not (run_dir / "adapter").exists()


def test_qlora_off_cuda_fails_at_start_up(tmp_path: Path, tiny_model_dir: Path, small_shards: Path, capsys) -> None:
    from gqaru import train

    config = write_config(tmp_path, tiny_model_dir, small_shards)
    assert train.main([str(config), "model.quantization=4bit"]) == 2
    error = capsys.readouterr().err
    assert "needs a CUDA GPU" in error and "model.quantization=none" in error
    assert not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("launch", ["mps.yaml", "single_gpu.yaml"])
def test_single_device_launch_configs_run_the_loop(
    launch: str, tmp_path: Path, tiny_model_dir: Path, small_shards: Path
) -> None:
    """The MacBook and one-GPU configs run the same loop (on the CPU here; cpu.yaml runs in the demo test)."""
    config = write_config(tmp_path, tiny_model_dir, small_shards, train={"max_steps": 2, "save_merged": False})
    run(train_command(config, launch=launch))
    assert json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("family", ["gemma", "vicuna", "llama3"])
def test_the_whole_pipeline_on_the_replica(
    request, family: str, tmp_path: Path, small_shards: Path, synth_dir: Path
) -> None:
    """A replica of each family (deepvk/llava-gemma-2b-lora; llava-hf/llava-1.5-7b-hf, which has no
    chat template; deepvk/llava-saiga-8b) through the three commands: train 2 steps (LoRA, activation
    checkpointing, as configs/train_lora.yaml), export; the merged model loads in stock transformers,
    builds the base model's prompts and answers as the adapter does; evaluate equals the reference loop."""
    fixture = {"gemma": "replica_dir", "vicuna": "vicuna_replica_dir", "llama3": "saiga_replica_dir"}[family]
    replica_dir = request.getfixturevalue(fixture)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from lmms_eval_reference import prompt_text, reference_answers, reference_inputs, reference_processor

    from gqaru import evaluate, train
    from gqaru.shards import iter_eval_samples

    config = write_config(
        tmp_path, replica_dir, small_shards,
        lora={"train_projector": False}, train={"max_steps": 2, "gradient_checkpointing": True},
    )  # fmt: skip
    assert train.main([str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    merged = run_dir / "merged"

    check = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import LlavaForConditionalGeneration\n"
        "from peft import PeftModel\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})\n"
        "from lmms_eval_reference import reference_inputs, reference_processor\n"
        f"base = LlavaForConditionalGeneration.from_pretrained({str(replica_dir)!r}, dtype=torch.float32)\n"
        f"adapted = PeftModel.from_pretrained(base, {str(run_dir / 'adapter')!r}).eval()\n"
        f"merged = LlavaForConditionalGeneration.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()\n"
        f"inputs = reference_inputs(reference_processor({str(merged)!r}), Image.new('RGB', (50, 40), (9, 99, 199)), 'Где шар?')\n"
        "with torch.no_grad():\n"
        "    gap = (adapted(**inputs).logits - merged(**inputs).logits).abs().max().item()\n"
        "assert gap < 1e-3, gap\n"
        "assert not any(name.startswith('gqaru') for name in sys.modules)\n"
        "print('ok', gap)\n"
    )
    assert run([sys.executable, "-c", check]).stdout.startswith("ok")
    image = next(iter_eval_samples(small_shards))["image"]
    base_processor, merged_processor = reference_processor(replica_dir), reference_processor(merged)
    for question in ("Где шар?", "Какого цвета фон?"):
        assert prompt_text(merged_processor.tokenizer, question) == prompt_text(base_processor.tokenizer, question)
        assert torch.equal(
            reference_inputs(merged_processor, image, question)["input_ids"],
            reference_inputs(base_processor, image, question)["input_ids"],
        )

    testdev = tmp_path / "testdev"
    build_shards(str(synth_dir), split="testdev", out_dir=testdev, samples_per_shard=4, verbose=False)
    evaluation = (
        f"model:\n  name_or_path: {merged}\n  dtype: fp32\n"
        f"eval:\n  shards: {testdev}\n  max_samples: 24\n  seed: 0\n  batch_size: 8\n  report: false\n"
        f"output:\n  dir: {tmp_path / 'runs'}\n  run_name: eval\n"
    )
    (tmp_path / "eval.yaml").write_text(evaluation)
    assert evaluate.main([str(tmp_path / "eval.yaml")]) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "eval" / "predictions.jsonl").read_text().splitlines()]
    selected = {record["id"] for record in records}
    items = [
        (qa["id"], sample["image"], qa["question"])
        for sample in iter_eval_samples(testdev, question_ids=selected)
        for qa in sample["meta"]["qa"]
    ]
    reference = reference_answers(merged, items)
    assert len(records) == 24 and {record["id"]: record["prediction"] for record in records} == reference


def test_length_grouping_cuts_padding_and_resumes_exactly(tmp_path: Path, tiny_model_dir: Path, small_shards: Path) -> None:
    """data.length_grouping_batches: the same questions with less padding, and a run resumed from
    a mid-epoch checkpoint trains exactly what the uninterrupted one did (the grouped order is
    re-read from the seed, the plan's counts do not change)."""
    options = {"max_steps": 12, "save_every": 6, "keep_last": 2}
    runs = {}
    for name, grouping in (("plain", 0), ("grouped", 3)):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        config = write_config(runs[name], tiny_model_dir, small_shards, train=options,
                              data={"length_grouping_batches": grouping})  # fmt: skip
        run(train_command(config))

    def padding(run_dir: Path) -> float:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return sum(record["padding_pct"] for record in records)

    straight = runs["grouped"] / "runs" / "run"
    assert padding(straight) < 0.7 * padding(runs["plain"] / "runs" / "run")
    assert sum(trained_ids(straight).values()) == sum(trained_ids(runs["plain"] / "runs" / "run").values())

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    config = write_config(resumed, tiny_model_dir, small_shards, train=options, data={"length_grouping_batches": 3})
    shutil.copytree(straight / "checkpoints" / "step-000006", resumed / "runs" / "run" / "checkpoints" / "step-000006")
    run(train_command(config, "train.resume=latest"))
    assert_same_tensors(adapter_tensors(straight), adapter_tensors(resumed / "runs" / "run"), atol=1e-6)
    assert trained_ids(straight) == trained_ids(resumed / "runs" / "run")
