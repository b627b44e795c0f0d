#!/usr/bin/env bash
# `make demo`: the whole loop on the local cluster's real nodes (make cluster-up has run).
#   1. the chart installs the operator image as a real pod (with its admission webhook);
#   2. a tiny model and data set go onto two volumes;
#   3. a job that cannot fit is refused at apply, with the plan;
#   4. examples/demo.yaml (LoRA, two workers) trains in real pods: `kubectl get ftj -w` shows the phase,
#      progress, loss and ETA the trainer reports, to Succeeded;
#   5. the adapter's path, and a line generated with it.
set -euo pipefail
: "${KUBECONFIG:?}" "${CACHE:?}" "${PY:?}"
ns=demo
release=finetune
data="$CACHE/demo"
step() { printf '\n--- %s ---\n' "$*"; }

step "the operator, installed by its chart from the image built here (make images)"
kubectl delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
helm upgrade --install "$release" charts/finetune-operator -n finetune-system --create-namespace --wait \
  --timeout 180s --set image.repository=localhost/finetune/operator --set image.tag=dev \
  --set image.pullPolicy=Never --set trainerImage=localhost/finetune/trainer:dev --set replicaCount=1 \
  --set settings.resyncSeconds=2 >/dev/null
kubectl -n finetune-system get pods -o wide

step "a tiny model and data set on two volumes (tools/demo/assets.py)"
rm -rf "$data" && mkdir -p "$data"
"$PY" tools/demo/assets.py "$data"
kubectl create namespace "$ns" >/dev/null
for c in datasets models; do
  kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: $ns-$c}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteMany]
  storageClassName: demo
  hostPath: {path: $data/$c}
  claimRef: {namespace: $ns, name: $c}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $c, namespace: $ns}
spec: {accessModes: [ReadWriteMany], storageClassName: demo, volumeName: $ns-$c, resources: {requests: {storage: 1Gi}}}
YAML
done

step "a job that cannot fit is refused at apply, with the plan (the operator's admission webhook)"
sed -e 's/name: llama2-7b-alpaca-lora}/name: too-big}/' -e 's/microBatchSize: 4/microBatchSize: 64/' \
  -e 's/gradientCheckpointing: true/gradientCheckpointing: false/' \
  -e 's/gpuType: A100-80GB, gpusPerNode: 8, gpus: auto/gpuType: L4, gpusPerNode: 1, gpus: 1/' \
  examples/llama2-7b-alpaca-lora.yaml | kubectl -n "$ns" apply -f - 2>&1 | fold -s -w 110 || true

step "examples/demo.yaml: planned, then trained by two real worker pods"
ftctl plan -f examples/demo.yaml | head -3
kubectl -n "$ns" apply -f examples/demo.yaml
kubectl -n "$ns" get ftj -w & watch=$!
trap 'kill $watch 2>/dev/null || true' EXIT
kubectl -n "$ns" wait --for=jsonpath='{.status.phase}'=Running ftj/demo --timeout=180s >/dev/null
kubectl -n "$ns" wait --for=condition=Succeeded ftj/demo --timeout=600s >/dev/null \
  || { kubectl -n "$ns" describe ftj demo; kubectl -n "$ns" logs -l finetune.dev/job=demo --tail=30; exit 1; }
sleep 1; kill $watch 2>/dev/null || true

step "where the pods ran, and what the trainer said"
kubectl -n "$ns" get pods -o wide
kubectl -n "$ns" logs demo-worker-0 | grep -E "finetune_trainer|train_samples_per_second" | cut -c1-160 || true
kubectl -n "$ns" get events --field-selector involvedObject.kind=FineTuneJob

step "the adapter, and a line generated with it"
out="$data/models/demo-lora"
ls -l "$out"
printf 'prompt "the quick brown" -> '
"$PY" tools/demo/assets.py "$out" --generate "$data/models/tiny-llama" "the quick brown" 2>/dev/null
