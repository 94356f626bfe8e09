# Two commands do all set-up on a fresh machine:
#   make segment   - segment the bundled example images with the shipped model
#   make test      - lint and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup segment test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

segment: setup
	$(VENV)/bin/cpsam segment cpsam_toolkit/examples --out out/examples --save-outlines --save-table

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py
