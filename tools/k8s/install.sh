#!/usr/bin/env bash
# Installs the tools the Kubernetes checks (tools/k8s/validate.sh, `make k8s-validate`) need,
# outside the clone, idempotently: a second run finds them and returns in well under a second.
#
#   helm                 the real CLI, built from the Go module proxy (`go install`)
#   kubernetes-validate  PyPI, in a virtualenv of its own
#   kustomize            `kubectl kustomize` when kubectl is there and works offline, else the Go
#                        module sigs.k8s.io/kustomize/kustomize/v5
#
# Everything goes under $FHIRMESH_TOOLS_DIR (default ~/.cache/fhirmesh-tools): bin/ and venv/.
# Prints the paths it settled on as shell assignments (HELM=…, KUBERNETES_VALIDATE=…, KUSTOMIZE=…)
# on stdout, so `eval "$(tools/k8s/install.sh)"` sets them; progress goes to stderr.
set -euo pipefail

# Pinned versions. Helm v3.22.0 is served by the proxy but not approved on these machines
# (/work/.library/env/packages/go-partial.tsv): v3.21.4 is the newest approved v3.
HELM_VERSION="${HELM_VERSION:-v3.21.4}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
KUSTOMIZE_VERSION="${KUSTOMIZE_VERSION:-v5.7.1}"

TOOLS_DIR="${FHIRMESH_TOOLS_DIR:-$HOME/.cache/fhirmesh-tools}"
BIN="$TOOLS_DIR/bin"
VENV="$TOOLS_DIR/venv"
mkdir -p "$BIN"

log() { echo "k8s-tools: $*" >&2; }

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    log "Go is needed to build $1 (go install) and was not found (PATH, /usr/local/go/bin)"
    return 1
  fi
}

# go_install NAME MODULE@VERSION: builds NAME into $BIN unless the stamp says that version is there.
go_install() {
  local name="$1" module="$2" version="$3"
  local stamp="$BIN/.$name.version"
  if [[ -x "$BIN/$name" && -f "$stamp" && "$(cat "$stamp")" == "$module@$version" ]]; then
    return 0
  fi
  local go
  go="$(find_go "$name")"
  log "building $name from $module@$version (go install; a few minutes the first time)"
  # GOFLAGS=-mod=mod: a go.work or GOFLAGS of the caller must not change what is built.
  GOBIN="$BIN" GOFLAGS=-mod=mod CGO_ENABLED=0 nice "$go" install "$module@$version"
  echo "$module@$version" >"$stamp"
}

# --- helm ---------------------------------------------------------------------------------------
go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
HELM="$BIN/helm"

# --- kubernetes-validate ------------------------------------------------------------------------
kv_installed() {
  [[ -x "$VENV/bin/kubernetes-validate" ]] &&
    [[ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" \
      == "$KUBERNETES_VALIDATE_VERSION" ]]
}
if ! kv_installed; then
  log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV (PyPI)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  kv_installed || { log "kubernetes-validate did not install"; exit 1; }
fi
KUBERNETES_VALIDATE="$VENV/bin/kubernetes-validate"

# --- kustomize ----------------------------------------------------------------------------------
# kubectl's built-in kustomize works offline; check it on a one-file kustomization.
kubectl_kustomize_works() {
  command -v kubectl >/dev/null 2>&1 || return 1
  local dir
  dir="$(mktemp -d)"
  printf 'resources: [cm.yaml]\n' >"$dir/kustomization.yaml"
  printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n' >"$dir/cm.yaml"
  local ok=0
  timeout 20 kubectl kustomize "$dir" >/dev/null 2>&1 || ok=1
  rm -rf "$dir"
  return "$ok"
}
if [[ -x "$BIN/kustomize" ]]; then
  KUSTOMIZE="$BIN/kustomize build"
elif [[ "${FHIRMESH_KUSTOMIZE:-}" != "go" ]] && kubectl_kustomize_works; then
  KUSTOMIZE="kubectl kustomize"
else
  go_install kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
  KUSTOMIZE="$BIN/kustomize build"
fi

printf 'HELM=%q\nKUBERNETES_VALIDATE=%q\nKUSTOMIZE=%q\n' "$HELM" "$KUBERNETES_VALIDATE" "$KUSTOMIZE"
