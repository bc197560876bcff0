# Set-up is part of every target: a fresh clone needs only `make test` or `make demo`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision pinned to the builds on this machine's disk so installs never download torch.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-cluster test-slow demo lint format bench gpu-wheels gpu-check-cpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[dev,face,cluster]'
	touch $(STAMP)

setup: $(STAMP)

# Two workers, each test file on one of them (module fixtures are built once): 5.6 min here
# against 10.5 min in one process, on 2 idle cores. tests/latex/install.sh apt-gets pdflatex for
# the LaTeX compile tests where it is absent (as root; 55 s here, once), else does nothing.
test: $(STAMP)
	@bash tests/latex/install.sh
	$(BIN)/ruff check .
	WANDB_MODE=offline $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# Beyond one process: every method on 2 DDP ranks (gloo, CPU) and sweeps on a real one-node SLURM
# cluster that the tests start and stop (tests/slurm/local_cluster.sh; its install step
# apt-gets slurm-wlm, munge, slurmdbd and mariadb-server where absent, as root). One file at a
# time: each test already runs two processes.
test-cluster: $(STAMP)
	bash tests/slurm/local_cluster.sh install
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m cluster --durations=10

test-slow: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python run.py -m +sweep=demo

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py

# Wheels a lent GPU machine lacks (Python 3.12, manylinux x86_64; it has torch, lightning, timm,
# pytest, PyYAML, joblib and packaging). benchmarks/gpu_check.sh installs them there offline;
# carry $(GPU_WHEELS) with the device tool. PyYAML is carried but installed only where `import
# yaml` fails. wandb is not carried: the check logs with logger=csv. antlr4 4.9 has no wheel on
# the registry: pip wheel builds its pure-Python one. Pins: the versions of this venv.
GPU_WHEELS    := .gpu-wheels
GPU_PIP       ?= $(PY) -m pip
GPU_PYTHON    := 3.12
GPU_GLIBCS    := manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014
GPU_PLATFORMS := $(foreach p,$(GPU_GLIBCS),--platform $(p)_x86_64)
GPU_PKGS      := hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 \
                 dlib-bin==20.0.1.post1 PyYAML==6.0.4
GPU_SDISTS    := antlr4-python3-runtime==4.9.3
GPU_MAX_MIB   := 32

gpu-wheels:
	rm -rf $(GPU_WHEELS)  # one version of each: two stop the offline install
	$(GPU_PIP) download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--implementation cp --abi cp$(subst .,,$(GPU_PYTHON)) $(GPU_PLATFORMS) \
		-d $(GPU_WHEELS) $(GPU_PKGS)
	$(GPU_PIP) wheel --quiet --no-deps -w $(GPU_WHEELS) $(GPU_SDISTS)
	@ls -1s --block-size=K $(GPU_WHEELS)
	@bytes=$$(du -sb $(GPU_WHEELS) | cut -f1); \
	echo "$(GPU_WHEELS): $$((bytes / 1024)) KiB (the device tool carries 64 MiB with the tree)"; \
	test $$bytes -le $$(( $(GPU_MAX_MIB) * 1048576 )) || { echo "over $(GPU_MAX_MIB) MiB"; exit 1; }

# The GPU check rehearsed on this CPU at tiny sizes (tests/test_gpu_check.py runs it too).
gpu-check-cpu: $(STAMP)
	mkdir -p outputs/gpu_check
	OUT=outputs/gpu_check bash benchmarks/gpu_check.sh --cpu

clean:
	rm -rf outputs multirun .pytest_cache
