# Set-up is part of every target: a fresh clone needs only `make test` or `make demo`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision pinned to the builds on this machine's disk so installs never download torch.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-slow demo lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[dev,face,cluster]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	WANDB_MODE=offline $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python run.py -m +sweep=demo
	$(BIN)/owdfa-bench aggregate outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py

clean:
	rm -rf outputs multirun .pytest_cache
