# Each target creates .venv with everything it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-strict lint bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python examples/deq_digits_flax.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider tests

# The derivative tests again under strict dtype promotion (no implicit float32/float64 mixing).
test-strict: $(BIN)/.installed
	IMPLICAX_DTYPE_PROMOTION=strict $(BIN)/python -m pytest -q -n 2 -p no:cacheprovider \
		tests/test_derivatives.py tests/test_robustness.py

lint: $(BIN)/.installed
	$(BIN)/ruff format --check src integrations tests examples benchmarks
	$(BIN)/ruff check src integrations tests examples benchmarks
	$(BIN)/pyright

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py

docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site
