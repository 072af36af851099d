# Two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test lint bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[report]'
	touch $@

# torch==2.13.0 is the CPU wheel (on disk here); tensorrt-stubs needs --no-deps (see pyproject).
$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev,train,report]'
	$(PIP) --no-deps 'tensorrt-stubs>=10.0'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/edge-runtime demo --out out/demo

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check edge_runtime export benchmarks tests

bench: $(VENV)/.dev
	$(PIP) -e '.[bench]'
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache
