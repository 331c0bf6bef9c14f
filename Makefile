# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
# Bring your own environment with PYTHON=/path/to/python (or an active virtualenv).

VENV   := .venv
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
endif
PYTHON ?= $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
NPROC   ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l),2)
PORT    ?= 29511

.PHONY: setup models demo test test-fast bench check format clean

setup: $(PYTHON)

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(VENV)/bin/pip install -q torch
	$(VENV)/bin/pip install -q -e '.[dev,models,gpu]' || $(VENV)/bin/pip install -q -e '.[dev,models]'
else
	# CPU-only machine: the CPU build of torch, never the multi-GB CUDA one.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,models]'
endif

# A real pretrained model (SmolLM2-135M) as a Hugging Face directory, cached under
# ~/.cache/migu-cpt (scripts/get_model.py); prints its path.
models: setup
	$(PYTHON) scripts/get_model.py smollm2-135m

demo: setup
	$(PYTHON) -m deepspeed.launcher.runner --num_gpus $(NPROC) --master_port $(PORT) \
		launch/cpt.py --config configs/tiny-cpu.yaml $(ARGS)

test: setup
	$(PYTHON) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every benchmark, one JSON line each (see BENCHMARKS.md): the GPU suite where there is a GPU.
bench: setup
ifeq ($(HAS_GPU),1)
	PYTHON=$(PYTHON) bash bench/gpu.sh
else
	$(PYTHON) bench/bench_train.py
	$(PYTHON) bench/bench_train.py engine.backend=fsdp2
	$(PYTHON) bench/bench_train.py engine.backend=fsdp2 model.compile=true
	$(PYTHON) bench/bench_data.py
	$(PYTHON) bench/bench_checkpoint.py
	$(PYTHON) bench/bench_checkpoint.py --backend fsdp2
endif

check: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy train migu_dist

format: setup
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

clean:
	rm -rf runs .pytest_cache
