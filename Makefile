# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= fleet-data/demo
# Ray runs with token authentication on 127.0.0.1 (fleet.run.pipeline.init_ray; docs/security.md).

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

# torch==2.13.0 first: it comes from this machine's disk as a CPU build; a bare `torch` would pull CUDA.
# The `test` extra brings playwright; the browser it drives is the system's `chromium` (root: `apt-get install -y
# chromium`, as .ci/run does), never a download: tests/test_report.py's browser test is skipped without it.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	DEMO_DIR=$(DEMO_DIR) $(PY) jobs/demo.py

# lint first: CI runs `make test`, so a lint finding or an unformatted file fails CI like a failing test
lint: setup
	$(PY) -m ruff check fleet jobs tests
	$(PY) -m ruff format --check fleet jobs tests

test: setup lint
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf fleet-data mlruns .pytest_cache

# A real two-node Ray cluster (`ray start` head + worker on 127.0.0.1) running `fleet compress` against
# moto's S3 server and an MLflow server; stops the cluster's own processes (never `ray stop`). ~2-3 min.
.PHONY: multinode
multinode: setup
	$(PY) -m pytest -q tests/test_multinode.py
