# The README's two commands are `make run` and `make test`; everything else is for developers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

install: $(STAMP)

# Rebuilt only when the project's metadata changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/bilten dev --seed-demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check bilten tests bench
	$(BIN)/ruff format --check bilten tests bench
	$(BIN)/mypy

# The bench suite, plots and JSON in bench/results/ (bench/suite.py --help); about 7.5 minutes,
# `make bench BENCH_ARGS=--quick` leaves out the 100,000-buyer headline run.
bench: install
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
