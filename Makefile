# stepserve: the entry points a newcomer reads.
#   make demo    set up, start a server on the embedded model, generate images via the CLI
#   make test    set up and run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: the CPU wheel on this machine. GPU users install
# their CUDA build of torch into .venv themselves and run `make setup TORCH=skip`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo serve test test-fast lint format proto proto-check clients client-deps deploy-check deploy-rules bench bench-quick train-tiny train-tiny-loras clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ "$(TORCH)" != "skip" ]; then $(BIN)/pip install -q "$(TORCH)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	scripts/demo.sh

serve: setup
	$(BIN)/stepserve serve

test: setup proto-check lint client-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -x -q

lint: setup
	$(BIN)/ruff check server client clients tests models deploy bench
	$(BIN)/ruff format --check server client clients tests models deploy bench
	$(BIN)/buf lint
	$(BIN)/mypy server client

format: setup
	$(BIN)/ruff check --fix server client clients tests models deploy bench
	$(BIN)/ruff format server client clients tests models deploy bench

# Stubs are generated into gen/ and committed; proto-check fails if they are stale.
proto: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=gen --grpc_python_out=gen --mypy_out=gen --mypy_grpc_out=gen \
	  proto/stepserve/v1/*.proto

proto-check: setup
	rm -rf /tmp/stepserve-proto-check && mkdir -p /tmp/stepserve-proto-check
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=/tmp/stepserve-proto-check --grpc_python_out=/tmp/stepserve-proto-check \
	  --mypy_out=/tmp/stepserve-proto-check --mypy_grpc_out=/tmp/stepserve-proto-check \
	  proto/stepserve/v1/*.proto
	for f in /tmp/stepserve-proto-check/stepserve/v1/*; do \
	  diff -q "$$f" "gen/stepserve/v1/$$(basename $$f)" || { echo "stale stubs: run make proto"; exit 1; }; \
	done

# The TypeScript client's packages (clients/typescript/package-lock.json), when npm is here;
# without it tests/test_clients.py says it skips them.
TS_STAMP := clients/typescript/node_modules/.package-lock.json
client-deps:
	@if command -v npm >/dev/null; then \
	  [ "$(TS_STAMP)" -nt clients/typescript/package-lock.json ] || (cd clients/typescript && npm ci --no-audit --no-fund); \
	else echo "npm not found: the TypeScript client's tests will be skipped"; fi

# TypeScript and Go clients from the same proto (buf.gen.yaml, local plugins): protoc-gen-es
# from clients/typescript (npm ci there first), protoc-gen-go and protoc-gen-go-grpc from
# Debian's packages; the google.rpc error details and gRPC health types for TypeScript come
# from the descriptors of the Python packages stepserve installs (clients/deps_image.py).
# CLIENTS_OUT writes under another directory (tests/test_clients.py checks for drift).
CLIENTS_OUT ?= .
clients: setup client-deps
	rm -rf $(CLIENTS_OUT)/clients/typescript/src/gen $(CLIENTS_OUT)/clients/go/src/stepserve/gen
	$(BIN)/buf generate -o $(CLIENTS_OUT)
	$(BIN)/python clients/deps_image.py $(CLIENTS_OUT)/clients-deps.binpb
	$(BIN)/buf generate $(CLIENTS_OUT)/clients-deps.binpb --template clients/buf.gen.deps.yaml \
	  --exclude-path google/protobuf -o $(CLIENTS_OUT)
	rm $(CLIENTS_OUT)/clients-deps.binpb

# Render every kustomization, validate it against the Kubernetes schemas offline, lint the
# Dockerfile, and check ports, probes, drain and autoscaling agree with the server (also run
# by make test, in tests/test_deploy.py).
deploy-check: setup
	HF_HUB_OFFLINE=1 $(BIN)/python deploy/check.py

# Regenerate the Prometheus Operator PrometheusRule from deploy/prometheus/stepserve-rules.yaml.
deploy-rules: setup
	$(BIN)/python deploy/check.py --write-rules

# Benchmark: sequential diffusers reference vs request-level vs step-level batching vs the
# compute limit, same model and requests (about 45 minutes; bench-quick about 25). Writes
# bench/results/<date>-<host>-<profile>.json and .png. make test runs a smoke profile.
bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --profile full

bench-quick: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --profile quick

# Rebuild the embedded model from scratch (about 30 minutes on 2 idle CPU cores).
train-tiny: setup
	$(BIN)/python models/tiny/train.py --out server/assets/tiny-shapes

# The embedded model's two LoRA adapters (outline, stripes), on the committed base weights.
train-tiny-loras: setup
	$(BIN)/python models/tiny/train_loras.py --out server/assets/tiny-shapes/loras

clean:
	rm -rf $(VENV) demo-output .pytest_cache
