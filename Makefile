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

# one pytest worker per core, one thread each (modules stay whole, so a module's fixtures are
# built once): 6.2-6.7 min instead of 9.6 min on 2 cores
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadscope

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadscope -m "not slow"

lint: setup
	$(VENV)/bin/ruff check medidiff workflows tests benchmarks

benchmark: setup
	$(PY) benchmarks/anomaly.py

clean:
	rm -rf demo .pytest_cache
