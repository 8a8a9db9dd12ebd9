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

.PHONY: demo test bench bench-install bench-shard bench-embedder bench-compare bench-compare-1m bench-load bench-gpu proto lint install system-deps clean

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

# Benchmarks: slow (about 1.5 hours on 2 cores), never part of `make test`. Each writes JSON (+ markdown/plots)
# under docs/; the pieces can be run one by one: make bench-shard bench-embedder bench-compare bench-load.
bench: bench-shard bench-embedder bench-compare bench-load

bench-install: install
	$(PIP) install -q $(FIND_LINKS) -e '.[train,serve,dev,bench]'

# one shard process over 1M synthetic vectors: gRPC vs in process, filtered recall, bytes per vector
bench-shard: bench-install
	$(PY) -m shard_server.bench --out docs/bench-shard.json --markdown docs/bench-shard.md

# embedding throughput: in-process PyTorch and ONNX Runtime vs a real Triton server on this CPU; then what
# decoding big JPEGs at a reduced scale saves and changes (model input and hashes)
bench-embedder: bench-install system-deps
	$(VENV)/bin/imgsearch-embed bench --duration-s 4
	set -o pipefail; $(PY) -m embedder.decode_profile --photos 99 --json docs/bench/decode-profile.json | tee docs/bench/decode-profile.md

# On a machine with an NVIDIA GPU (not part of `make bench`): float32/TF32/float16/bfloat16 retrieval and model
# speed. It runs under $(PYTHON), which must have a CUDA build of torch (the venv's is the CPU wheel), onnx,
# onnxruntime and pillow.
bench-gpu:
	set -o pipefail; PYTHONPATH=protos:. $(PYTHON) -m embedder.precision_check --data $(DATA)/grocery --train-per-product 10 --out docs/bench/precision-gpu.json | tee docs/bench/precision-gpu.md

# raw faiss, one shard, the broker over 1/2/4 shards, LanceDB and Milvus Lite on the same data
bench-compare: bench-install
	$(PY) -m shard_server.compare --vectors 200000 --queries 200 --filter-queries 100 --out docs/bench/compare-200k.json --plots docs/bench
	$(PY) -m shard_server.compare --vectors 50000 --queries 300 --filter-queries 100 --out docs/bench/compare-50k.json --plots docs/bench
	$(PY) -m shard_server.compare --grocery $(DATA) --nlist 32 --filter-queries 296 --nprobes 1,2,4,8,16,32 --out docs/bench/compare-grocery.json --plots docs/bench

# The 1M-vector comparison of docs/benchmarks.md: about an hour on 2 cores (Milvus Lite is most of it).
bench-compare-1m: bench-install
	nice -n 10 $(PY) -m shard_server.compare --vectors 1000000 --queries 200 --filter-queries 100 --profile-s 10 --out docs/bench/compare-1m.json --plots docs/bench

# the full stack (Triton on CPU, redis, shards, broker) at rising client concurrency, then one shard killed
bench-load: bench-install system-deps
	$(PY) -m broker.loadtest --out docs/bench/loadtest.json --plots docs/bench

# ruff (its default rules, settings in pyproject.toml; generated code excluded) and buf's proto lint;
# tests/test_lint.py runs both in `make test` too
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint protos

proto: install
	./scripts/gen_protos.sh
	$(VENV)/bin/buf lint protos

clean:
	rm -rf $(VENV) build *.egg-info
