# Every target installs what it needs; nothing here depends on a hand-made install.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(CURDIR)/.cache
export PATH := $(CACHE)/bin:$(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup test unit lint bench bench-trainer bench-soak crds crds-apply tools node-deps images cluster-up cluster-down

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with the operator, trainer and test dependencies (idempotent)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,trackers,dev]'
	touch $@

test: setup tools images ## run the whole test suite (unit, contract, e2e on the local cluster and its real nodes, trainer on CPU)
	$(PY) -m pytest

unit: setup ## the pure tests in seconds: API, estimator, planner, rendering, lifecycle (no Go tools, no cluster)
	$(PY) -m pytest tests/unit tests/contract

lint: setup ## ruff, mypy, the import-layer contracts (layers, operator never imports the trainer), hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile.trainer Dockerfile.operator

crds: setup ## regenerate crds/ from the pydantic API models
	$(PY) -m finetune_operator.api.crd --write

crds-apply: tools ## apply crds/ to the cluster of $KUBECONFIG (Helm never upgrades a chart's CRDs)
	kubectl apply --server-side --force-conflicts -f crds/

bench: setup ## run the benchmarks and write bench/results/
	$(PY) bench/estimator.py --write bench/results/estimator.json --markdown bench/results/estimator-calibration.md

bench-operator: setup tools ## ours vs the Kubeflow Training Operator (built from its Go module) at N=50, 200, 1000 jobs (~20 min)
	tools/build.sh $(CACHE)/bin kubeflow
	$(PY) bench/operator_scale.py --jobs $(or $(JOBS),50 200 1000) --write bench/results/operator-scale.json

bench-soak: setup tools ## our operator through 3,000 job create/delete cycles: its RSS slope (~8 min)
	$(PY) bench/operator_soak.py --cycles $(or $(CYCLES),3000) --write bench/results/operator-soak.json

GPU_NAME ?= gpu
bench-trainer: setup ## on a GPU: each method's measured peak memory and tokens/s vs the estimate
	$(PY) bench/trainer_methods.py --write bench/results/trainer-methods-$(GPU_NAME).json

# --- operator -------------------------------------------------------------------------------------
.PHONY: run-operator demo
# The admission webhook on 127.0.0.1:9443, registered with the local API server (self-signed).
OPERATOR_ARGS ?= --standalone --webhook-port 9443

run-operator: setup ## run the operator against $(CLUSTER_KUBECONFIG) (make cluster-up first); OPERATOR_ARGS=...
	$(PY) -m finetune_operator --kubeconfig $(CLUSTER_KUBECONFIG) $(OPERATOR_ARGS)

demo: cluster-up ## the whole loop on the local cluster: the chart's operator pod, a LoRA job trained by real pods
	KUBECONFIG=$(CLUSTER_KUBECONFIG) CACHE=$(CACHE) PY=$(PY) tools/demo/demo.sh

# --- local cluster (tools/): Go tools pinned by tools/*/go.mod, built into $(CACHE)/bin -------------
TOOL_GROUPS := k8s etcd kwok helm prometheus coredns kueue coscheduling

# build.sh rebuilds a group only when its go.mod/go.sum (hash stamp) changed or a binary is missing.
tools: ## build kube-*, kubelet, kube-proxy, kubectl, etcd, kwok(ctl), helm, promtool, coredns, kueue, scheduler-plugins into $(CACHE)/bin
	tools/build.sh $(CACHE)/bin $(TOOL_GROUPS)

node-deps: ## install the host packages real nodes and image builds need (containerd, runc, CNI, buildah, ...)
	tools/cluster/install-node-deps.sh

# Rebuilt only when their inputs change (a label on each image in buildah's storage, shared by every checkout).
# Not after `tools`: the images need the Kubernetes module's source (pause.c), not the built binaries, so
# `make -j2 tools images` builds the Go tools (CPU) while the images download and unpack (network, disk).
images: node-deps ## build the trainer and operator images with buildah from a debootstrap Debian base
	CACHE=$(CACHE) tools/images/build.sh

CLUSTER_NAME ?= finetune
NODES ?= tools/cluster/nodes.yaml
CLUSTER_KUBECONFIG ?= $(CACHE)/kube/kubeconfig
REAL_NODES ?= 2
REAL_GPUS ?= 2

cluster-up: tools setup images ## the local cluster: fake GPU nodes (NODES=file) and REAL_NODES real ones; prints its KUBECONFIG
	$(PY) tools/cluster/cluster.py up --name $(CLUSTER_NAME) --nodes $(NODES) --kubeconfig $(CLUSTER_KUBECONFIG) \
	  --real-nodes $(REAL_NODES) --real-gpus $(REAL_GPUS)

cluster-down: setup ## stop the local cluster and every process it started
	$(PY) tools/cluster/cluster.py down --name $(CLUSTER_NAME) --kubeconfig $(CLUSTER_KUBECONFIG)
