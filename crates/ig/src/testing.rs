//! Packages made in tests.

use std::io::Write;

/// A gzipped tar archive holding `files` (path, content), as FHIR packages are shipped.
pub fn tgz(files: &[(&str, String)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, content.as_bytes()).expect("append");
    }
    let mut gz = builder.into_inner().expect("tar");
    gz.flush().expect("flush");
    gz.finish().expect("gzip")
}

/// A package manifest: `name`, `version`, FHIR 4.0.1, and `dependencies` (name, version).
pub fn manifest(name: &str, version: &str, dependencies: &[(&str, &str)]) -> String {
    let deps: serde_json::Map<String, serde_json::Value> =
        dependencies.iter().map(|(n, v)| ((*n).to_owned(), serde_json::Value::from(*v))).collect();
    serde_json::json!({"name": name, "version": version, "fhirVersions": ["4.0.1"], "dependencies": deps}).to_string()
}

/// The canonical URL base of [`profiled_package`]'s resources.
pub const EXAMPLE_BASE: &str = "http://example.org/fhir";

/// One snapshot element: `id` (slice names after `:`), its cardinality and anything else.
fn element(id: &str, min: u32, max: &str, extra: serde_json::Value) -> serde_json::Value {
    let path: Vec<&str> = id.split('.').map(|step| step.split(':').next().unwrap_or(step)).collect();
    let mut element = serde_json::json!({"id": id, "path": path.join("."), "min": min, "max": max});
    if let (Some(element), serde_json::Value::Object(extra)) = (element.as_object_mut(), extra) {
        element.extend(extra);
    }
    element
}

fn structure_definition(name: &str, kind: &str, type_: &str, elements: Vec<serde_json::Value>) -> String {
    serde_json::json!({
        "resourceType": "StructureDefinition", "id": name, "url": format!("{EXAMPLE_BASE}/StructureDefinition/{name}"),
        "name": name, "status": "active", "fhirVersion": "4.0.1", "kind": kind, "abstract": false, "type": type_,
        "baseDefinition": format!("http://hl7.org/fhir/StructureDefinition/{type_}"), "derivation": "constraint",
        "snapshot": {"element": elements}
    })
    .to_string()
}

