# make sandbox   set up everything, then `orchestrate up --hosts sandbox`
# make test      the whole suite: ruff, yamllint, ansible-lint, pytest (unit,
#                Molecule scenarios, sandbox end to end)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# podman on these machines needs the project's settings (runc, ulimits, no default bridge).
export CONTAINERS_CONF := $(CURDIR)/sandbox/containers.conf

.PHONY: host-deps setup sandbox down lint unit test

host-deps:
	@scripts/install-host-deps.sh

setup: host-deps $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | host-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

sandbox: setup
	$(BIN)/orchestrate up --hosts sandbox

down: setup
	$(BIN)/orchestrate down --hosts sandbox

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint

unit: setup
	$(BIN)/pytest -m "not molecule and not e2e"

test: lint
	$(BIN)/pytest -v
