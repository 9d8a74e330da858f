# The two commands a newcomer needs: `make demo` and `make test` (both set up on first use);
# `make test-fast` runs the unit tier alone (tests/unit: no process started).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# On CPU: two ranks bound to their own cores; on a GPU box the launcher finds the GPUs itself.
LAUNCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "deepspeed" || echo "deepspeed --num_gpus 2 --bind_cores_to_rank")

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	@touch $@

demo: setup
	$(LAUNCH) launch/train.py

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-fast: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	bash benchmarks/run_all.sh

clean:
	rm -rf runs .pytest_cache
