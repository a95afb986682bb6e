# changefeed: `make run` serves the demo, `make test` runs every test.
# Both create the virtualenv and install pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(BIN)/python migrate.py
	$(BIN)/flask --app app run --host $(HOST) --port $(PORT)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
