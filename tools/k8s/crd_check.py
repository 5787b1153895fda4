#!/usr/bin/env python3
"""Validates the custom resources in rendered manifests (kubernetes-validate knows only the built-in
kinds and merely warns about the others) against the schemas in tools/k8s/crd-schemas/, strictly.

    crd_check.py FILE...    exit 1 on an invalid custom resource, or one of a kind with no schema
Prints one line per custom resource checked.
"""

import json
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
}
# Kinds kubernetes-validate checks itself.
BUILTIN_GROUPS = ("v1", "apps/", "batch/", "policy/", "networking.k8s.io/", "autoscaling/", "rbac.authorization.k8s.io/")


def main() -> int:
    here = Path(__file__).resolve().parent / "crd-schemas"
    failed = 0
    for name in sys.argv[1:]:
        for obj in yaml.safe_load_all(Path(name).read_text()):
            if not obj:
                continue
            api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
            if api == "v1" or api.startswith(BUILTIN_GROUPS):
                continue
            what = f"{name}: {kind}/{obj.get('metadata', {}).get('name')} ({api})"
            schema_file = SCHEMAS.get((api, kind))
            if schema_file is None:
                print(f"ERROR {what}: no schema for this custom resource kind (tools/k8s/crd-schemas)")
                failed += 1
                continue
            schema = json.loads((here / schema_file).read_text())
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
            for error in errors:
                path = ".".join(str(p) for p in error.path)
                print(f"ERROR {what}: {path}: {error.message}")
            if errors:
                failed += 1
            else:
                print(f"INFO {what} passed against {schema_file}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
