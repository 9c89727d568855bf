# medidiff: `make demo` runs the main job, `make test` runs the test suite (both set up first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medidiff-installed

.PHONY: setup demo test test-fast lint benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/medidiff demo --out demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check medidiff workflows tests benchmarks

benchmark: setup
	$(PY) benchmarks/anomaly.py

clean:
	rm -rf demo .pytest_cache
