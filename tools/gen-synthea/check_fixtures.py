#!/usr/bin/env python3
"""Sanity-check the Synthea transaction-bundle fixtures and print their statistics.

Python 3 standard library only.

    python3 tools/gen-synthea/check_fixtures.py [DIR]            # checks, then a summary
    python3 tools/gen-synthea/check_fixtures.py --table [DIR]    # checks, then only the markdown table

DIR defaults to tests/e2e/data/synthea/ next to this repository's root. Files named
`0N-*.json` are "information" bundles (hospitals, practitioners: what Synthea writes
separately); files named `NN-*.json` with NN >= 10 are patient bundles.

Checks, per file:
  - valid JSON; resourceType == Bundle; type == transaction;
  - every entry has a fullUrl, a resource with a resourceType, request.method and request.url;
  - fullUrls are unique within the bundle;
  - every `urn:uuid:` reference points at a fullUrl of the same bundle;
  - every conditional reference (`Type?search`) in a patient bundle is satisfiable by a
    resource of that type in the information bundles (same identifier system|value);
  - every `ifNoneExist` is of the form `identifier=system|value` and matches its own resource.
Exits non-zero, listing the failures, if any check fails.
"""

import json
import re
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

CONDITIONAL = re.compile(r"^([A-Z][A-Za-z]+)\?(.+)$")
INFO_FILE = re.compile(r"^0\d-.*\.json$")


def references(node, out):
    """Collect every Reference.reference string inside `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                out.append(value)
            else:
                references(value, out)
    elif isinstance(node, list):
        for item in node:
            references(item, out)
    return out


def identifier_query(query):
    """`identifier=system|value` -> (system, value); anything else -> None."""
    if not query.startswith("identifier="):
        return None
    token = unquote(query[len("identifier="):])
    if "|" not in token:
        return None
    system, value = token.split("|", 1)
    return system, value


def identifiers_of(resource):
    return {(i.get("system"), i.get("value")) for i in resource.get("identifier", []) or []}


def main(argv):
    table_only = "--table" in argv
    args = [a for a in argv if not a.startswith("--")]
    root = Path(__file__).resolve().parents[2]
    directory = Path(args[0]) if args else root / "tests/e2e/data/synthea"

    files = sorted(directory.glob("*.json"))
    if not files:
        print(f"no .json files in {directory}", file=sys.stderr)
        return 1

    failures = []
    bundles = {}
    for path in files:
        try:
            bundles[path] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            failures.append(f"{path.name}: not valid JSON: {error}")

    # What the information bundles make resolvable by identifier.
    resolvable = set()
    for path, bundle in bundles.items():
        if INFO_FILE.match(path.name):
            for entry in bundle.get("entry", []):
                resource = entry.get("resource", {})
                for system, value in identifiers_of(resource):
                    resolvable.add((resource.get("resourceType"), system, value))

    rows = []
    totals = Counter()
    for path, bundle in bundles.items():
        name = path.name
        is_info = bool(INFO_FILE.match(name))
        if bundle.get("resourceType") != "Bundle":
            failures.append(f"{name}: resourceType is {bundle.get('resourceType')!r}, not Bundle")
        if bundle.get("type") != "transaction":
            failures.append(f"{name}: type is {bundle.get('type')!r}, not transaction")

        entries = bundle.get("entry", [])
        full_urls = Counter(e.get("fullUrl") for e in entries)
        for url, count in full_urls.items():
            if url is None:
                failures.append(f"{name}: {count} entries without fullUrl")
            elif count > 1:
                failures.append(f"{name}: fullUrl {url} used {count} times")

        methods = Counter()
        types = Counter()
        if_none_exist = 0
        for index, entry in enumerate(entries):
            resource = entry.get("resource") or {}
            rtype = resource.get("resourceType")
            types[rtype] += 1
            if not rtype:
                failures.append(f"{name}: entry {index} has no resource.resourceType")
            request = entry.get("request") or {}
            if not request.get("method") or not request.get("url"):
                failures.append(f"{name}: entry {index} lacks request.method or request.url")
            methods[request.get("method")] += 1
            if "ifNoneExist" in request:
                if_none_exist += 1
                wanted = identifier_query(request["ifNoneExist"])
                if wanted is None or wanted not in identifiers_of(resource):
                    failures.append(f"{name}: entry {index} ifNoneExist {request['ifNoneExist']!r}"
                                    " does not match its resource's identifiers")

        refs = references(bundle, [])
        urn = [r for r in refs if r.startswith("urn:uuid:")]
        conditional = [r for r in refs if CONDITIONAL.match(r)]
        other = [r for r in refs if r not in urn and not CONDITIONAL.match(r)]

        dangling = [r for r in urn if r not in full_urls]
        if dangling:
            failures.append(f"{name}: {len(dangling)} urn:uuid references to no fullUrl in the bundle,"
                            f" e.g. {dangling[:3]}")

        unsatisfied = []
        if not is_info:
            for ref in conditional:
                rtype, query = CONDITIONAL.match(ref).groups()
                wanted = identifier_query(query)
                if wanted is None or (rtype, *wanted) not in resolvable:
                    unsatisfied.append(ref)
        if unsatisfied:
            failures.append(f"{name}: {len(unsatisfied)} conditional references not satisfiable by the"
                            f" information bundles, e.g. {sorted(set(unsatisfied))[:3]}")

        row = {
            "file": name,
            "kind": "information" if is_info else "patient",
            "entries": len(entries),
            "bytes": path.stat().st_size,
            "urn": len(urn),
            "urn_distinct": len(set(urn)),
            "conditional": len(conditional),
            "conditional_distinct": len(set(conditional)),
            "if_none_exist": if_none_exist,
            "other": len(other),
            "methods": dict(methods),
            "types": types,
            "dangling": len(dangling),
            "unsatisfied": len(unsatisfied),
        }
        rows.append(row)
        for key in ("entries", "bytes", "urn", "conditional", "if_none_exist", "other"):
            totals[key] += row[key]

    header = ("| file | kind | entries | bytes | urn:uuid refs (distinct targets) "
              "| conditional refs `Type?…` (distinct) | ifNoneExist | other refs |")
    lines = [header, "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| `{r['file']}` | {r['kind']} | {r['entries']} | {r['bytes']} "
                     f"| {r['urn']} ({r['urn_distinct']}) | {r['conditional']} ({r['conditional_distinct']}) "
                     f"| {r['if_none_exist']} | {r['other']} |")
    lines.append(f"| **total** | | {totals['entries']} | {totals['bytes']} | {totals['urn']} "
                 f"| {totals['conditional']} | {totals['if_none_exist']} | {totals['other']} |")
    print("\n".join(lines))

    if not table_only:
        print()
        for r in rows:
            methods = ", ".join(f"{m} {n}" for m, n in sorted(r["methods"].items(), key=str))
            types = ", ".join(f"{t} {n}" for t, n in r["types"].most_common())
            print(f"{r['file']}: methods: {methods}; dangling urn:uuid: {r['dangling']}; "
                  f"unsatisfied conditional: {r['unsatisfied']}")
            print(f"    {types}")
        info = [p.name for p in bundles if INFO_FILE.match(p.name)]
        print(f"\ninformation bundles: {info or 'none'}; identifiers they make resolvable: {len(resolvable)}")

    if failures:
        print(f"\n{len(failures)} check(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    if not table_only:
        print(f"\nall checks passed on {len(rows)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
