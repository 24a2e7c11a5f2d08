# Two commands for a new user: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: on machines of this project's kind, pip takes it from local disk.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tuft-installed

.PHONY: install run test lint services clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/tuft launch $(ARGS)

services:
	bash scripts/ensure-services.sh

test: install services lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app workers tests migrations examples
	$(VENV)/bin/ruff format --check app workers tests migrations examples
	$(VENV)/bin/mypy
	@# House rule: the API side never imports the worker side or a GPU library.
	@! grep -rnE '^\s*(from|import)\s+(workers|torch|transformers|peft)\b' app
	@! grep -rnE '^\s*(from|import)\s+(sqlalchemy|celery|fastapi|app\.(db|queue|wire|api))\b' workers/engine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
