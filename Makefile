# changefeed: `make run` serves the demo, `make test` runs every test,
# `make bench` measures it (`make bench QUICK=1`: a few seconds),
# `make soak` runs 10 minutes of mixed load and checks for errors and leaks
# (`make soak DURATION=90`: shorter).
# Each creates the virtualenv and installs pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test bench soak install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-dev.txt requirements-bench.txt client/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(BIN)/python migrate.py
	$(BIN)/flask --app app run --host $(HOST) --port $(PORT)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest

bench: $(VENV)/.test-deps
	$(BIN)/python bench/run.py $(if $(QUICK),--quick)

soak: $(VENV)/.test-deps
	$(BIN)/python bench/soak.py $(if $(DURATION),--duration $(DURATION))

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
