# The README's two commands: `make demo` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gprebn-edge demo

lint: $(STAMP)
	$(BIN)/ruff check gprebn_edge export runtime tests benchmarks scripts
	$(BIN)/mypy gprebn_edge export runtime

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
