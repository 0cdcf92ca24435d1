# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint test-fast bench clean-venv

# The venv is (re)built when pyproject.toml or constraints.txt change. constraints.txt pins the
# torch/torchvision releases this project's machines install from local disk.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check tla_jobs tests benchmarks cli.py

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slurm and not container"

test: lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_align.py

clean-venv:
	rm -rf $(VENV)
