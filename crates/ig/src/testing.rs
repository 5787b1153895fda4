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
