# Two commands for a new user: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: on machines of this project's kind, pip takes it from local disk.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tuft-installed

# The SDK matrix: the e2e suite also runs under the oldest supported SDK, in its own venv, against
# the same server build (the server runs from $(VENV); TUFT_SERVER_PYTHON tells the tests).
SDK_OLD ?= 0.25.0
VENV_OLD ?= .venv-tinker$(subst .,,$(SDK_OLD))
STAMP_OLD := $(VENV_OLD)/.tuft-installed

# The rest of the matrix: every supported minor version (and 0.24.1, which must be refused), each
# only the tinker package in its own folder (pip --target, no dependencies: they are the main
# venv's), put first on PYTHONPATH by tests/e2e/test_sdk_matrix.py. No venv or torch per version.
SDK_MATRIX_FILE := tests/e2e/sdk_matrix.txt
SDK_MATRIX := $(shell grep -E '^[0-9]' $(SDK_MATRIX_FILE))
SDK_DIR ?= .venv-sdks
SDK_STAMPS := $(foreach v,$(SDK_MATRIX),$(SDK_DIR)/$(v)/.tuft-installed)

# tinker-cookbook: tests run its own code (merge, renderers, supervised loop) against TuFT. Installed
# without tml-renderers, which only serves other model families (Inkling, Kimi K3) and which the
# cookbook imports lazily, hence --no-deps plus the rest of its dependencies (its METADATA) here.
COOKBOOK ?= 0.6.1
COOKBOOK_STAMP := $(VENV)/.tuft-cookbook-$(COOKBOOK)
COOKBOOK_DEPS := "aiohttp>=3.9.0" "anyio>=4.0.0" "blobfile>=3.0.0" "chz>=0.4.0" "cloudpickle>=3.0.0" \
	"datasets>=2.14.0" "huggingface-hub>=0.20.0" "numpy>=1.24.0" "pillow>=10.0.0" "pydantic>=2.0.0" \
	"pyrage>=1.4.0" "rich>=13.0.0" "safetensors>=0.4.0" "termcolor>=2.0.0" "tiktoken>=0.12.0" \
	"tinker>=0.38.0" "torch>=2.10" "tqdm>=4.60.0" \
	"transformers>=4.57.6,!=5.3.0,!=5.4.*,!=5.5.0,!=5.5.1,!=5.5.2,!=5.5.3,!=5.6.*"

.PHONY: install run test test-sdk-old test-sdk-matrix sdk-matrix cookbook lint services clean constraints constraints-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(STAMP_OLD): pyproject.toml
	test -x $(VENV_OLD)/bin/python || $(PYTHON) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLD)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV_OLD)/bin/python -m pip install -q "tinker==$(SDK_OLD)" pytest pytest-timeout \
		"sqlalchemy>=2.0.30" "alembic>=1.16" "psycopg[binary]>=3.2" pyyaml
	$(VENV_OLD)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP_OLD)

$(SDK_DIR)/%/.tuft-installed: | $(STAMP)
	rm -rf $(SDK_DIR)/$*
	$(PY) -m pip install -q --no-deps --no-compile --target $(SDK_DIR)/$* "tinker==$*"
	touch $@

sdk-matrix: $(SDK_STAMPS)

$(COOKBOOK_STAMP): | $(STAMP)
	$(PY) -m pip install -q $(COOKBOOK_DEPS)
	$(PY) -m pip install -q --no-deps "tinker-cookbook==$(COOKBOOK)"
	touch $@

cookbook: $(COOKBOOK_STAMP)

run: install
	$(VENV)/bin/tuft launch $(ARGS)

services: browser
	bash scripts/ensure-services.sh

# The dashboard's browser tests (tests/e2e/test_dashboard.py) drive Debian's chromium through
# playwright: installed here when missing (root with apt, as on the CI machine), never through
# `playwright install`, which downloads its own browser.
.PHONY: browser
browser:
	@test -x /usr/bin/chromium || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install services lint sdk-matrix cookbook
	TUFT_SDK_MATRIX=$(abspath $(SDK_DIR)) $(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-sdk-old

test-sdk-old: install $(STAMP_OLD) services
	@# The dashboard's browser tests check the server's pages, not the SDK: they run once, in `test`.
	TUFT_SERVER_PYTHON=$(abspath $(PY)) $(VENV_OLD)/bin/python -m pytest -m "e2e and not chaos and not browser" tests/e2e \
		-p no:cacheprovider $(PYTEST_ARGS)

test-sdk-matrix: install sdk-matrix services
	TUFT_SDK_MATRIX=$(abspath $(SDK_DIR)) $(PY) -m pytest tests/e2e/test_sdk_matrix.py -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check app workers tests migrations examples
	$(VENV)/bin/ruff format --check app workers tests migrations examples
	$(VENV)/bin/mypy
	@# House rule: the API side never imports the worker side or a GPU library.
	@! grep -rnE '^\s*(from|import)\s+(workers|torch|transformers|peft)\b' app
	@! grep -rnE '^\s*(from|import)\s+(sqlalchemy|celery|fastapi|app\.(db|queue|wire|api))\b' workers/engine

# constraints.txt: the exact versions of the venv `make test` ran in, which the Dockerfile installs
# (docs/deployment.md "Reproducible builds"). torch is left out: the image picks its build (CUDA or
# CPU) with TORCH_SPEC/TORCH_INDEX_URL, at the version TORCH_SPEC pins here. Regenerate after a
# green `make test` whenever the venv changed; constraints-check says whether it did.
CONSTRAINTS_CMD = $(PY) -m pip freeze --exclude-editable --disable-pip-version-check | grep -vE '^(torch|nvidia-[a-z0-9-]+|triton)==| @ ' | LC_ALL=C sort -f

constraints: install
	{ echo "# Generated by 'make constraints' from the venv 'make test' ran in; torch: $(TORCH_SPEC) (Dockerfile TORCH_SPEC)."; \
	  $(CONSTRAINTS_CMD); } > constraints.txt

constraints-check: install
	@diff <(grep -v '^#' constraints.txt) <($(CONSTRAINTS_CMD)) \
		&& echo "constraints.txt matches $(VENV)" \
		|| { echo "constraints.txt differs from $(VENV) (< file, > venv): run 'make constraints'"; exit 1; }

clean:
	rm -rf $(VENV) $(VENV_OLD) $(SDK_DIR) .pytest_cache .mypy_cache .ruff_cache
