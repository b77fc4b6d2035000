# Each target makes .venv and installs the project into it when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: demo instruct test bench lint clean serve

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first, so nothing else pulls a CUDA build of torch.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m storyllama.demo

# Tune the demo model (trained first when runs/demo has no checkpoint) to write the story a reader asks for
instruct: $(STAMP)
	$(BIN)/python -m storyllama.instruct_demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The Story studio on the demo run (trained first when it has no checkpoint), at http://127.0.0.1:7860
serve: $(STAMP)
	$(BIN)/python -c "import gradio" 2>/dev/null || $(BIN)/pip install -q -e '.[serve]'
	test -f runs/demo/checkpoints/latest || $(BIN)/python -m storyllama.demo
	$(BIN)/python bin/serve --run runs/demo $(SERVE_ARGS)

bench: $(STAMP)
	$(BIN)/python bin/bench

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs data/builtin data/demo-instruct benchmarks/results
