# warren — developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Reuse one target directory outside the clone so repeated builds are incremental.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/warren-target
CARGO ?= cargo
# cargo-nextest runs each test in its own process (parallel, clean signal handling);
# plain `cargo test` is the fallback when it is not installed.
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)
ifeq ($(NEXTEST),yes)
TEST_CMD = $(CARGO) nextest run --workspace --no-fail-fast
else
TEST_CMD = $(CARGO) test --workspace --no-fail-fast
endif

.PHONY: help test test-unit lint fmt rust-test crds bench bench-worker bench-venv bench-hostile fuzz bench-controller bench-scaling e2e e2e-bench dashboard-snapshot

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

test: lint rust-test chart-test local-go-test local-e2e ## every test this repository runs on one machine (local-e2e: the chart on a local control plane, mk/local.mk)

lint: ## rustfmt check, clippy with -D warnings (workspace lints in Cargo.toml), unused dependencies, size bar
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@$(CARGO) machete --version >/dev/null 2>&1 || { echo "make lint needs cargo-machete: cargo install --locked cargo-machete (.ci/install-tools.sh does)" >&2; exit 1; }
	$(CARGO) machete
	python3 mk/check_sizes.py --strict

fmt: ## format the workspace
	$(CARGO) fmt --all

test-unit: ## the pure Rust tests: no RabbitMQ, PostgreSQL, cluster or browser needed (nextest profile `unit`, .config/nextest.toml)
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-nextest
	$(CARGO) nextest run --workspace --profile unit --no-fail-fast

# local-go-build: the tests that start a private Kubernetes control plane
# (warren_testkit::ControlPlane, nextest group `control-plane`) run localcluster.
# The end-to-end scenarios need the local cluster: `make local-e2e` runs them (nextest's
# default profile leaves them out; .config/nextest.toml).
rust-test: local-go-build ## the Rust test suite but the cluster scenarios (needs RabbitMQ on 127.0.0.1:5672, rabbitmq-server installed, and Go to build localcluster)
	$(CARGO) build --bins --workspace
	LOCALCLUSTER_BIN=$(LOCAL_BIN) $(TEST_CMD)

crds: ## regenerate the QueueScaler CRD from the Rust types
	$(CARGO) run -q -p warren-crd --bin crdgen > manifests/crds.yaml
	cp manifests/crds.yaml charts/warren/crds/queuescaler.yaml

