# KEDA and warren side by side on the local cluster (issue 10). Included by the top-level Makefile.
#   make keda-build     build KEDA's operator and metrics apiserver from its Go module (compare/keda)
#   make compare-keda   for each mode of COMPARE_MODES: a fresh local cluster, the chart, KEDA; the
#                       same workloads under a KEDA ScaledObject and under a QueueScaler; then one
#                       table for every mode in COMPARE_OUT (mk/compare_keda.py; a mode run earlier,
#                       e.g. COMPARE_MODES=1s after COMPARE_MODES=defaults, stays in the table with its
#                       date). A benchmark: not part of `make test`.
#   make compare-keda-repeat A=<mode>.json B=<mode>.json   two runs of one mode side by side:
#                       each row of both, B/A, `!` outside +-20 %; then each rep against its run's median
# The local cluster is one per machine: on a shared machine wrap it in the cluster lock, e.g.
#   flock /work/agents/cluster.lock make compare-keda

KEDA_MODULE := github.com/kedacore/keda/v2
KEDA_VERSION := $(shell awk '$$1 == "require" && $$2 == "$(KEDA_MODULE)" { print $$3; exit }' compare/keda/go.mod 2>/dev/null)
KEDA_BIN_DIR ?= $(HOME)/.cache/keda/bin
# defaults: KEDA's and warren's default polling (KEDA 30 s + the HPA controller's 15 s sync; warren 5 s).
# 1s: both at 1 s (ScaledObject pollingInterval 1, kube-controller-manager HPA sync 1 s, QueueScaler 1 s).
COMPARE_MODES ?= defaults 1s
COMPARE_OUT ?= $(CURDIR)/.local/compare-keda
COMPARE_ENV = $(LOCAL_ENV) KEDA_BIN_DIR=$(KEDA_BIN_DIR) KEDA_VERSION=$(KEDA_VERSION) COMPARE_OUT=$(COMPARE_OUT) \
	HELM_ARGS='-f compare/keda/chart-values.yaml'

.PHONY: keda-build compare-keda compare-keda-repeat

keda-build: ## build KEDA (the version compare/keda/go.mod pins: operator, metrics apiserver) from its Go module into KEDA_BIN_DIR
	@command -v $(GO) >/dev/null || { echo "keda-build needs Go >= 1.26 on PATH" >&2; exit 1; }
	@mkdir -p $(KEDA_BIN_DIR)
	@echo "== go build KEDA $(KEDA_VERSION) (operator, adapter) into $(KEDA_BIN_DIR)"
	@start=$$(date +%s); cd compare/keda && \
	  $(GO) build -ldflags '-X $(KEDA_MODULE)/version.Version=$(KEDA_VERSION:v%=%)' -o $(KEDA_BIN_DIR)/ \
	    $(KEDA_MODULE)/cmd/operator $(KEDA_MODULE)/cmd/adapter && \
	  echo "== KEDA built in $$(( $$(date +%s) - start ))s"

compare-keda: local-build keda-build ## KEDA vs QueueScaler on the local cluster: bursts, scale-in, request counts; prints one table
	@mkdir -p $(COMPARE_OUT) && rm -f $(foreach m,$(COMPARE_MODES),$(COMPARE_OUT)/$(m).json)
	@rc=0; for mode in $(COMPARE_MODES); do \
	  case $$mode in defaults) hpa=15s ;; 1s) hpa=1s ;; *) echo "unknown mode $$mode" >&2; exit 2 ;; esac; \
	  $(COMPARE_ENV) bash mk/local-cluster.sh down >/dev/null; \
	  if $(COMPARE_ENV) LOCALCLUSTER_HPA_SYNC_PERIOD=$$hpa bash mk/local-cluster.sh up; then \
	    $(COMPARE_ENV) COMPARE_MODE=$$mode HPA_SYNC_SECONDS=$${hpa%s} python3 mk/compare_keda.py run || rc=$$?; \
	  else rc=1; fi; \
	  $(COMPARE_ENV) bash mk/local-cluster.sh down; \
	  [ $$rc = 0 ] || exit $$rc; \
	done; $(COMPARE_ENV) python3 mk/compare_keda.py table

compare-keda-repeat: ## two results of one mode (A=, B= JSON files of make compare-keda) side by side: B/A per row, ! outside +-20 %
	@[ -n "$(A)" ] && [ -n "$(B)" ] || { echo "usage: make compare-keda-repeat A=run-a/defaults.json B=run-b/defaults.json" >&2; exit 2; }
	@$(COMPARE_ENV) python3 mk/compare_keda.py compare $(A) $(B)
