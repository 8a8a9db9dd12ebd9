# imgsearch: `make demo` and `make test` work on a fresh machine (they create .venv and install what they need).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= ../shared/data
STAMP := $(VENV)/.installed
# The CPU torch wheel lies here on our machines (PIP_FIND_LINKS points at it too).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: demo test bench proto lint install system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch==2.13.0 (CPU) comes from the wheel on this machine's find-links; see pyproject.
	$(PIP) install -q $(FIND_LINKS) -e '.[train,serve,dev]'
	touch $(STAMP)

install: $(STAMP)

# redis-server and prometheus/promtool are real servers the tests start on loopback ports.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  echo "installing redis-server and prometheus from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server prometheus >/dev/null; \
	fi

test: install system-deps
	$(PY) -m pytest -q -ra tests

demo: install system-deps
	$(VENV)/bin/imgsearch demo --data $(DATA)

bench: install
	$(PIP) install -q -e '.[train,serve,dev,bench]'
	$(PY) -m shard_server.bench --out docs/bench-shard.json --markdown docs/bench-shard.md

proto: install
	./scripts/gen_protos.sh
	$(VENV)/bin/buf lint protos

clean:
	rm -rf $(VENV) build *.egg-info