include mk/*.mk

BENCH_VENV ?= $(HOME)/.cache/warren-bench-venv

bench: bench-venv ## pipeline figures (sender vs raw lapin vs Flask+pika) and worker figures (warren-worker vs the seed's pika worker vs raw lapin)
	$(CARGO) build --release -p warren-sender -p warren-worker -p warren-bench
	@command -v wrk >/dev/null || { echo "installing wrk (Debian) for the HTTP load"; apt-get install -y -qq wrk >/dev/null; }
	$(CARGO_TARGET_DIR)/release/pipeline-bench \
	  --sender-bin $(CARGO_TARGET_DIR)/release/warren-sender \
	  --worker-bin $(CARGO_TARGET_DIR)/release/warren-worker \
	  --python $(BENCH_VENV)/bin/python --flask-script bench/flask_sender.py \
	  --wrk $$(command -v wrk) $(BENCH_ARGS)
	$(CARGO_TARGET_DIR)/release/worker-bench \
	  --worker-bin $(CARGO_TARGET_DIR)/release/warren-worker \
	  --python $(BENCH_VENV)/bin/python --pika-script bench/pika_worker.py $(WORKER_BENCH_ARGS)

bench-worker: bench-venv ## worker figures only: jobs/s at prefetch 1 vs the seed's pika worker and raw lapin, per-job overhead, concurrency
	$(CARGO) build --release -p warren-worker -p warren-bench --bin warren-worker --bin worker-bench
	$(CARGO_TARGET_DIR)/release/worker-bench \
	  --worker-bin $(CARGO_TARGET_DIR)/release/warren-worker \
	  --python $(BENCH_VENV)/bin/python --pika-script bench/pika_worker.py $(WORKER_BENCH_ARGS)

bench-venv: ## the Python venv with flask and pika for the baselines
	@test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	@$(BENCH_VENV)/bin/python -c 'import flask, pika' 2>/dev/null || $(BENCH_VENV)/bin/pip install -q -r bench/requirements.txt

bench-hostile: ## the sender under 3,000 stalled connections and 10x overload: p99 ratio, response mix, longest wait, RSS
	$(CARGO) build --release -p warren-sender -p warren-bench
	$(CARGO_TARGET_DIR)/release/hostile-bench --sender-bin $(CARGO_TARGET_DIR)/release/warren-sender $(BENCH_ARGS)

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := send_request envelope_decode
fuzz: ## fuzz request validation and envelope decoding, FUZZ_SECONDS per target (nightly toolchain; installs cargo-fuzz)
	@rustup run nightly rustc --version >/dev/null 2>&1 || { echo "make fuzz needs a nightly toolchain (rustup toolchain list): libFuzzer instrumentation is nightly-only"; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	@# Every target runs even when an earlier one crashes; make fails at the end, naming them.
	cd crates/warren-sender/fuzz && failed=""; for target in $(FUZZ_TARGETS); do \
	  mkdir -p $(CARGO_TARGET_DIR)/fuzz-corpus/$$target && \
	  CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)/fuzz $(CARGO) +nightly fuzz run $$target \
	    $(CARGO_TARGET_DIR)/fuzz-corpus/$$target corpus/$$target -- -max_total_time=$(FUZZ_SECONDS) \
	    || failed="$$failed $$target"; \
	done; \
	if [ -n "$$failed" ]; then echo "make fuzz: crash or error in:$$failed (inputs under crates/warren-sender/fuzz/artifacts/)"; exit 1; fi; \
	echo "make fuzz: no crash in $(FUZZ_TARGETS) ($(FUZZ_SECONDS) s each)"

bench-controller: local-go-build ## controller: broker and apiserver requests per tick, CPU, RSS, burst->scale with 1/100/1000 QueueScalers (a private control plane)
	$(CARGO) build --release -p warren-controller --bins --examples
	LOCALCLUSTER_BIN=$(LOCAL_BIN) $(CARGO_TARGET_DIR)/release/examples/tick_bench $(BENCH_ARGS)

bench-scaling: ## decisions per second of the pure scaling function
	$(CARGO) run --release -q -p warren-scaling --example decide_bench

e2e: local-go-build ## the warren-e2e tests that need no cluster: observability (real binaries, a private RabbitMQ and control plane, Prometheus), the events log (the scenarios: make local-scenarios)
	$(CARGO) build --bins -p warren-controller -p warren-worker -p warren-sender
	LOCALCLUSTER_BIN=$(LOCAL_BIN) $(CARGO) nextest run -p warren-e2e --no-fail-fast

dashboard-snapshot: ## draw the overview dashboard's main panels from a real Prometheus watching a short load (PNG for the README)
	$(CARGO) build --bins -p warren-controller -p warren-worker -p warren-sender -p warren-e2e
	$(CARGO_TARGET_DIR)/debug/dashboard-snapshot $(SNAPSHOT_ARGS)

# Parts 1-3 run on the cluster `make local-up` started (its pods run the debug binaries
# local-up built; the sender runs here); part 4 (1/100/1000 scalers) on private control planes.
e2e-bench: local-go-build ## on the cluster `make local-up` started: reaction latency, pod Ready, first ack, drain, scale-ins, controller RSS; then broker and apiserver requests per tick (1/100/1000 scalers on a private control plane)
	$(CARGO) build --release --bins -p warren-controller -p warren-worker -p warren-sender -p warren-e2e
	WARREN_E2E_CLUSTER=$(LOCAL_STATE) HELM=$(HELM) LOCALCLUSTER_BIN=$(LOCAL_BIN) $(CARGO_TARGET_DIR)/release/e2e-bench $(BENCH_ARGS)
