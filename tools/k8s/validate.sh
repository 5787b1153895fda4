#!/usr/bin/env bash
# Offline validation of the deployment artifacts (`make k8s-validate`, run by CI after lint):
#   - the Helm chart helm/fhirmesh: `helm lint --strict` and `helm template` with the default
#     values, each profile and the test values in tools/k8s/values/;
#   - every rendering, and every kustomize overlay of deploy/k8s, against the Kubernetes API
#     schemas with `kubernetes-validate --strict` (built-in kinds; custom resources — ServiceMonitor,
#     ScaledObject — against the subset schemas in tools/k8s/crd-schemas/);
#   - negative checks: values with a misspelt key, a wrong type, an unknown config key, or a
#     combination the chart refuses must FAIL;
#   - deploy/k8s's generated files equal a fresh rendering of the chart (no silent drift), and
#     each overlay builds the same objects as the chart's matching profile;
#   - with FHIRMESH_BIN=path/to/fhirmesh: the binary accepts every rendered configuration file
#     (`fhirmesh config --config …`) and the values schema knows every key the binary prints.
# One line per check; exits non-zero when any check fails. Installs its tools on first use
# (tools/k8s/install.sh, outside the clone); offline after that.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Kubernetes versions the manifests are validated against (kubernetes-validate bundles 1.25–1.37):
# the oldest we support and the newest known.
K8S_VERSIONS="${K8S_VERSIONS:-1.31.0 1.37.0}"
# The version `helm template` renders for (.Capabilities.KubeVersion).
export KUBE_VERSION="${KUBE_VERSION:-1.31.0}"

started=$SECONDS
eval "$(bash tools/k8s/install.sh)"
export HELM KUSTOMIZE
PYTHON="$(dirname "$KUBERNETES_VALIDATE")/python"
read -r -a KUSTOMIZE_CMD <<<"$KUSTOMIZE"

CHART=helm/fhirmesh
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
passed=0
failed=0
failures=()

# check NAME COMMAND...: runs COMMAND with its output in a log; one summary line.
check() {
  local name="$1"
  shift
  local log="$WORK/log.$((passed + failed))"
  local t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    printf 'k8s-validate: ok    %-64s %3ss\n' "$name" "$((SECONDS - t0))"
  else
    failed=$((failed + 1))
    failures+=("$name")
    printf 'k8s-validate: FAIL  %-64s %3ss\n' "$name" "$((SECONDS - t0))"
    sed 's/^/    /' "$log" | tail -n 40
  fi
}

# expect_failure PATTERN COMMAND...: COMMAND must fail, saying PATTERN (so it fails for the
# reason the check is about).
expect_failure() {
  local pattern="$1"
  shift
  local out
  if out="$("$@" 2>&1)"; then
    echo "expected a failure, but it succeeded:"
    echo "$out" | tail -n 20
    return 1
  fi
  if ! grep -qE -- "$pattern" <<<"$out"; then
    echo "failed, but not with /$pattern/:"
    echo "$out" | tail -n 20
    return 1
  fi
  echo "$out" | grep -E -- "$pattern" | head -n 3
}

# The value sets: NAME=values files (relative to the repo root, space-separated).
declare -A SETS=(
  [default]=""
  [aws]="$CHART/profiles/aws.yaml"
  [in-cluster]="$CHART/profiles/in-cluster.yaml"
  [embedded]="$CHART/profiles/embedded.yaml"
  [aws+all-features]="$CHART/profiles/aws.yaml tools/k8s/values/all-features.yaml"
  [embedded+no-persistence]="$CHART/profiles/embedded.yaml tools/k8s/values/embedded-no-persistence.yaml"
)
ORDER=(default aws in-cluster embedded aws+all-features embedded+no-persistence)

value_args() {
  local f
  for f in ${SETS[$1]}; do printf -- '-f\n%s\n' "$f"; done
}

render() {
  local set="$1" args
  mapfile -t args < <(value_args "$set")
  "$HELM" template fhirmesh "$CHART" --kube-version "$KUBE_VERSION" "${args[@]}" >"$WORK/render-$set.yaml"
}

lint() {
  local set="$1" args
  mapfile -t args < <(value_args "$set")
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" "${args[@]}"
}

# kubernetes-validate --strict on FILES for each pinned version: an ERROR fails; a WARN (a kind
# it has no schema for) fails too unless it is a custom resource crd_check.py checks.
kube_validate() {
  local version out status=0
  for version in $K8S_VERSIONS; do
    out="$("$KUBERNETES_VALIDATE" --strict --quiet -k "$version" "$@" 2>&1)" || status=1
    [[ -n "$out" ]] && echo "$out"
    if grep -v -E "Couldn't find schema for kind (ServiceMonitor with api version monitoring.coreos.com/v1|ScaledObject with api version keda.sh/v1alpha1) " <<<"$out" | grep -q -E '^(WARN|ERROR|FATAL)'; then
      status=1
    fi
  done
  "$PYTHON" tools/k8s/crd_check.py "$@" | grep -v '^INFO' || true
  "$PYTHON" tools/k8s/crd_check.py "$@" >/dev/null || status=1
  return "$status"
}

kustomize_build() {
  "${KUSTOMIZE_CMD[@]}" "deploy/k8s/$1" >"$WORK/kustomize-${1//\//-}.yaml"
}

# --- the chart --------------------------------------------------------------------------------
for set in "${ORDER[@]}"; do
  check "helm lint --strict ($set)" lint "$set"
  check "helm template ($set)" render "$set"
done
rendered=()
for set in "${ORDER[@]}"; do
  [[ -s "$WORK/render-$set.yaml" ]] && rendered+=("$WORK/render-$set.yaml")
