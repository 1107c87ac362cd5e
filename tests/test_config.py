"""Config loading: every shipped YAML parses; errors name the key and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gqaru.cli import main as cli_main
from gqaru.config import STAGE_SECTIONS, Config, ConfigError, load_config, save_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_are_shipped() -> None:
    names = {path.name for path in SHIPPED}
    assert {"train_lora.yaml", "train_qlora.yaml", "eval_testdev.yaml", "demo_train.yaml", "demo_eval.yaml",
            "train_qlora_saiga8b.yaml", "eval_testdev_saiga8b.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)
    assert load_config(None, []) != config, "a shipped config that sets nothing is dead weight"


def test_real_run_settings() -> None:
    config = load_config(REPO_ROOT / "configs/train_lora.yaml")
    assert config.model.name_or_path == "deepvk/llava-gemma-2b-lora"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (16, 32, 0.05)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (config.train.batch_size, config.train.grad_accum, config.train.lr) == (1, 2, 2e-4)
    assert (config.train.scheduler, config.train.warmup_ratio, config.train.max_seq_len) == ("cosine", 0.03, 512)
    assert config.train.gradient_checkpointing and config.data.image_size == 336
    qlora = load_config(REPO_ROOT / "configs/train_qlora.yaml")
    assert qlora.model.quantization == "4bit"
    evaluation = load_config(REPO_ROOT / "configs/eval_testdev.yaml")
    assert evaluation.eval.selection == "seed-report"  # the seed report's 300 rows, not a draw over ids
    # Another family is the same run with the model switched (and sizes for an 8B model).
    saiga = load_config(REPO_ROOT / "configs/eval_testdev_saiga8b.yaml")
    assert saiga.eval == evaluation.eval and saiga.model.name_or_path == "deepvk/llava-saiga-8b"
    saiga_qlora = load_config(REPO_ROOT / "configs/train_qlora_saiga8b.yaml")
    assert (saiga_qlora.model.quantization, saiga_qlora.lora) == ("4bit", qlora.lora)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(REPO_ROOT / "configs/train_lora.yaml", ["train.lr=3e-5", "eval.max_samples=all"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
    named = load_config(REPO_ROOT / "configs/eval_testdev.yaml")
    save_config(named, tmp_path / "named.yaml")
    assert load_config(tmp_path / "named.yaml") == named


def test_a_stage_saves_only_the_sections_it_reads(tmp_path: Path) -> None:
    """runs/<run>/config.yaml of a training run has no eval section (its defaults said nothing about
    that run), an evaluation's no lora/data/train; each loads back as the config that ran."""
    config = load_config(REPO_ROOT / "configs/demo_train.yaml", ["train.lr=3e-5"])
    for stage, sections in STAGE_SECTIONS.items():
        path = tmp_path / f"{stage}.yaml"
        save_config(config, path, stage=stage)
        assert list(yaml.safe_load(path.read_text())) == list(sections)
        reloaded = load_config(path)
        assert all(getattr(reloaded, section) == getattr(config, section) for section in sections)
    assert "eval" not in STAGE_SECTIONS["train"] and not {"lora", "data", "train"} & set(STAGE_SECTIONS["evaluate"])
    named = load_config(REPO_ROOT / "configs/eval_testdev.yaml")
    save_config(named, tmp_path / "named.yaml", stage="evaluate")
    assert load_config(tmp_path / "named.yaml").eval == named.eval


def test_a_named_selection_refuses_the_keys_it_ignores() -> None:
    with pytest.raises(ConfigError, match="eval.selection=seed-report fixes the questions.*eval.max_samples"):
        load_config(REPO_ROOT / "configs/eval_testdev.yaml", ["eval.max_samples=all"])
    assert load_config(REPO_ROOT / "configs/eval_testdev.yaml", ["eval.selection=seeded", "eval.max_samples=all"])


def test_overrides_are_typed() -> None:
    config = load_config(None, ["train.max_steps=10", "train.lr=1e-4", "model.adapter=null", "lora.target_modules=[q_proj]"])
    assert config.train.max_steps == 10 and isinstance(config.train.max_steps, int)
    assert config.train.lr == pytest.approx(1e-4)
    assert config.model.adapter is None
    assert config.lora.target_modules == ["q_proj"]


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML reads `2e-4` as a string (YAML 1.1); the config must still see a number.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-4\n")
    assert load_config(path).train.lr == pytest.approx(2e-4)


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "unknown key 'train.batchsize'" in message
    assert "batch_size" in message  # the known keys are listed


def test_unknown_section_names_it(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        load_config(path)


def test_bad_type_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}: train.lr" in str(error.value) and "'fast'" in str(error.value)


def test_bad_override_names_the_override(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"override 'train.batch_size=two': train.batch_size"):
        load_config(path, ["train.batch_size=two"])
    with pytest.raises(ConfigError, match=r"override 'lora.rank=8': unknown key 'lora.rank'"):
        load_config(path, ["lora.rank=8"])
    with pytest.raises(ConfigError, match=r"not key=value"):
        load_config(path, ["train.lr"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.quantization=8bit", "model.quantization"),
        ("model.dtype=fp16", "model.dtype"),
        ("eval.max_samples=some", "positive integer or 'all'"),
        ("eval.max_samples=0", "positive integer or 'all'"),
        ("train.batch_size=0", "train.batch_size"),
        ("lora.scope=vision", "lora.scope"),
        ("output.run_name=a/b", "plain directory name"),
    ],
)
def test_invalid_values_are_rejected(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_cli_config_prints_resolved_or_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["config", str(REPO_ROOT / "configs/demo_train.yaml"), "train.lr=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "run_name: demo" in printed
    assert cli_main(["config", str(REPO_ROOT / "configs/demo_train.yaml"), "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err
