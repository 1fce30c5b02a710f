# Two commands set up a fresh clone: `make serve` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; a plain `torch` requirement may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

.PHONY: install serve test lint bench
install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/vlmd serve --enable_multimodal --port 8000

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check vlmd tests bench

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/serving_overhead.py
