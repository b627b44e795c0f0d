# Every target installs what it needs; nothing here depends on a hand-made install.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(CURDIR)/.cache
export PATH := $(CACHE)/bin:$(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup test unit lint bench bench-trainer crds tools cluster-up cluster-down

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with the operator, trainer and test dependencies (idempotent)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,dev]'
	touch $@

test: setup tools ## run the whole test suite (unit, contract, e2e on the local control plane, trainer on CPU)
	$(PY) -m pytest

unit: setup ## the pure tests in seconds: API, estimator, planner, rendering, lifecycle (no Go tools, no cluster)
	$(PY) -m pytest tests/unit tests/contract

lint: setup ## ruff, mypy and the import-layer contracts (layers, operator never imports the trainer)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

crds: setup ## regenerate crds/ from the pydantic API models
	$(PY) -m finetune_operator.api.crd --write

bench: setup ## run the benchmarks and write bench/results/
	$(PY) bench/estimator.py --write bench/results/estimator.json --markdown bench/results/estimator-calibration.md

GPU_NAME ?= gpu
bench-trainer: setup ## on a GPU: each method's measured peak memory and tokens/s vs the estimate
	$(PY) bench/trainer_methods.py --write bench/results/trainer-methods-$(GPU_NAME).json

# --- operator -------------------------------------------------------------------------------------
.PHONY: run-operator demo
# The admission webhook on 127.0.0.1:9443, registered with the local API server (self-signed).
OPERATOR_ARGS ?= --standalone --webhook-port 9443

run-operator: setup ## run the operator against $(CLUSTER_KUBECONFIG) (make cluster-up first); OPERATOR_ARGS=...
	$(PY) -m finetune_operator --kubeconfig $(CLUSTER_KUBECONFIG) $(OPERATOR_ARGS)

demo: cluster-up ## the README example end to end on the local cluster: plan, run, finish, Succeeded
	@set -m; KUBECONFIG=$(CLUSTER_KUBECONFIG); export KUBECONFIG; \
	FINETUNE_TIMING_RESYNC_SECONDS=1 $(PY) -m finetune_operator --standalone --metrics-port 0 --health-port 0 --webhook-port 9443 \
	  > $(CACHE)/demo-operator.log 2>&1 & op=$$!; trap 'kill $$op' EXIT; \
	kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null; \
	kubectl -n demo create serviceaccount finetune-trainer --dry-run=client -o yaml | kubectl apply -f - >/dev/null; \
	for c in datasets models; do \
	  printf '%s\n' "apiVersion: v1" "kind: PersistentVolume" "metadata: {name: demo-$$c}" \
	    "spec: {capacity: {storage: 1Gi}, accessModes: [ReadWriteMany], storageClassName: demo, hostPath: {path: /tmp/demo-$$c}, claimRef: {namespace: demo, name: $$c}}" \
	    "---" "apiVersion: v1" "kind: PersistentVolumeClaim" "metadata: {name: $$c, namespace: demo}" \
	    "spec: {accessModes: [ReadWriteMany], storageClassName: demo, volumeName: demo-$$c, resources: {requests: {storage: 1Gi}}}" \
	  | kubectl apply -f - >/dev/null; done; \
	until kubectl get validatingwebhookconfiguration finetune-operator.finetune.dev \
	  -o jsonpath='{.webhooks[*].name}' 2>/dev/null | grep -q plan; do sleep 0.2; done; \
	echo "--- a job that cannot fit is refused at apply, with the plan (the operator's admission webhook) ---"; \
	sed -e 's/name: llama2-7b-alpaca-lora}/name: too-big}/' -e 's/microBatchSize: 4/microBatchSize: 64/' \
	  -e 's/gradientCheckpointing: true/gradientCheckpointing: false/' \
	  -e 's/gpuType: A100-80GB, gpusPerNode: 8, gpus: auto/gpuType: L4, gpusPerNode: 1, gpus: 1/' \
	  examples/llama2-7b-alpaca-lora.yaml | kubectl -n demo apply -f - 2>&1 | fold -s -w 110 || true; \
	echo "--- the README example is admitted, planned and run ---"; \
	kubectl -n demo apply -f examples/llama2-7b-alpaca-lora.yaml; \
	kubectl -n demo wait --for=jsonpath='{.status.phase}'=Running ftj/llama2-7b-alpaca-lora --timeout=120s; \
	kubectl -n demo get ftj,pods -o wide; \
	echo "--- rank 0 reports progress (what the trainer patches onto its pod; KWOK runs no trainer) ---"; \
	kubectl -n demo annotate pod llama2-7b-alpaca-lora-worker-0 --overwrite finetune.dev/progress='{"state":"training","step":120,"totalSteps":1000,"epoch":0.36,"loss":1.234,"learningRate":0.0002,"tokensPerSecond":5000,"elapsedSeconds":600,"stepsThisAttempt":120}' >/dev/null; \
	kubectl -n demo wait --for=jsonpath='{.status.progress.step}'=120 ftj/llama2-7b-alpaca-lora --timeout=60s >/dev/null; \
	kubectl -n demo get ftj; \
	echo "--- the worker finishes (KWOK: exit code 0) ---"; \
	kubectl -n demo annotate pod llama2-7b-alpaca-lora-worker-0 kwok.finetune.dev/exit-code=0 >/dev/null; \
	kubectl -n demo wait --for=condition=Succeeded ftj/llama2-7b-alpaca-lora --timeout=120s; \
	kubectl -n demo get ftj; kubectl -n demo get events --field-selector involvedObject.kind=FineTuneJob; \
	kubectl delete namespace demo --wait=false >/dev/null; kubectl delete pv demo-datasets demo-models --wait=false >/dev/null

# --- local cluster (tools/): Go tools pinned by tools/*/go.mod, built into $(CACHE)/bin -------------
TOOL_GROUPS := k8s etcd kwok helm prometheus

# build.sh rebuilds a group only when its go.mod/go.sum (hash stamp) changed or a binary is missing.
tools: ## build kube-*, kubectl, etcd, kwok(ctl), helm, promtool into $(CACHE)/bin
	tools/build.sh $(CACHE)/bin $(TOOL_GROUPS)

CLUSTER_NAME ?= finetune
NODES ?= tools/cluster/nodes.yaml
CLUSTER_KUBECONFIG ?= $(CACHE)/kube/kubeconfig

cluster-up: tools setup ## start the local cluster with fake GPU nodes (NODES=file); prints its KUBECONFIG
	$(PY) tools/cluster/cluster.py up --name $(CLUSTER_NAME) --nodes $(NODES) --kubeconfig $(CLUSTER_KUBECONFIG)

cluster-down: setup ## stop the local cluster and every process it started
	$(PY) tools/cluster/cluster.py down --name $(CLUSTER_NAME) --kubeconfig $(CLUSTER_KUBECONFIG)
