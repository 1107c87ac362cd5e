# gqaru: set-up, the offline demo and the tests. `make demo` and `make test` each set up .venv first.
#
# TORCH_SPEC picks the torch build. The default pin matches the CPU build on this project's
# machines; on a CUDA or Apple machine it installs the normal PyPI build of the same version.
# A machine that already has the torch it wants: make setup TORCH_SPEC=

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/gqaru/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# The demo's files: all under git-ignored dirs.
DEMO_DATA := data/synth-gqa-ru
DEMO_TRAIN_SHARDS := shards/demo-train
DEMO_TESTDEV_SHARDS := shards/demo-testdev
# The demo's questions: the one-hop set (one object named by its colour, or the whole image), which
# a 2-layer tiny model learns in minutes; `gqaru synth --templates all` is the 36-template mix.
DEMO_TEMPLATES := one-hop
# Steps of the tiny model's pretraining (gqaru/standins/pretrain.py): ~5 min on 2 cores, once. Its
# grounding goes on (up to twice the steps) until the held-out grounding reaches DEMO_PRETRAIN_TARGET:
# a weak draw of the seed is caught and said (in tiny_model.json and the demo's verdict).
DEMO_PRETRAIN_STEPS := 2800
DEMO_PRETRAIN_TARGET := 0.75
# Every demo stage pins torch to one thread: CPU kernels split their sums by the thread count, so an
# unpinned count (OMP_NUM_THREADS, the core count) gives a different model after thousands of steps.
# One thread gives the same bytes whatever the core count, and never spins against other work
# (two pinned threads on a busy 2-core machine took seconds per step); two are ~1.4x faster when idle.
DEMO_THREADS := 1
# The seed of the tiny model and of the LoRA run (the data's seed stays 0: every seed answers the
# same questions). `make demo-spread` runs the demo for each of DEMO_SPREAD_SEEDS.
DEMO_SEED ?= 0
DEMO_SPREAD_SEEDS ?= 0 1 2 3 4
DEMO_MODEL ?= models/tiny-llava$(if $(filter-out 0,$(DEMO_SEED)),-seed$(DEMO_SEED))
DEMO_RUNS ?= runs
DEMO_PINNED := runtime.torch_threads=$(DEMO_THREADS) model.name_or_path=$(DEMO_MODEL) output.dir=$(DEMO_RUNS)

.PHONY: setup tokenizers demo demo-spread test bench clean-demo

setup: $(VENV)/.installed tokenizers

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

# The real tokenizers (Gemma for the replica of deepvk/llava-gemma-2b-lora, Llama-2, Llama-3): extracted once
# from the PyPI wheel maxtext==0.2.5 into ~/.cache/gqaru/tokenizers ($$GQARU_CACHE); a no-op after.
tokenizers: $(VENV)/.installed
	$(BIN)/gqaru fetch-tokenizers

# The offline demo, end to end: a synthetic GQA-ru and a tiny LLaVA built here, shards, the
# untrained model's score, LoRA training, the trained model's score and the paired comparison,
# then the same comparison against the blind baseline (the training answers, no image).
demo: $(VENV)/.installed $(DEMO_MODEL)/tiny_model.json
	$(BIN)/gqaru synth --out $(DEMO_DATA) --train-questions 8000 --testdev-questions 2000 --seed 0 \
		--templates $(DEMO_TEMPLATES)
	$(BIN)/gqaru shards build --source $(DEMO_DATA) --split train --out $(DEMO_TRAIN_SHARDS) --seed 0
	$(BIN)/gqaru shards build --source $(DEMO_DATA) --split testdev --out $(DEMO_TESTDEV_SHARDS) --seed 0
	$(BIN)/accelerate launch --config_file launch/cpu.yaml -m gqaru.evaluate configs/demo_eval.yaml \
		$(DEMO_PINNED) output.run_name=demo-untrained
	$(BIN)/accelerate launch --config_file launch/cpu.yaml -m gqaru.train configs/demo_train.yaml \
		$(DEMO_PINNED) train.seed=$(DEMO_SEED)
	$(BIN)/accelerate launch --config_file launch/cpu.yaml -m gqaru.evaluate configs/demo_eval.yaml \
		$(DEMO_PINNED) model.adapter=$(DEMO_RUNS)/demo/adapter output.run_name=demo-trained
	$(BIN)/gqaru score $(DEMO_RUNS)/demo-trained/predictions.jsonl --against $(DEMO_RUNS)/demo-untrained/predictions.jsonl
	$(BIN)/gqaru blind-baseline --train $(DEMO_TRAIN_SHARDS) --questions $(DEMO_RUNS)/demo-trained/predictions.jsonl \
		--out $(DEMO_RUNS)/demo-blind/predictions.jsonl
	$(BIN)/gqaru score $(DEMO_RUNS)/demo-trained/predictions.jsonl --against $(DEMO_RUNS)/demo-blind/predictions.jsonl
	$(BIN)/gqaru demo verdict $(DEMO_RUNS)

# The demo once per seed of DEMO_SPREAD_SEEDS (~12 min each on 2 cores: a tiny model per seed), then
# the spread of its figures: benchmarks/demo_spread.json, and the README's table regenerated from it.
demo-spread: $(VENV)/.installed
	for seed in $(DEMO_SPREAD_SEEDS); do \
		$(MAKE) --no-print-directory demo DEMO_SEED=$$seed DEMO_RUNS=runs/demo-spread/seed-$$seed || exit 1; \
	done
	$(BIN)/gqaru demo spread $(foreach seed,$(DEMO_SPREAD_SEEDS),runs/demo-spread/seed-$(seed)) --readme README.md

# The pretrained tiny model is built once and kept; editing the code that makes it rebuilds it.
$(DEMO_MODEL)/tiny_model.json: $(VENV)/.installed Makefile gqaru/standins/tiny.py gqaru/standins/pretrain.py \
		gqaru/standins/synth.py gqaru/prompts.py
	$(BIN)/gqaru tiny-model --out $(DEMO_MODEL) --preset tiny --seed $(DEMO_SEED) \
		--pretrain-steps $(DEMO_PRETRAIN_STEPS) --pretrain-target $(DEMO_PRETRAIN_TARGET) --threads $(DEMO_THREADS)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/run.py

clean-demo:
	rm -rf $(DEMO_DATA) models/tiny-llava models/tiny-llava-seed* $(DEMO_TRAIN_SHARDS) $(DEMO_TESTDEV_SHARDS) \
		runs/demo runs/demo-untrained runs/demo-trained runs/demo-blind runs/demo-spread
