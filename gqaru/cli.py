"""The `gqaru` command: one subcommand per job, each a thin shell over a module function.

Imports of the heavy modules happen inside each handler, so `gqaru --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from gqaru.config import ConfigError, load_config, to_yaml

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(to_yaml(config), end="")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from gqaru.standins.synth import resolve_questions_per_image, resolve_templates, write_synthetic_gqa

    try:
        templates = resolve_templates(args.templates)
        questions_per_image = resolve_questions_per_image(args.questions_per_image)
    except ValueError as error:
        print(f"gqaru synth: {error}", file=sys.stderr)
        return 2
    summary = write_synthetic_gqa(
        args.out,
        train_questions=args.train_questions,
        testdev_questions=args.testdev_questions,
        seed=args.seed,
        templates=templates,
        train_questions_per_image=questions_per_image,
    )
    for split, counts in summary.items():
        print(f"{split}: {counts['questions']} questions over {counts['images']} images")
    print(f"wrote {args.out} (read it with datasets.load_dataset('{args.out}', '<split>_balanced_instructions'))")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from gqaru.standins.tiny import BUILD_INFO_FILE, build_tiny_model

    if args.threads is not None:
        print(f"torch threads {args.threads} (pinned by --threads)", flush=True)
    if args.pretrain_target is not None and not args.pretrain_steps:
        print("gqaru tiny-model: --pretrain-target needs --pretrain-steps", file=sys.stderr)
        return 2
    try:
        out = build_tiny_model(
            args.out,
            preset=args.preset,
            seed=args.seed,
            pretrain_steps=args.pretrain_steps,
            pretrain_target=args.pretrain_target,
            pretrain_max_steps=args.pretrain_max_steps,
            threads=args.threads,
        )
    except ValueError as error:
        print(f"gqaru tiny-model: {error}", file=sys.stderr)
        return 2
    print(f"wrote a tiny LLaVA ({args.preset}) to {out}")
    report = json.loads((out / BUILD_INFO_FILE).read_text(encoding="utf-8"))["pretraining"]
    if report:
        print(f"pretrained {report['steps']} steps in {report['seconds']:.0f} s; held-out word accuracy:")
        for key, value in report["held_out_word_accuracy"].items():
            print(f"  {key:22s} {value:.3f}")
        if target := report.get("grounding_target"):
            levels = ", ".join(f"{level:.3f}" for level in target["after_each_round"])
            print(
                f"grounding target {target['word_accuracy']:.3f} "
                + ("reached" if target["reached"] else f"NOT reached within {target['max_steps']} steps (a weak base)")
                + f": held-out grounding after each round {levels}; grounding rounds {report['grounding_rounds']} steps"
            )
    return 0


def _cmd_fetch_tokenizers(args: argparse.Namespace) -> int:
    from gqaru.standins import real_tokenizers

    try:
        paths = real_tokenizers.fetch(wheel=args.wheel)
    except (OSError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_replica(args: argparse.Namespace) -> int:
    from gqaru.standins.real_tokenizers import MissingTokenizerError
    from gqaru.standins.replica import build_replica

    try:
        out = build_replica(args.name, args.out, seed=args.seed, vary_answers=args.vary_answers)
    except (KeyError, MissingTokenizerError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote a replica of {args.name} (real files and tokenizer, narrow random weights) to {out}")
    return 0


def _cmd_shards_build(args: argparse.Namespace) -> int:
    from gqaru.shards import ShardError, build_shards
    from gqaru.sources import SEED_REPORT, SourceError

    if args.selection == SEED_REPORT and (args.max_samples is not None or args.seed is not None):
        print("error: --selection seed-report fixes the questions; drop --max-samples and --seed", file=sys.stderr)
        return 2
    try:
        build_shards(
            args.source,
            split=args.split,
            out_dir=args.out,
            max_samples=args.max_samples,
            seed=0 if args.seed is None else args.seed,
            selection=args.selection,
            samples_per_shard=args.samples_per_shard,
            image_size=args.image_size,
            workers=args.workers,
        )
    except (SourceError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_shards_inspect(args: argparse.Namespace) -> int:
    from gqaru.shards import ShardError, inspect_shards

    try:
        return 0 if inspect_shards(args.dir, verify=not args.no_verify) else 1
    except ShardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _cmd_train(args: argparse.Namespace) -> int:
    from gqaru.preflight import command_line

    # Config and pre-flight errors before gqaru.train imports torch (main checks again: cheap).
    checked = command_line("train", [args.config, *args.overrides])
    if isinstance(checked, int):
        return checked
    from gqaru.train import main as train_main

    return train_main([args.config, *args.overrides])


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from gqaru.preflight import command_line

    checked = command_line("evaluate", [args.config, *args.overrides])
    if isinstance(checked, int):
        return checked
    from gqaru.evaluate import main as evaluate_main

    return evaluate_main([args.config, *args.overrides])


def _cmd_score(args: argparse.Namespace) -> int:
    from gqaru.metrics import score_command

    return score_command(args.predictions, against=args.against, out=args.out)


def _cmd_blind_baseline(args: argparse.Namespace) -> int:
    from gqaru.baseline import blind_baseline_command

    return blind_baseline_command(args.train, args.questions, args.out)


def _cmd_demo_verdict(args: argparse.Namespace) -> int:
    from gqaru.demo import verdict_command

    return verdict_command(args.runs, spread_file=args.spread)


def _cmd_demo_spread(args: argparse.Namespace) -> int:
    from gqaru.demo import spread_command

    return spread_command(args.runs, out=args.out, readme=args.readme)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    error = argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    try:
        value = float(text)
    except ValueError:
        raise error from None
    if not 0 < value <= 1:  # also rejects nan
        raise error
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqaru",
        description="Fine-tune LLaVA models on GQA-ru with LoRA/QLoRA and evaluate them on testdev.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="print a resolved config, or the error in it")
    config.add_argument("config", help="a YAML config, e.g. configs/train_lora.yaml")
    config.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    config.set_defaults(handler=_cmd_config)

    synth = commands.add_parser(
        "synth", help="write a synthetic GQA-ru-format dataset (the offline default)"
    )
    synth.add_argument("--out", required=True, help="directory laid out like the deepvk/GQA-ru hub repo")
    synth.add_argument("--train-questions", type=_positive_int, default=4000)
    synth.add_argument("--testdev-questions", type=_positive_int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--templates",
        default="all",
        help="which questions: a set (all: the 36-template GQA-like mix; one-hop: one object named by "
        "its colour, or the whole image) or template names separated by commas",
    )
    synth.add_argument(
        "--questions-per-image",
        default="default",
        help="questions per TRAIN image: default (9-17, like GQA's balanced train), gqa-ru-train (GQA-ru's own "
        "train split: mean ~1.45, 91%% of images with one or two), or weights COUNT:WEIGHT,... (e.g. 1:65,2:26,3:9)",
    )
    synth.set_defaults(handler=_cmd_synth)

    tiny = commands.add_parser("tiny-model", help="build a tiny LLaVA + tokenizer + processor locally")
    tiny.add_argument("--out", required=True, help="directory for save_pretrained")
    tiny.add_argument(
        "--preset",
        choices=["tiny", "real-shape"],
        default="tiny",
        help="tiny: small and fast (tests, demo); real-shape: the real 336 px / 576-image-token shapes "
        "with a narrow width (benchmarks)",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--pretrain-steps",
        type=_non_negative_int,
        default=0,
        help="train the random model this many steps on grounding and reading first (gqaru/standins/pretrain.py), "
        "so that LoRA has a base to adapt; 0 keeps the random weights (default)",
    )
    tiny.add_argument(
        "--pretrain-target",
        type=_fraction,
        default=None,
        help="the held-out grounding word accuracy to reach before the reading phase: below it, grounding goes on "
        "in rounds of a quarter of --pretrain-steps up to --pretrain-max-steps (default: none, the planned steps only)",
    )
    tiny.add_argument(
        "--pretrain-max-steps",
        type=_positive_int,
        default=None,
        help="the step ceiling of --pretrain-target (default twice --pretrain-steps)",
    )
    tiny.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="pin torch's threads: the pretrained weights depend on the count (CPU kernels split sums by it), "
        "so a pinned count gives the same bytes on the same machine kind; default: torch's own (one per core)",
    )
    tiny.set_defaults(handler=_cmd_tiny_model)

    fetch = commands.add_parser(
        "fetch-tokenizers",
        help="fetch the real tokenizers (Gemma, Llama-2, Llama-3) from a PyPI wheel into the cache",
    )
    fetch.add_argument("--wheel", default=None, help="use this maxtext==0.2.5 wheel instead of downloading it")
    fetch.set_defaults(handler=_cmd_fetch_tokenizers)

    replica = commands.add_parser(
        "replica",
        help="build a replica of a real hub checkpoint: its files, configs, real tokenizer; narrow random weights",
    )
    replica.add_argument(
        "name",
        help="the hub checkpoint to replicate: deepvk/llava-gemma-2b-lora, llava-hf/llava-1.5-7b-hf or deepvk/llava-saiga-8b",
    )
    replica.add_argument("--out", required=True, help="output dir (replaced whole; refused if it holds other files)")
    replica.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    replica.add_argument(
        "--vary-answers",
        action="store_true",
        help="bias the random weights so greedy answers are short words that vary with the input (tests)",
    )
    replica.set_defaults(handler=_cmd_replica)

    shards = commands.add_parser("shards", help="build or inspect webdataset shards")
    shard_commands = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    build = shard_commands.add_parser("build", help="GQA-ru (hub id or local dir) -> webdataset shards")
    build.add_argument("--source", required=True, help="hub id (deepvk/GQA-ru) or a local dir in its layout")
    build.add_argument("--split", required=True, choices=["train", "testdev"])
    build.add_argument("--out", required=True, help="output dir; an existing one is replaced whole")
    build.add_argument("--max-samples", type=_positive_int, default=None, help="questions to select (default all)")
    build.add_argument("--seed", type=int, default=None, help="seed of the question selection (default 0)")
    build.add_argument(
        "--selection",
        choices=["seeded", "seed-report"],
        default="seeded",
        help="seeded (default): --max-samples questions drawn with --seed; seed-report: the seed report's "
        "rows exactly (train: its first 2,000 rows; testdev: its 300 rows, random.Random(42) over row indices)",
    )
    build.add_argument("--samples-per-shard", type=_positive_int, default=256, help="images per shard")
    build.add_argument(
        "--image-size", type=_positive_int, default=None, help="resize the shorter side to PX (default: keep)"
    )
    build.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes that check/re-encode images; 1: in this process (default: usable cores, at most 4); "
        "the shards are the same bytes for any N",
    )
    build.set_defaults(handler=_cmd_shards_build)
    inspect = shard_commands.add_parser("inspect", help="summarise a shard dir and verify its checksums")
    inspect.add_argument("dir")
    inspect.add_argument("--no-verify", action="store_true", help="skip the sha256 verification")
    inspect.set_defaults(handler=_cmd_shards_inspect)

    train = commands.add_parser(
        "train", help="train in one process (multi-process: accelerate launch -m gqaru.train)"
    )
    train.add_argument("config", help="a YAML config, e.g. configs/demo_train.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides; `python -m gqaru.train --help` lists the keys")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate in one process (multi-process: accelerate launch -m gqaru.evaluate)"
    )
    evaluate.add_argument("config", help="a YAML config, e.g. configs/demo_eval.yaml")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides; `python -m gqaru.evaluate --help` lists the keys")
    evaluate.set_defaults(handler=_cmd_evaluate)

    score = commands.add_parser("score", help="metrics from a predictions file; --against for a paired test")
    score.add_argument("predictions", help="predictions.jsonl (fields id, answer, prediction; types optional)")
    score.add_argument("--against", default=None, help="another predictions.jsonl to compare with")
    score.add_argument("--out", default=None, help="write the metrics JSON here")
    score.set_defaults(handler=_cmd_score)

    blind = commands.add_parser(
        "blind-baseline",
        help="answer an evaluation's questions from the training answers alone (no image, no model)",
    )
    blind.add_argument("--train", required=True, help="training shards to count the answer prior from")
    blind.add_argument(
        "--questions", required=True, help="a predictions.jsonl whose questions to answer (e.g. the run to compare)"
    )
    blind.add_argument("--out", required=True, help="predictions.jsonl to write")
    blind.set_defaults(handler=_cmd_blind_baseline)

    demo = commands.add_parser("demo", help="the offline demo's figures: one run's verdict, the spread over seeds")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    demo_verdict = demo_commands.add_parser(
        "verdict", help="trained vs untrained vs blind with intervals, and whether inside the README's range"
    )
    demo_verdict.add_argument("runs", help="the demo's run directory (DEMO_RUNS of `make demo`, default runs)")
    demo_verdict.add_argument("--spread", default=None, help="the spread record (default benchmarks/demo_spread.json)")
    demo_verdict.set_defaults(handler=_cmd_demo_verdict)
    demo_spread = demo_commands.add_parser(
        "spread", help="the figures of several demo runs (one per seed), their mean and range"
    )
    demo_spread.add_argument("runs", nargs="+", help="demo run directories, one per seed")
    demo_spread.add_argument("--out", default=None, help="where the record goes (default benchmarks/demo_spread.json)")
    demo_spread.add_argument("--readme", default=None, help="regenerate the table between the markers of this file")
    demo_spread.set_defaults(handler=_cmd_demo_spread)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
