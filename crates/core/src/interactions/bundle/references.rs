//! Rewriting references inside a transaction's resources: `urn:uuid:`/`urn:oid:` and other
//! `fullUrl`s to the `Type/id` the transaction gave them, conditional references (`Type?…`) to the
//! one resource they match — in every `Reference.reference` (nested, in extensions, in contained
//! resources) and in the narrative's `href`/`src` links (R4 http.html#trules).

use serde_json::Value;

/// Where a rewrite failed: the element path inside the resource and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RewriteError {
    pub path: String,
    pub message: String,
}

/// Calls `resolve` with every reference string of `resource` (and every narrative link) and
/// replaces it with what `resolve` returns (`Ok(None)`: keep it). `resolve` only sees values that
/// might be rewritten: it decides.
pub(super) fn rewrite(
    resource: &mut Value,
    resolve: &mut impl FnMut(&str) -> Result<Option<String>, String>,
) -> Result<(), RewriteError> {
    let mut path = Vec::new();
    walk(resource, &mut path, resolve)
}

/// A conditional reference (`Patient?identifier=…`): a type name followed by a query.
pub(super) fn is_conditional(reference: &str) -> bool {
    reference.split_once('?').is_some_and(|(type_name, _)| fhirmesh_fhir::ResourceType::parse(type_name).is_some())
}

/// A reference that only means something inside the Bundle.
pub(super) fn is_bundle_local(reference: &str) -> bool {
    reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:")
}

fn walk(
    value: &mut Value,
    path: &mut Vec<String>,
    resolve: &mut impl FnMut(&str) -> Result<Option<String>, String>,
) -> Result<(), RewriteError> {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                path.push(key.clone());
                match (key.as_str(), child) {
                    ("reference", Value::String(reference)) => {
                        if let Some(new) = resolve(reference).map_err(|message| error(path, message))? {
                            *reference = new;
                        }
                    }
                    ("div", Value::String(div)) if path.len() >= 2 && path[path.len() - 2] == "text" => {
                        if let Some(new) = rewrite_links(div, resolve).map_err(|message| error(path, message))? {
                            *div = new;
                        }
                    }
                    (_, child) => walk(child, path, resolve)?,
                }
                path.pop();
            }
            Ok(())
        }
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                let last = path.pop().unwrap_or_default();
                path.push(format!("{last}[{index}]"));
                let result = walk(item, path, resolve);
                path.pop();
                path.push(last);
                result?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn error(path: &[String], message: String) -> RewriteError {
    RewriteError { path: path.join("."), message }
}

/// The narrative with every `href="…"`/`src="…"` value `resolve` maps replaced; `None` when
/// nothing changed.
fn rewrite_links(
    div: &str,
    resolve: &mut impl FnMut(&str) -> Result<Option<String>, String>,
) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(div.len());
    let mut changed = false;
    let mut rest = div;
    while let Some(at) = find_link(rest) {
        let (before, after) = rest.split_at(at);
        out.push_str(before);
        let Some(end) = after.find('"') else { break };
        let link = &after[..end];
        match resolve(link)? {
            Some(new) => {
                out.push_str(&new);
                changed = true;
            }
            None => out.push_str(link),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

/// The offset just after the next `href="` or `src="`.
fn find_link(text: &str) -> Option<usize> {
    ["href=\"", "src=\""].iter().filter_map(|attribute| text.find(attribute).map(|at| at + attribute.len())).min()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(reference: &str) -> Result<Option<String>, String> {
        match reference {
            "urn:uuid:p" => Ok(Some("Patient/1".into())),
            "Organization?identifier=x|1" => Ok(Some("Organization/9".into())),
            other if is_bundle_local(other) => Err(format!("{other} is not in the bundle")),
            _ => Ok(None),
        }
    }

    #[test]
    fn rewrites_everywhere_references_live() {
        let mut resource = json!({
            "resourceType": "Observation",
            "subject": {"reference": "urn:uuid:p"},
            "performer": [{"reference": "Organization?identifier=x|1"}, {"reference": "Practitioner/7"}],
            "extension": [{"url": "http://x", "valueReference": {"reference": "urn:uuid:p"}}],
            "contained": [{"resourceType": "Provenance", "target": [{"reference": "urn:uuid:p"}]}],
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\"urn:uuid:p\">p</a> <a href=\"http://x\">x</a></div>"}
        });
        rewrite(&mut resource, &mut map).expect("rewritten");
        assert_eq!(resource["subject"]["reference"], "Patient/1");
        assert_eq!(resource["performer"][0]["reference"], "Organization/9");
        assert_eq!(resource["performer"][1]["reference"], "Practitioner/7");
        assert_eq!(resource["extension"][0]["valueReference"]["reference"], "Patient/1");
        assert_eq!(resource["contained"][0]["target"][0]["reference"], "Patient/1");
        assert_eq!(
            resource["text"]["div"],
            "<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\"Patient/1\">p</a> <a href=\"http://x\">x</a></div>"
        );
    }

    #[test]
    fn an_unresolvable_local_reference_names_its_path() {
        let mut resource =
            json!({"resourceType": "Encounter", "participant": [{"individual": {"reference": "urn:uuid:gone"}}]});
        let err = rewrite(&mut resource, &mut map).expect_err("unresolvable");
        assert_eq!(err.path, "participant[0].individual.reference");
        assert!(err.message.contains("urn:uuid:gone"));
    }

    #[test]
    fn classifies_references() {
        assert!(is_conditional("Patient?identifier=a|b"));
        assert!(!is_conditional("Patient/1"));
        assert!(!is_conditional("http://x/y?z"));
        assert!(is_bundle_local("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"));
        assert!(is_bundle_local("urn:oid:1.2.3"));
        assert!(!is_bundle_local("Patient/1"));
    }
}
