# The front door: `make dev` runs the product, `make test` runs every check. Both install
# what they need into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml | sha1sum | cut -c1-12)
# `make dev` installs only what the product needs (a quick first start); `make test` adds the
# test tools on top. Each stamp names the pyproject it was installed from.
RUNTIME_STAMP := $(VENV)/.runtime-$(HASH)
STAMP := $(VENV)/.installed-$(HASH)

.PHONY: dev test lint unit bench system-deps clean

$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	rm -f $(VENV)/.runtime-*
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# checkov (terraform security scan) pins its own dependencies: it gets a venv of its own.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet --upgrade pip
	.venv-checkov/bin/pip install --quiet 'checkov>=3.2,<4'

dev: $(RUNTIME_STAMP)
	$(BIN)/behalf dev

# System packages the integration tests use (a headless Chromium for the browser tests).
system-deps:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); \
	  else echo "chromium missing: browser tests will be skipped (sudo apt-get install chromium)"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

test: $(STAMP) $(CHECKOV) system-deps lint
	$(BIN)/pytest -q

# Every benchmark against the real PostgreSQL and Redis, one table, bench/results.json.
# BENCH_ARGS="--quick" for smoke sizes; BENCH_ARGS="refresh kms" for some benchmarks only.
bench: $(STAMP)
	$(BIN)/python -m bench.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
