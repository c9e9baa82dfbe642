# A local Kubernetes cluster without Docker: the upstream control plane built from
# the Go modules (localcluster/) and a node agent that runs pods as local processes.
# Included by the top-level Makefile.
#   make local-up     build (Rust binaries + localcluster), start the cluster in the
#                     background, helm install the chart, wait until every workload is Ready
#   make local-down   stop the cluster and remove its state
#   make local-test   the README flow end to end with assertions, on the running cluster
#   make local-scenarios  the Rust end-to-end scenarios (crates/warren-e2e: tests/scenarios.rs,
#                     tests/pools.rs) on the running cluster: one namespace per test, one
#                     test at a time (nextest profile local-cluster)
#   make local-e2e    local-up + local-test + local-scenarios + local-down: what `make test`
#                     runs; fails if any step fails (the scenarios run even when local-test
#                     failed; local-down always runs)

LOCAL_STATE ?= $(CURDIR)/.local/cluster
LOCAL_KUBECONFIG := $(LOCAL_STATE)/admin.kubeconfig
LOCAL_BIN_DIR ?= $(HOME)/.cache/localcluster/bin
LOCAL_BIN := $(LOCAL_BIN_DIR)/localcluster
LOCAL_IMAGE_MAP ?= $(CURDIR)/localcluster/images.yaml
LOCAL_PID := $(LOCAL_STATE)/localcluster.pid
LOCAL_LOG := $(LOCAL_STATE)/logs/localcluster.log
LOCAL_HELM_TIMEOUT ?= 5m
# What `make local-e2e` adds to HELM_ARGS: the chart's own Prometheus, so the flow
# checks that it scrapes every component (step 9 of mk/local_e2e.py).
LOCAL_E2E_HELM_ARGS ?= --set metrics.prometheus.deploy=true
GO ?= go
export GOMODCACHE ?= $(HOME)/.cache/go-mod
export GOCACHE ?= $(HOME)/.cache/go-build
# The Kubernetes release localcluster is built from, read from its go.mod; stamped
# into the binary so `kubectl version` and Helm's kubeVersion see the real version.
K8S_VERSION := $(shell awk '$$1 == "k8s.io/kubernetes" { print $$2; exit }' localcluster/go.mod 2>/dev/null)
K8S_MINOR := $(word 2,$(subst ., ,$(K8S_VERSION)))
K8S_LDFLAGS := $(foreach p,k8s.io/component-base/version k8s.io/client-go/pkg/version,\
	-X $(p).gitVersion=$(K8S_VERSION) -X $(p).gitMajor=1 -X $(p).gitMinor=$(K8S_MINOR) \
	-X $(p).gitTreeState=clean -X $(p).buildDate=1970-01-01T00:00:00Z)

LOCAL_ENV = KUBECONFIG=$(LOCAL_KUBECONFIG) LOCAL_STATE=$(LOCAL_STATE) LOCAL_BIN=$(LOCAL_BIN) \
	LOCAL_PID=$(LOCAL_PID) LOCAL_LOG=$(LOCAL_LOG) LOCAL_IMAGE_MAP=$(LOCAL_IMAGE_MAP) \
	WARREN_BIN_DIR=$(CARGO_TARGET_DIR)/debug HELM=$(HELM) KUBECTL=$(KUBECTL) \
	RELEASE=$(RELEASE) NAMESPACE=$(NAMESPACE) CHART_DIR=$(CHART_DIR) LOCAL_HELM_TIMEOUT=$(LOCAL_HELM_TIMEOUT)

# A nextest filter narrowing what `make local-scenarios` runs (empty: every test of the
# nextest profile local-cluster, i.e. tests/scenarios.rs and tests/pools.rs), e.g.
# LOCAL_SCENARIOS="-E 'test(drained_queue)'".
LOCAL_SCENARIOS ?=

.PHONY: local-build local-go-build local-go-test local-up local-down local-test local-scenarios local-e2e-bench local-e2e

