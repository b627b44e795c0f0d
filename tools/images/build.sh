#!/usr/bin/env bash
# Build the project's images with buildah, with nothing pulled from an image registry:
#
#   tools/images/build.sh [IMAGE...]      IMAGE: base python pause trainer operator (default: all)
#
#   base      Debian (SUITE, default bookworm) made by debootstrap from the machine's configured apt
#             mirror, with the host's CA bundle (pip inside builds reaches PyPI through the same proxy)
#   python    base + python3.11 and venv: the local BASE_IMAGE of Dockerfile.operator
#   pause     the pod sandbox image, pause.c from the pinned k8s.io/kubernetes module, gcc -static
#   trainer   Dockerfile.trainer with BASE_IMAGE=base  (production builds keep the CUDA base)
#   operator  Dockerfile.operator with BASE_IMAGE=python
#
# An image is rebuilt only when its inputs changed: the hash of its input files, its base image's ID and
# RECIPE is a label on the image (dev.finetune.inputs), so buildah's storage, which every checkout on the
# machine shares, is the cache: a clean clone's CI run rebuilds nothing that another checkout built.
# Each build writes $CACHE/images/NAME.json: {image, id, seconds, size}.
# The node's containerd gets the images when the local cluster starts (tools/cluster/realnode.py).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${CACHE:-$repo/.cache}"
out="$cache/images"
suite="${SUITE:-bookworm}"
# The mirror the machine's own apt uses (deb822 or one-line sources), unless MIRROR says otherwise.
mirror="${MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(http[^ ]*\) .*/\1/p' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
host_ca="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
k8s_mod="$(cd "$repo/tools/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
mkdir -p "$out"

# The references the cluster loads; keep in step with tools/cluster/realnode.py and the chart values
# the e2e tests and `make demo` set.
# Bump when how an image is made changes in a way its input files do not show.
RECIPE=1
LABEL=dev.finetune.inputs

declare -A ref=(
  [base]="localhost/finetune/debian:$suite"
  [python]="localhost/finetune/python:3.11"
  [pause]="localhost/finetune/pause:local"
  [trainer]="localhost/finetune/trainer:dev"
  [operator]="localhost/finetune/operator:dev"
)

image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null || true; }
inputs_label() { buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null || true; }

# hash of files (paths relative to the repo; directories walked, caches skipped) and extra words
inputs_hash() {
  local files=() extra=()
  for a in "$@"; do if [[ -e "$repo/$a" ]]; then files+=("$a"); else extra+=("$a"); fi; done
  { [[ ${#files[@]} == 0 ]] || (cd "$repo" && find "${files[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | sort -z | xargs -0 sha256sum); printf '%s\n' "${extra[@]+"${extra[@]}"}" "$RECIPE"; } \
    | sha256sum | cut -d' ' -f1
}

# build NAME HASH CMD...: run CMD (with WANT=HASH, the label it must set) unless the image has that label
build() {
  local name="$1" want="$2"; shift 2
  if [[ "$(inputs_label "${ref[$name]}")" == "$want" ]]; then
    echo "$name: up to date (${ref[$name]})" >&2; return
  fi
  echo "$name: building ${ref[$name]}" >&2
  local start old; start=$(date +%s); old="$(image_id "${ref[$name]}")"
  WANT="$want" "$@"
  # The image this one replaces: gigabytes for the trainer; its cached intermediate layers stay.
  if [[ -n "$old" && "$old" != "$(image_id "${ref[$name]}")" ]]; then buildah rmi "$old" >/dev/null 2>&1 || true; fi
  local secs=$(( $(date +%s) - start )) id bytes
  id="$(image_id "${ref[$name]}")"
  bytes="$(buildah images --format '{{.ID}} {{.Size}}' --noheading "${ref[$name]}" | head -1 | cut -d' ' -f2-)"
  printf '{"image": "%s", "id": "%s", "seconds": %d, "size": "%s"}\n' "${ref[$name]}" "$id" "$secs" "$bytes" \
    > "$out/$name.json"
  echo "$name: built in ${secs}s ($bytes)" >&2
}

build_base() {
  local rootfs="$out/rootfs-$suite" c
  rm -rf "$rootfs"
  debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" > "$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  cp "$host_ca" "$rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$rootfs" / >/dev/null
  # pip, requests and curl inside builds trust what the host trusts (a proxy's CA among them).
  local ca=/usr/local/share/ca-certificates/host-ca-bundle.crt
  buildah config --env PIP_CERT=$ca --env SSL_CERT_FILE=$ca --env REQUESTS_CA_BUNDLE=$ca \
    --env DEBIAN_FRONTEND=noninteractive --cmd /bin/bash --label "$LABEL=$WANT" "$c"
  buildah commit --quiet --rm "$c" "${ref[base]}" >/dev/null
  rm -rf "$rootfs"
}

build_python() {
  local c; c=$(buildah from "${ref[base]}")
  buildah run "$c" -- sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      python3.11 python3.11-venv >/dev/null && rm -rf /var/lib/apt/lists/* \
      && ln -s /usr/bin/python3.11 /usr/local/bin/python'
  buildah config --label "$LABEL=$WANT" "$c"
  buildah commit --quiet --rm "$c" "${ref[python]}" >/dev/null
}

build_pause() {
  local bin; bin="$(mktemp -d)"
  gcc -Os -Wall -Werror -static -DVERSION=local -o "$bin/pause" "$k8s_mod/build/pause/linux/pause.c"
  local c; c=$(buildah from scratch)
  buildah copy --quiet "$c" "$bin/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 --label "$LABEL=$WANT" "$c"
  buildah commit --quiet --rm "$c" "${ref[pause]}" >/dev/null
  rm -rf "$bin"
}

build_dockerfile() {  # NAME DOCKERFILE BASE
  buildah bud --quiet --layers -f "$repo/$2" --build-arg "BASE_IMAGE=${ref[$3]}" --label "$LABEL=$WANT" \
    -t "${ref[$1]}" "$repo" >/dev/null
}

images=("$@")
[[ ${#images[@]} -gt 0 ]] || images=(base python pause trainer operator)
for name in "${images[@]}"; do
  case "$name" in
    base) build base "$(inputs_hash "$suite" "$mirror" "$(sha256sum < "$host_ca")")" build_base ;;
    python) build python "$(inputs_hash "$(image_id "${ref[base]}")")" build_python ;;
    pause) build pause "$(inputs_hash "$k8s_mod")" build_pause ;;
    trainer) build trainer "$(inputs_hash Dockerfile.trainer .dockerignore pyproject.toml operator/finetune_operator/__init__.py \
        operator/finetune_operator/py.typed operator/finetune_operator/api trainer_image/finetune_trainer \
        "$(image_id "${ref[base]}")")" build_dockerfile trainer Dockerfile.trainer base ;;
    operator) build operator "$(inputs_hash Dockerfile.operator .dockerignore pyproject.toml operator \
        "$(image_id "${ref[python]}")")" build_dockerfile operator Dockerfile.operator python ;;
    *) echo "unknown image $name (base python pause trainer operator)" >&2; exit 2 ;;
  esac
done
