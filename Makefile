# landmark_bench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?=
SHOTS ?= 10
SEEDS ?= 0 1 2
PRESET ?= cpu
METHODS ?= mean_shape scratch imagenet simclr moco dino scratch_unet ddpm cdpm_align
# finetune: the whole network trained; probe: the pretrained backbone frozen, only a light head trained
PROTOCOLS ?= finetune probe
# preset settings by dotted key, e.g. SET="finetune.lr=5e-4 pretrain.cdpm_align.align_weight=0", or a YAML file
SET ?=
CONFIG ?=
DATASETS ?= $(if $(DATA_DIR),isbi2015,phantom)
space := $(subst ,, )
OUT ?= sweeps/$(PRESET)-$(firstword $(DATASETS))-$(subst $(space),-,$(strip $(SHOTS)))shot
# jobs run as local processes, one per slot: JOBS CPU processes sharing the cores (one OpenMP thread each on a
# 2-core machine), or SLOTS="cuda:0 cuda:1" for one job per GPU; LAUNCHER=slurm sends them to a cluster
LAUNCHER ?= local
JOBS ?= 2
SLOTS ?= $(foreach _,$(shell seq $(JOBS)),cpu)
TEST_DATA_DIR ?= $(if $(DATA_DIR),$(DATA_DIR),../shared/data)
TEST_WORKERS ?= $(shell nproc)

.PHONY: help install test benchmark clean

help: ## list the targets and what they do
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## create .venv and install the package with its test extras

test: $(VENV)/.installed ## check the import layers, then run the test suite on the real data (DATA_DIR, default ../shared/data) and the phantom
	$(VENV)/bin/lint-imports --no-cache
	# one pytest worker per core, each test file on one worker (its module fixtures built once), one thread per
	# process: tiny models gain nothing from more; the 15 slowest tests are listed, to watch the 10-minute budget
	OMP_NUM_THREADS=1 DATA_DIR=$(TEST_DATA_DIR) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

benchmark: $(VENV)/.installed ## sweep METHODS x PROTOCOLS x DATASETS x SHOTS x SEEDS under PRESET, print the leaderboard
	$(VENV)/bin/landmark-bench sweep --preset $(PRESET) --methods $(METHODS) --protocols $(PROTOCOLS) --datasets $(DATASETS) \
		--shots $(SHOTS) --seeds $(SEEDS) --out $(OUT) $(if $(DATA_DIR),--data-dir $(DATA_DIR),) \
		--launcher $(LAUNCHER) $(if $(filter local,$(LAUNCHER)),--slots $(SLOTS),) \
		$(if $(strip $(SET)),--set $(SET),) $(if $(CONFIG),--config $(CONFIG),)

.PHONY: gpu-check
gpu-check: $(VENV)/.installed ## time each method's training steps on this GPU (a CPU: a tiny smoke run), append the paper sweep's GPU-hours to benchmarks/RESULTS.md
	$(PY) -m benchmarks.gpu_check

clean: ## remove the virtual environment and caches (not the data cache in ~/.cache/landmark_bench)
	rm -rf $(VENV) .pytest_cache
