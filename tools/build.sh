#!/usr/bin/env bash
# Build the pinned Go tools into a bin directory (default: .cache/bin).
#
#   tools/build.sh [BIN_DIR] [GROUP...]
#
# Each GROUP is a directory under tools/ with its own go.mod/go.sum (tool directives name the
# main packages; a group may hold its own small main.go, as coredns does, to pick plugins). A group
# is rebuilt only when its go.mod, go.sum, *.go or this script changed since the
# last build (a stamp file in BIN_DIR records the hash) or one of its binaries is missing; Go's
# own build cache (GOCACHE, the user default) makes a rebuild after a version bump incremental.
# Nothing is downloaded at run time except Go modules through the module proxy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin_dir="$(mkdir -p "${1:-$here/../.cache/bin}" && cd "${1:-$here/../.cache/bin}" && pwd)"
shift || true
groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=(k8s etcd kwok helm prometheus coredns kueue coscheduling)

go_bin="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
export CGO_ENABLED=0 GOFLAGS=-mod=readonly

# Version stamps, as hack/lib/version.sh sets them for a release build.
k8s_version() { sed -n 's/^require k8s.io\/kubernetes \(v[0-9.]*\).*$/\1/p' "$here/k8s/go.mod"; }
k8s_ldflags() {
  local v major minor flags="" pkg
  v="$(k8s_version)"; major="${v#v}"; major="${major%%.*}"; minor="$(echo "$v" | cut -d. -f2)"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}
mod_version() { sed -n "s#^\t$1 \(v[^ ]*\).*#\1#p; s#^require $1 \(v[^ ]*\).*#\1#p" "$here/$2/go.mod" | head -1; }

# The binary a tool package builds: its last path element, except where that is a major version.
tool_bin() {
  case "$1" in
    go.etcd.io/etcd/server/v3) echo etcd ;;
    sigs.k8s.io/scheduler-plugins/cmd/scheduler) echo scheduler-plugins ;;  # not `scheduler`: beside kube-scheduler
    *) basename "$1" ;;
  esac
}
tool_pkgs() { sed -n 's/^tool \([^(].*\)$/\1/p; /^tool (/,/^)/{s/^\t\([^ ]*\)$/\1/p}' "$here/$1/go.mod"; }

build_group() {
  local group="$1" ldflags="-s -w" tags="" pkgs
  pkgs=$(tool_pkgs "$group")
  case "$group" in
    k8s) ldflags+="$(k8s_ldflags)"; tags="notest,grpcnotrace,providerless" ;;
    kwok) # kwokctl's default --kube-version: the control plane we build, not the one it was released with.
      local kv; kv="$(k8s_version)"; ldflags+=" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${kv#v}" ;;
    helm) local v kv; v="$(mod_version helm.sh/helm/v3 helm)"
      ldflags+=" -X helm.sh/helm/v3/internal/version.version=${v}"
      # The Kubernetes version `helm template` and `helm lint` assume, as helm's own Makefile sets it from
      # its client-go: without it they assume 1.20, which a chart's kubeVersion (>=1.29) refuses.
      kv="$(mod_version k8s.io/client-go helm)"; kv="${kv#v0.}"; kv="${kv%%.*}"
      for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${kv}"
      done ;;
    kueue) ldflags+=" -X sigs.k8s.io/kueue/pkg/version.GitVersion=$(mod_version sigs.k8s.io/kueue kueue)" ;;
    coscheduling)  # the Kubernetes it is built from (the replace block), not its own v0.34.x as its Makefile
      # stamps it: component-base reads the binary's version as Kubernetes' and refuses to start when its
      # emulation version (0.34) falls below the minimum compatibility version (1.31).
      local kv; kv="$(sed -n 's#^\tk8s.io/kubernetes => k8s.io/kubernetes \(v[^ ]*\)$#\1#p' "$here/coscheduling/go.mod")"
      ldflags+=" -X k8s.io/component-base/version.gitVersion=${kv}" ;;
    prometheus) local v; v="$(mod_version github.com/prometheus/prometheus prometheus)"
      ldflags+=" -X github.com/prometheus/common/version.Version=${v}"; tags="remove_all_sd,enable_kubernetes_sd" ;;
  esac
  echo "building $group: $(echo $pkgs | tr '\n' ' ')" >&2
  if [[ $(echo $pkgs | wc -w) == 1 ]]; then  # one package: name the binary explicitly (etcd)
    (cd "$here/$group" && "$go_bin" build -trimpath ${tags:+-tags "$tags"} -ldflags "$ldflags" -o "$bin_dir/$(tool_bin $pkgs)" $pkgs)
  else
    (cd "$here/$group" && "$go_bin" build -trimpath ${tags:+-tags "$tags"} -ldflags "$ldflags" -o "$bin_dir/" $pkgs)
  fi
  copy_config "$group"
}

# The manifests a controller needs beside its binary, from the same module version: <group>-config/.
config_marker() {
  case "$1" in
    kueue) echo "$bin_dir/kueue-config/crd/kustomization.yaml" ;;
    coscheduling) echo "$bin_dir/coscheduling-config/crd.yaml" ;;
  esac
}
copy_config() {
  local group="$1" src out="$bin_dir/$1-config"
  case "$group" in
    kueue)  # its CRDs, their conversion patches and the webhook configurations
      src="$(cd "$here/kueue" && "$go_bin" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
      rm -rf "$out" && mkdir -p "$out/crd"
      cp "$src"/config/components/crd/bases/*.yaml "$src/config/components/webhook/manifests.yaml" "$out/"
      cp -r "$src"/config/components/crd/{kustomization.yaml,patches} "$out/crd/" ;;
    coscheduling)  # the PodGroup CRD
      src="$(cd "$here/coscheduling" && "$go_bin" list -m -f '{{.Dir}}' sigs.k8s.io/scheduler-plugins)"
      rm -rf "$out" && mkdir -p "$out"
      cp "$src/manifests/coscheduling/crd.yaml" "$out/" ;;
    *) return 0 ;;
  esac
  chmod -R u+w "$out"
}

for group in "${groups[@]}"; do
  stamp="$bin_dir/.stamp-$group"
  sources=("$here/$group/go.mod" "$here/$group/go.sum")
  for f in "$here/$group/"*.go; do [[ -e "$f" ]] && sources+=("$f"); done
  want="$(cat "${sources[@]}" "$here/build.sh" | sha256sum | cut -d' ' -f1)"
  fresh=1
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] || fresh=0
  for pkg in $(tool_pkgs "$group"); do
    [[ -x "$bin_dir/$(tool_bin "$pkg")" ]] || fresh=0
  done
  marker="$(config_marker "$group")"
  [[ -z $marker || -f $marker ]] || fresh=0
  if [[ $fresh == 1 ]]; then touch "$stamp"; echo "$group: up to date" >&2; continue; fi
  start=$(date +%s)
  build_group "$group"
  echo "$want" > "$stamp"
  echo "$group: built in $(( $(date +%s) - start ))s" >&2
done