local-go-build: ## build the localcluster binary (kube-apiserver, controller-manager, scheduler, etcd, node agent)
	@command -v $(GO) >/dev/null || { echo "local-go-build needs Go >= 1.26 on PATH" >&2; exit 1; }
	@mkdir -p $(LOCAL_BIN_DIR)
	@echo "== go build localcluster (Kubernetes $(K8S_VERSION); caches in $(GOCACHE))"
	@start=$$(date +%s); cd localcluster && \
	  $(GO) build -v -ldflags '$(K8S_LDFLAGS)' -o $(LOCAL_BIN) ./cmd/localcluster 2>&1 \
	  | awk '/^(#|[a-z].*\.go:)/ { print; next } { n++; if (n % 200 == 0) printf "   ... %d packages compiled\n", n; fflush() }'; \
	  rc=$${PIPESTATUS[0]}; [ $$rc = 0 ] || exit $$rc; \
	  $(GO) build -o $(LOCAL_BIN_DIR)/localcluster-container-init ./cmd/localcluster-container-init && \
	  echo "== localcluster built in $$(( $$(date +%s) - start ))s: $(LOCAL_BIN) (and its container init beside it)"

local-go-test: ## gofmt, go vet and the Go unit tests of localcluster
	@cd localcluster && out=$$(gofmt -l .) && [ -z "$$out" ] || { echo "gofmt needed: $$out" >&2; exit 1; }
	cd localcluster && $(GO) vet ./... && $(GO) test ./...

local-build: local-go-build ## build warren's binaries and localcluster
	$(CARGO) build --bins -p warren-sender -p warren-worker -p warren-controller -p warren-admin

local-up: local-build ## start a local cluster (no Docker), install the chart, wait until Ready
	@$(LOCAL_ENV) bash mk/local-cluster.sh up

local-down: ## stop the local cluster and delete its state
	@$(LOCAL_ENV) bash mk/local-cluster.sh down

local-test: ## the README flow, asserted end to end, on the cluster `make local-up` started
	@$(LOCAL_ENV) bash mk/local-cluster.sh test

# WARREN_E2E_CLUSTER points every Harness of crates/warren-e2e at this cluster (the chart's
# controller and worker Deployments in a namespace per test, the real ReplicaSet controller);
# without it, or with a cluster that does not answer, the tests fail: they never skip.
# The sender runs on this machine: local-build (make local-up) built it.
local-scenarios: ## the end-to-end scenarios of crates/warren-e2e on the cluster `make local-up` started, one at a time
	WARREN_E2E_CLUSTER=$(LOCAL_STATE) HELM=$(HELM) $(CARGO) nextest run -p warren-e2e --profile local-cluster --no-fail-fast $(LOCAL_SCENARIOS)

# The old name of `make e2e-bench`, which now runs on this cluster itself (BENCH_ARGS, e.g.
# --trials 10 --scale-ins 50); a benchmark, not part of make test.
local-e2e-bench: e2e-bench ## the same as make e2e-bench (on the cluster `make local-up` started)

local-e2e: ## local-up, local-test, local-scenarios, local-down (part of `make test`; refuses to run beside a cluster left up)
	@$(LOCAL_ENV) bash mk/local-cluster.sh fresh
	@rc=0; start=$$(date +%s); \
	  if $(SUBMAKE) local-up HELM_ARGS="$(LOCAL_E2E_HELM_ARGS) $(HELM_ARGS)"; then \
	    $(SUBMAKE) local-test || rc=$$?; \
	    echo "== local-e2e: cluster up and README flow after $$(( $$(date +%s) - start ))s (rc $$rc)"; \
	    $(SUBMAKE) local-scenarios || rc=$$?; \
	    echo "== local-e2e: scenarios done after $$(( $$(date +%s) - start ))s (rc $$rc)"; \
	  else rc=$$?; fi; \
	  $(LOCAL_ENV) bash mk/local-cluster.sh down; exit $$rc
