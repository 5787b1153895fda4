//! Loading files: JSON Bundles as they are, NDJSON (and single JSON resources) as batch Bundles.
//!
//! Files are planned first ([`plan`]: directories expanded, every file opened, sizes counted, so a
//! missing file stops the run before anything is sent and the progress bar knows its length),
//! then read again one at a time while loading ([`produce`]), so memory stays bounded by the
//! queue, not by the size of the input.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::Bytes;
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::Work;

/// What a file holds, as far as loading is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A transaction or batch Bundle of this many entries: POSTed to the base as it is.
    Bundle(usize),
    /// One resource that is not a Bundle: loaded like one NDJSON line.
    Resource,
    /// One resource a line, this many non-blank lines.
    Ndjson(usize),
    /// Cannot be loaded (the reason); counted as one error when its turn comes.
    Invalid(String),
}

impl FileKind {
    /// Resources this file should yield (for the progress bar).
    pub(crate) fn resources(&self) -> usize {
        match self {
            FileKind::Bundle(entries) | FileKind::Ndjson(entries) => *entries,
            FileKind::Resource => 1,
            FileKind::Invalid(_) => 0,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PlannedFile {
    pub path: PathBuf,
    pub kind: FileKind,
}

/// Expands directories (every `*.json` / `*.ndjson` / `*.jsonl` directly in them, sorted) and
/// classifies every file. Fails on a path that does not exist or cannot be read.
pub(crate) fn plan(paths: &[PathBuf]) -> Result<Vec<PlannedFile>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            for dirent in std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))? {
                let found_path = dirent.with_context(|| format!("cannot list {}", path.display()))?.path();
                if found_path.is_file()
                    && matches!(extension(&found_path).as_deref(), Some("json" | "ndjson" | "jsonl"))
                {
                    found.push(found_path);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    files.into_iter().map(|path| Ok(PlannedFile { kind: classify(&path)?, path })).collect()
}

fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// The top of a resource, read without building a tree (`entry` elements are skipped, not kept).
#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "resourceType")]
    resource_type: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<Value>,
    entry: Option<Vec<IgnoredAny>>,
}

/// `.ndjson`/`.jsonl` are NDJSON, `.json` is one JSON document; anything else is a JSON document
/// when the whole file parses as one, NDJSON otherwise.
fn classify(path: &Path) -> Result<FileKind> {
    let read = || std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    match extension(path).as_deref() {
        Some("ndjson" | "jsonl") => count_lines(path).map(FileKind::Ndjson),
        Some("json") => Ok(classify_json(&read()?)),
        _ => {
            let bytes = read()?;
            if serde_json::from_slice::<IgnoredAny>(&bytes).is_ok() {
                Ok(classify_json(&bytes))
            } else {
                Ok(FileKind::Ndjson(bytes.split(|&b| b == b'\n').filter(|line| !is_blank(line)).count()))
            }
        }
    }
}

pub(crate) fn classify_json(bytes: &[u8]) -> FileKind {
    let shape: Shape = match serde_json::from_slice(bytes) {
        Ok(shape) => shape,
        Err(err) => return FileKind::Invalid(format!("not a JSON resource ({err})")),
    };
    match (shape.resource_type.as_ref().and_then(Value::as_str), shape.kind.as_ref().and_then(Value::as_str)) {
        (Some("Bundle"), Some("transaction" | "batch")) => FileKind::Bundle(shape.entry.map_or(0, |e| e.len())),
        (Some("Bundle"), kind) => FileKind::Invalid(format!(
            "a Bundle of type '{}': only transaction and batch Bundles can be loaded",
            kind.unwrap_or("(none)")
        )),
        (Some(_), _) => FileKind::Resource,
        (None, _) => FileKind::Invalid("not a FHIR resource (no resourceType)".into()),
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn count_lines(path: &Path) -> Result<usize> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut line = Vec::new();
    let mut count = 0;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            return Ok(count);
        }
        if !is_blank(&line) {
            count += 1;
        }
    }
}

/// The batch entry for one resource: `PUT Type/id` when it has an id, `POST Type` otherwise.
/// Checked here (JSON object, known resource type, valid id) so that one bad line cannot make the
/// server reject the whole batch it would travel in.
pub(crate) fn resource_entry(text: &[u8]) -> Result<Value, String> {
    let resource: Value = serde_json::from_slice(text).map_err(|err| format!("not valid JSON ({err})"))?;
    let Some(object) = resource.as_object() else { return Err("not a JSON object".into()) };
    let type_name = match object.get("resourceType") {
        Some(Value::String(name)) => name,
        Some(_) => return Err("resourceType is not a string".into()),
        None => return Err("no resourceType".into()),
    };
    let Some(resource_type) = ResourceType::parse(type_name) else {
        return Err(format!("unknown resourceType '{}'", excerpt(type_name, 64)));
    };
    let (method, url) = match object.get("id") {
        None => ("POST", resource_type.as_str().to_owned()),
        Some(Value::String(id)) => match LogicalId::parse(id) {
            Ok(id) => ("PUT", format!("{}/{}", resource_type.as_str(), id.as_str())),
            Err(_) => return Err(format!("id '{}' is not a valid FHIR id", excerpt(id, 64))),
        },
        Some(_) => return Err("id is not a string".into()),
    };
    Ok(json!({ "resource": resource, "request": { "method": method, "url": url } }))
}

/// At most `max` characters of `text`, with `…` when cut.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A batch Bundle of `entries`, labelled per entry.
fn batch(label: String, entries: Vec<Value>, entry_labels: Vec<String>) -> Work {
    let count = entries.len();
    let bundle = json!({ "resourceType": "Bundle", "type": "batch", "entry": entries });
    Work { label, body: Bytes::from(bundle.to_string()), entries: count, entry_labels: Some(entry_labels) }
}