done
check "kubernetes-validate --strict, k8s $K8S_VERSIONS (${#rendered[@]} renderings)" kube_validate "${rendered[@]}"

# --- the schema and the chart's own checks bite ------------------------------------------------
check "negative: misspelt top-level key fails helm lint" \
  expect_failure "additional properties 'gatway' not allowed" \
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" -f tools/k8s/values/bad-typo.yaml
check "negative: wrong type fails helm lint" \
  expect_failure "/resource/replicas.*want integer" \
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" -f tools/k8s/values/bad-type.yaml
check "negative: unknown config key and backend fail helm lint" \
  expect_failure "additional properties 'listen' not allowed" \
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" -f tools/k8s/values/bad-config-key.yaml
check "negative: the mesh on SQLite fails helm template" \
  expect_failure "needs config.storage.backend = dynamodb" \
  "$HELM" template fhirmesh "$CHART" --kube-version "$KUBE_VERSION" -f tools/k8s/values/bad-mesh-sqlite.yaml
check "negative: two change-log relays fail helm template" \
  expect_failure "exactly one relay publishes" \
  "$HELM" template fhirmesh "$CHART" --kube-version "$KUBE_VERSION" -f tools/k8s/values/bad-relay-replicas.yaml

check "negative: gRPC TLS without its Secret fails helm template" \
  expect_failure "grpcTls.enabled needs grpcTls.secretName" \
  "$HELM" template fhirmesh "$CHART" --kube-version "$KUBE_VERSION" -f tools/k8s/values/bad-grpc-tls.yaml

# grpcTls: every mesh pod mounts the Secret, the config names its files, every endpoint is https.
grpc_tls_rendered() {
  "$PYTHON" - "$WORK/render-aws+all-features.yaml" <<'PY'
import sys, yaml
objs = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o]
toml = next(o["data"]["fhirmesh.toml"] for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))
problems = [f"config lacks {k}" for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if k not in toml]
problems += [f"config has a clear-text endpoint: {line}" for line in toml.splitlines() if "_endpoint" in line and "http://" in line and "otlp" not in line]
for o in objs:
    if o["kind"] != "Deployment":
        continue
    volumes = {v["name"]: v for v in o["spec"]["template"]["spec"]["volumes"]}
    if volumes.get("grpc-tls", {}).get("secret", {}).get("secretName") != "fhirmesh-grpc-tls":
        problems.append(f"{o['metadata']['name']} does not mount the gRPC TLS Secret")
print("\n".join(problems))
sys.exit(1 if problems else 0)
PY
}
check "grpcTls: Secret mounted in every mesh pod, tls_* set, https endpoints" grpc_tls_rendered

# --- deploy/k8s ---------------------------------------------------------------------------------
check "deploy/k8s generated files equal the chart's rendering" "$PYTHON" tools/k8s/render.py --check
built=()
for target in base overlays/aws overlays/in-cluster overlays/embedded; do
  check "kustomize build deploy/k8s/$target" kustomize_build "$target"
  [[ -s "$WORK/kustomize-${target//\//-}.yaml" ]] && built+=("$WORK/kustomize-${target//\//-}.yaml")
done
check "kubernetes-validate --strict, k8s $K8S_VERSIONS (${#built[@]} kustomize builds)" kube_validate "${built[@]}"
check "overlays build what the chart's profiles render" "$PYTHON" tools/k8s/render.py --equivalence

# --- the binary itself, when given --------------------------------------------------------------
if [[ -n "${FHIRMESH_BIN:-}" ]]; then
  binary_accepts() {
    local set
    # Not `default`: its auth.issuer/audience/jwks_url are left for the operator to fill in, and
    # the binary rightly refuses to start without them.
    for set in "${ORDER[@]:1}"; do
      "$PYTHON" - "$WORK/render-$set.yaml" "$WORK/config-$set.toml" <<'PY'
import sys, yaml
for obj in yaml.safe_load_all(open(sys.argv[1])):
    if obj and obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-config"):
        open(sys.argv[2], "w").write(obj["data"]["fhirmesh.toml"])
        break
PY
      echo "== $set"
      env -i PATH=/usr/bin:/bin "$FHIRMESH_BIN" config --config "$WORK/config-$set.toml" >/dev/null || return 1
    done
  }
  schema_knows_binary_keys() {
    env -i PATH=/usr/bin:/bin "$FHIRMESH_BIN" config >"$WORK/defaults.json"
    "$PYTHON" - "$WORK/defaults.json" "$CHART/values.schema.json" <<'PY'
import json, sys
defaults = json.load(open(sys.argv[1]))
config = json.load(open(sys.argv[2]))["properties"]["config"]["properties"]
missing = [f"{s}.{k}" for s, keys in defaults.items() for k in keys
           if k not in config.get(s, {}).get("properties", {})]
stale = [f"{s}.{k}" for s, body in config.items() for k in body["properties"]
         if k not in defaults.get(s, {})]
for key in missing:
    print(f"values.schema.json lacks config.{key} (the binary has it)")
for key in stale:
    print(f"values.schema.json has config.{key}, which the binary does not know")
sys.exit(1 if missing or stale else 0)
PY
  }
  check "the binary accepts every rendered config ($FHIRMESH_BIN)" binary_accepts
  check "values.schema.json config keys = the binary's" schema_knows_binary_keys
else
  echo "k8s-validate: skip  the binary's own check of the rendered configs (set FHIRMESH_BIN=path/to/fhirmesh)"
fi

echo "k8s-validate: took $((SECONDS - started))s"
echo "k8s-validate: $passed passed, $failed failed"
if ((failed)); then
  printf 'k8s-validate: failed: %s\n' "${failures[@]}"
  exit 1
fi
