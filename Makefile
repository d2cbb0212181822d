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

# the project's files (a clone's), not files a user dropped into the directory
PY_FILES = $(or $(shell git ls-files '*.py' 2>/dev/null),.)

lint: $(STAMP)
	$(BIN)/ruff format --check $(PY_FILES)
	$(BIN)/ruff check $(PY_FILES)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# the browser tests drive Debian's Chromium, never a downloaded browser: installed here when
# missing and allowed (root with apt-get); otherwise the test says how to get it
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	else \
		echo "note: the browser tests need Debian's chromium (sudo apt-get install chromium)"; \
	fi

unit: $(STAMP) $(CHROMIUM)
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
