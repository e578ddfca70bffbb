# Two entry points: `make serve` (the main job) and `make test`. Both create or reuse .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test test-fast lint serve demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	bash tests/browser/ensure_chromium.sh
	$(BIN)/ruff check ace_model training service tests benchmarks
	$(BIN)/mypy ace_model service
	OMP_NUM_THREADS=1 ACE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check ace_model training service tests benchmarks
	$(BIN)/mypy ace_model service

serve: $(STAMP)
	$(BIN)/ace serve --demo

bench: $(STAMP)
	$(BIN)/python benchmarks/encoder.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
