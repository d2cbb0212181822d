# Two commands do everything: `make demo` runs the product, `make test` runs the checks.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo up test lint typecheck unit bench bench-quick clean web

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (set PY=python3.x, 3.11 or newer)"; exit 2; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sealstream demo

up: $(STAMP)
	$(BIN)/sealstream up

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/sealstream bench --out docs/bench

bench-quick: $(STAMP)
	$(BIN)/sealstream bench --quick --out build/bench

# the browser consumer's bundle (committed, so `make demo` needs no Node): prints its SRI hashes
web:
	cd consumers/web && npm ci --no-audit --no-fund && npm run build

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