/// A small IG (`example.fhir.profiled#1.0.0`) with what profile validation checks:
/// - `strict-patient` on Patient: `identifier` 1..* sliced by `system` (open) with slice `mrn`
///   (1..1, system fixed to `http://example.org/mrn`); `name` 0..1 with `family` 1..1;
///   `active` fixed to true; `gender` bound (required) to `genders` (male, female);
///   `maritalStatus` with a pattern (system v3-MaritalStatus); `deceased[x]` boolean only;
///   `extension` sliced by url with slice `colour` (0..1, the `favourite-colour` extension).
/// - `favourite-colour`: an extension whose `valueCode` (1..1) is bound (required) to
///   `colours`, every code of the `colours` code system (red, green, blue).
/// - `vitals` on Observation: `value[x]` Quantity only; `component` sliced by `code` (pattern,
///   closed) with slice `systolic` (1..1, code LOINC 8480-6).
/// - the search parameter `colour` (token, Patient, the extension's code).
pub fn profiled_package() -> Vec<u8> {
    use serde_json::json;
    let b = EXAMPLE_BASE;
    let patient = structure_definition(
        "strict-patient",
        "resource",
        "Patient",
        vec![
            element("Patient", 0, "*", json!({})),
            element("Patient.meta", 0, "1", json!({"type": [{"code": "Meta"}]})),
            element(
                "Patient.extension",
                0,
                "*",
                json!({"type": [{"code": "Extension"}],
                       "slicing": {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}}),
            ),
            element(
                "Patient.extension:colour",
                0,
                "1",
                json!({"sliceName": "colour",
                       "type": [{"code": "Extension", "profile": [format!("{b}/StructureDefinition/favourite-colour")]}]}),
            ),
            element(
                "Patient.identifier",
                1,
                "*",
                json!({"type": [{"code": "Identifier"}],
                       "slicing": {"discriminator": [{"type": "value", "path": "system"}], "rules": "open"}}),
            ),
            element("Patient.identifier.system", 0, "1", json!({"type": [{"code": "uri"}]})),
            element("Patient.identifier.value", 0, "1", json!({"type": [{"code": "string"}]})),
            element("Patient.identifier:mrn", 1, "1", json!({"sliceName": "mrn", "type": [{"code": "Identifier"}]})),
            element(
                "Patient.identifier:mrn.system",
                1,
                "1",
                json!({"type": [{"code": "uri"}], "fixedUri": "http://example.org/mrn"}),
            ),
            element("Patient.identifier:mrn.value", 1, "1", json!({"type": [{"code": "string"}]})),
            element("Patient.active", 0, "1", json!({"type": [{"code": "boolean"}], "fixedBoolean": true})),
            element("Patient.name", 0, "1", json!({"type": [{"code": "HumanName"}]})),
            element("Patient.name.family", 1, "1", json!({"type": [{"code": "string"}]})),
            element(
                "Patient.gender",
                0,
                "1",
                json!({"type": [{"code": "code"}],
                       "binding": {"strength": "required", "valueSet": format!("{b}/ValueSet/genders")}}),
            ),
            element("Patient.deceased[x]", 0, "1", json!({"type": [{"code": "boolean"}]})),
            element(
                "Patient.maritalStatus",
                0,
                "1",
                json!({"type": [{"code": "CodeableConcept"}],
                       "patternCodeableConcept": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"}]}}),
            ),
        ],
    );
    let extension = structure_definition(
        "favourite-colour",
        "complex-type",
        "Extension",
        vec![
            element("Extension", 0, "*", json!({})),
            element("Extension.extension", 0, "0", json!({"type": [{"code": "Extension"}]})),
            element(
                "Extension.url",
                1,
                "1",
                json!({"type": [{"code": "uri"}], "fixedUri": format!("{b}/StructureDefinition/favourite-colour")}),
            ),
            element(
                "Extension.value[x]",
                1,
                "1",
                json!({"type": [{"code": "code"}],
                       "binding": {"strength": "required", "valueSet": format!("{b}/ValueSet/colours")}}),
            ),
        ],
    );
    let vitals = structure_definition(
        "vitals",
        "resource",
        "Observation",
        vec![
            element("Observation", 0, "*", json!({})),
            element("Observation.value[x]", 0, "1", json!({"type": [{"code": "Quantity"}]})),
            element(
                "Observation.component",
                0,
                "*",
                json!({"type": [{"code": "BackboneElement"}],
                       "slicing": {"discriminator": [{"type": "pattern", "path": "code"}], "rules": "closed"}}),
            ),
            element("Observation.component.code", 1, "1", json!({"type": [{"code": "CodeableConcept"}]})),
            element("Observation.component:systolic", 1, "1", json!({"sliceName": "systolic"})),
            element(
                "Observation.component:systolic.code",
                1,
                "1",
                json!({"type": [{"code": "CodeableConcept"}],
                       "patternCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}}),
            ),
            element("Observation.component:systolic.value[x]", 1, "1", json!({"type": [{"code": "Quantity"}]})),
        ],
    );
    let colours = json!({
        "resourceType": "CodeSystem", "id": "colours", "url": format!("{b}/CodeSystem/colours"), "status": "active",
        "content": "complete",
        "concept": [{"code": "red", "display": "Red"}, {"code": "green", "display": "Green",
                     "concept": [{"code": "blue", "display": "Blue"}]}]
    });
    let colour_set = json!({
        "resourceType": "ValueSet", "id": "colours", "url": format!("{b}/ValueSet/colours"), "status": "active",
        "compose": {"include": [{"system": format!("{b}/CodeSystem/colours")}]}
    });
    let genders = json!({
        "resourceType": "ValueSet", "id": "genders", "url": format!("{b}/ValueSet/genders"), "status": "active",
        "compose": {"include": [{"system": "http://hl7.org/fhir/administrative-gender",
                                 "concept": [{"code": "male"}, {"code": "female"}]}]}
    });
    let search = json!({
        "resourceType": "SearchParameter", "id": "colour", "url": format!("{b}/SearchParameter/colour"),
        "name": "colour", "status": "active", "code": "colour", "base": ["Patient"], "type": "token",
        "expression": format!("Patient.extension.where(url = '{b}/StructureDefinition/favourite-colour').value")
    });
    tgz(&[
        ("package/package.json", manifest("example.fhir.profiled", "1.0.0", &[("hl7.fhir.r4.core", "4.0.1")])),
        ("package/StructureDefinition-strict-patient.json", patient),
        ("package/StructureDefinition-favourite-colour.json", extension),
        ("package/StructureDefinition-vitals.json", vitals),
        ("package/CodeSystem-colours.json", colours.to_string()),
        ("package/ValueSet-colours.json", colour_set.to_string()),
        ("package/ValueSet-genders.json", genders.to_string()),
        ("package/SearchParameter-colour.json", search.to_string()),
    ])
}
