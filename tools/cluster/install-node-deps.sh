#!/usr/bin/env bash
# Install the Debian packages that real nodes and image builds need, when missing (root; idempotent):
# containerd and runc (the nodes' runtime), the CNI plugins (pod networking), iptables (kube-proxy),
# socat (the nodes' route to the API server), buildah and debootstrap (`make images`), util-linux (nsenter).
# Everything else real nodes run (kubelet, kube-proxy, CoreDNS) is built from Go modules by `make tools`.
set -euo pipefail

declare -A need=(
  [containerd]=containerd [runc]=runc [iptables]=iptables [socat]=socat [buildah]=buildah
  [debootstrap]=debootstrap [nsenter]=util-linux [ctr]=containerd
)
missing=()
for tool in "${!need[@]}"; do command -v "$tool" >/dev/null || missing+=("${need[$tool]}"); done
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
if [[ ${#missing[@]} == 0 ]]; then exit 0; fi
readarray -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [[ $(id -u) != 0 ]]; then
  echo "real nodes need root and these packages: ${missing[*]}" >&2; exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
