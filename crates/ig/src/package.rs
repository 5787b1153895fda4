//! One package: its manifest and resources, read from the `.tgz`.

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::Value;

/// The resource types a package contributes to the server's conformance (others under
/// `package/` are kept as examples).
pub const CONFORMANCE_TYPES: [&str; 10] = [
    "StructureDefinition",
    "SearchParameter",
    "ValueSet",
    "CodeSystem",
    "CompartmentDefinition",
    "OperationDefinition",
    "CapabilityStatement",
    "ConceptMap",
    "NamingSystem",
    "ImplementationGuide",
];

/// Largest package accepted, unpacked (US Core 6 is about 30 MB unpacked).
const MAX_UNPACKED_BYTES: u64 = 512 * 1024 * 1024;

/// Why a package cannot be used, naming the package (its `name#version`, or the file it came
/// from when its manifest could not be read) and what is wrong where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{package}: {message}")]
pub struct PackageError {
    pub package: String,
    pub message: String,
}

impl PackageError {
    pub(crate) fn new(package: impl Into<String>, message: impl Into<String>) -> PackageError {
        PackageError { package: package.into(), message: message.into() }
    }
}

/// A checked package.
#[derive(Debug, Clone, PartialEq)]
pub struct Package {
    /// e.g. `hl7.fhir.us.core`.
    pub name: String,
    /// e.g. `6.1.0`.
    pub version: String,
    /// The FHIR versions it declares (one of them 4.0.x).
    pub fhir_versions: Vec<String>,
    /// Package name → version it needs.
    pub dependencies: BTreeMap<String, String>,
    /// Its conformance resources ([`CONFORMANCE_TYPES`]), each with a `url`, by file name.
    pub resources: Vec<(String, Value)>,
    /// Its other resources: examples (under `package/example/` or of other types).
    pub examples: Vec<(String, Value)>,
}

impl Package {
    /// `name#version`, how FHIR tools name a package.
    pub fn id(&self) -> String {
        format!("{}#{}", self.name, self.version)
    }

    /// Reads and checks the package in `tgz`; `origin` names it in errors until its manifest is
    /// read (e.g. the file name).
    pub fn from_tgz(origin: &str, tgz: &[u8]) -> Result<Package, PackageError> {
        let fail = |message: String| PackageError::new(origin, message);
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz));
        let mut manifest = None;
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut unpacked = 0u64;
        let entries = archive.entries().map_err(|e| fail(format!("not a gzipped tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| fail(format!("not a gzipped tar archive: {e}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(|e| fail(format!("a file name is not valid: {e}")))?;
            let path = path.to_string_lossy().replace('\\', "/");
            let Some(inner) = path.strip_prefix("package/") else { continue };
            if !inner.ends_with(".json") {
                continue;
            }
            unpacked += entry.size();
            if unpacked > MAX_UNPACKED_BYTES {
                return Err(fail(format!("more than {MAX_UNPACKED_BYTES} bytes of JSON unpacked")));
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes).map_err(|e| fail(format!("{path}: cannot be read: {e}")))?;
            match inner {
                "package.json" => manifest = Some(bytes),
                // The package index and tool metadata, not resources.
                ".index.json" | "ig-r4.json" => {}
                _ if inner.starts_with("other/") || inner.starts_with("openapi/") || inner.starts_with("xml/") => {}
                _ => files.push((inner.to_owned(), bytes)),
            }
        }
        let manifest = manifest.ok_or_else(|| fail("no package/package.json: not a FHIR package".to_owned()))?;
        let mut package = Package::from_manifest(origin, &manifest)?;
        let id = package.id();
        for (file, bytes) in files {
            let resource: Value = serde_json::from_slice(&bytes)
                .map_err(|e| PackageError::new(&id, format!("package/{file} is not valid JSON: {e}")))?;
            let Some(kind) = resource.get("resourceType").and_then(Value::as_str) else {
                // Tool files (e.g. `.index.db` exports) without a resourceType are not resources.
                continue;
            };
            let example = file.starts_with("example/") || file.starts_with("examples/");
            if example || !CONFORMANCE_TYPES.contains(&kind) {
                package.examples.push((file, resource));
                continue;
            }
            match resource.get("url").and_then(Value::as_str) {
                Some(url) if !url.is_empty() => {}
                _ => return Err(PackageError::new(&id, format!("package/{file}: a {kind} without a url"))),
            }
            package.resources.push((file, resource));
        }
        package.resources.sort_by(|a, b| a.0.cmp(&b.0));
        package.examples.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(package)
    }

    /// The package as its `package.json` describes it, without resources.
    fn from_manifest(origin: &str, manifest: &[u8]) -> Result<Package, PackageError> {
        let fail = |message: String| PackageError::new(origin, message);
        let json: Value = serde_json::from_slice(manifest)
            .map_err(|e| fail(format!("package/package.json is not valid JSON: {e}")))?;
        let text = |key: &str| json.get(key).and_then(Value::as_str).map(str::to_owned);
        let name = text("name").ok_or_else(|| fail("package/package.json has no name".to_owned()))?;
        if !valid_name(&name) {
            return Err(fail(format!(
                "package name {name:?} is not a FHIR package name (letters, digits, '-', '_', dot-separated)"
            )));
        }
        let version = text("version").ok_or_else(|| fail(format!("{name}: package/package.json has no version")))?;
        if version.is_empty() || version.contains(['#', '/', '\\', ' ']) {
            return Err(fail(format!("{name}: version {version:?} is not a package version")));
        }
        let id = format!("{name}#{version}");
        // `fhirVersions` (current), `fhir-version-list` and `fhirVersion` (older tools).
        let fhir_versions: Vec<String> = match (json.get("fhirVersions"), json.get("fhir-version-list")) {
            (Some(list), _) | (None, Some(list)) => strings(list),
            (None, None) => text("fhirVersion").into_iter().collect(),
        };
        if fhir_versions.is_empty() {
            return Err(PackageError::new(&id, "package.json names no FHIR version (fhirVersions)"));
        }
        if !fhir_versions.iter().any(|v| v.starts_with("4.0")) {
            return Err(PackageError::new(
                &id,
                format!(
                    "made for FHIR {}, not R4 (4.0.x): this server implements FHIR {}",
                    fhir_versions.join(", "),
                    crate::FHIR_VERSION
                ),
            ));
        }
        let mut dependencies = BTreeMap::new();
        if let Some(deps) = json.get("dependencies") {
            let Some(deps) = deps.as_object() else {
                return Err(PackageError::new(&id, "package.json dependencies is not an object"));
            };
            for (dependency, wanted) in deps {
                let Some(wanted) = wanted.as_str() else {
                    return Err(PackageError::new(&id, format!("dependency {dependency} has no version")));
                };
                dependencies.insert(dependency.clone(), wanted.to_owned());
            }
        }
        Ok(Package { name, version, fhir_versions, dependencies, resources: Vec::new(), examples: Vec::new() })
    }
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// A package name: dot-separated parts of letters, digits, `-` and `_` (lower case by convention).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 214
        && name
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
}