/// What [`produce`] hands on: work for the workers, or an error of the input itself.
pub(crate) enum Produced {
    Work(Work),
    /// An error and how many planned resources it stands for (progress).
    Error(String, usize),
}

/// Reads the planned files in order and hands on their work, NDJSON in batches of `bundle_size`.
/// Stops early when `emit` answers false (nobody is listening any more).
pub(crate) fn produce(files: &[PlannedFile], bundle_size: usize, emit: &mut dyn FnMut(Produced) -> bool) {
    for file in files {
        let name = file.path.display().to_string();
        let keep_going = match &file.kind {
            FileKind::Invalid(reason) => emit(Produced::Error(format!("{name}: {reason}"), 0)),
            FileKind::Bundle(entries) => match std::fs::read(&file.path) {
                Ok(bytes) => emit(Produced::Work(Work {
                    label: name,
                    body: Bytes::from(bytes),
                    entries: *entries,
                    entry_labels: None,
                })),
                Err(err) => emit(Produced::Error(format!("{name}: cannot read: {err}"), *entries)),
            },
            FileKind::Resource => match std::fs::read(&file.path).map_err(|err| format!("cannot read: {err}")) {
                Ok(bytes) => match resource_entry(&bytes) {
                    Ok(entry) => emit(Produced::Work(batch(name.clone(), vec![entry], vec![name]))),
                    Err(reason) => emit(Produced::Error(format!("{name}: {reason}"), 1)),
                },
                Err(reason) => emit(Produced::Error(format!("{name}: {reason}"), 1)),
            },
            FileKind::Ndjson(lines) => produce_ndjson(&file.path, &name, *lines, bundle_size, emit),
        };
        if !keep_going {
            return;
        }
    }
}

fn produce_ndjson(
    path: &Path,
    name: &str,
    planned: usize,
    bundle_size: usize,
    emit: &mut dyn FnMut(Produced) -> bool,
) -> bool {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) => return emit(Produced::Error(format!("{name}: cannot read: {err}"), planned)),
    };
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut line = Vec::new();
    let mut number = 0usize;
    let mut done = 0usize;
    let mut entries = Vec::with_capacity(bundle_size);
    let mut labels = Vec::with_capacity(bundle_size);
    let mut first_line = 0;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => {
                let rest = planned.saturating_sub(done + entries.len());
                if !emit(Produced::Error(format!("{name}:{}: cannot read: {err}", number + 1), rest)) {
                    return false;
                }
                break;
            }
        }
        number += 1;
        if is_blank(&line) {
            continue;
        }
        match resource_entry(&line) {
            Ok(entry) => {
                if entries.is_empty() {
                    first_line = number;
                }
                entries.push(entry);
                labels.push(format!("{name}:{number}"));
            }
            Err(reason) => {
                done += 1;
                if !emit(Produced::Error(format!("{name}:{number}: {reason}"), 1)) {
                    return false;
                }
            }
        }
        if entries.len() >= bundle_size {
            done += entries.len();
            let label = format!("{name}:{first_line}-{number}");
            if !emit(Produced::Work(batch(label, std::mem::take(&mut entries), std::mem::take(&mut labels)))) {
                return false;
            }
        }
    }
    if entries.is_empty() {
        true
    } else {
        let label = format!("{name}:{first_line}-{number}");
        emit(Produced::Work(batch(label, entries, labels)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_for_resources() {
        let put = resource_entry(br#"{"resourceType":"Patient","id":"p-1"}"#).expect("entry");
        assert_eq!(put["request"], json!({"method": "PUT", "url": "Patient/p-1"}));
        let post = resource_entry(br#"{"resourceType":"Observation","status":"final"}"#).expect("entry");
        assert_eq!(post["request"], json!({"method": "POST", "url": "Observation"}));
        assert_eq!(post["resource"]["status"], "final");
        for (line, reason) in [
            (&br#"{"resourceType":"Patient""#[..], "not valid JSON"),
            (br#"[1,2]"#, "not a JSON object"),
            (br#"{"id":"x"}"#, "no resourceType"),
            (br#"{"resourceType":"Patient","id":"a/b"}"#, "is not a valid FHIR id"),
            (br#"{"resourceType":"Patient","id":7}"#, "id is not a string"),
            (br#"{"resourceType":"Nonsense"}"#, "unknown resourceType 'Nonsense'"),
        ] {
            let err = resource_entry(line).expect_err("rejected");
            assert!(err.contains(reason), "{err} should contain {reason}");
        }
    }

    #[test]
    fn classifies_json_documents() {
        let bundle = br#"{"resourceType":"Bundle","type":"transaction","entry":[{"a":1},{"b":[2]}]}"#;
        assert_eq!(classify_json(bundle), FileKind::Bundle(2));
        assert_eq!(classify_json(br#"{"resourceType":"Bundle","type":"batch"}"#), FileKind::Bundle(0));
        assert!(matches!(classify_json(br#"{"resourceType":"Bundle","type":"collection"}"#), FileKind::Invalid(_)));
        let observation = br#"{"resourceType":"Observation","type":{"text":"x"},"entry":[1]}"#;
        assert_eq!(classify_json(observation), FileKind::Resource);
        assert!(matches!(classify_json(b"{"), FileKind::Invalid(_)));
        assert!(matches!(classify_json(b"{\"a\":1}"), FileKind::Invalid(_)));
    }

    #[test]
    fn excerpts_cut_on_characters() {
        assert_eq!(excerpt("héllo", 10), "héllo");
        assert_eq!(excerpt("héllo", 2), "hé…");
    }
}
