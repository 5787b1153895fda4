//! The CapabilityStatement, generated from what this deployment really enables.

use fhirmesh_fhir::ResourceType;
use serde_json::{Value, json};

/// What the running server offers; the composition root fills it from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub software_name: String,
    pub software_version: String,
    /// Absolute base URL of the FHIR endpoint, when known.
    pub base_url: Option<String>,
    pub update_create: bool,
}

/// Interactions every resource type supports.
const TYPE_INTERACTIONS: &[&str] =
    &["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"];

pub fn capability_statement(caps: &Capabilities, now: &str) -> Value {
    let resources: Vec<Value> = ResourceType::all()
        .iter()
        .map(|rt| {
            json!({
                "type": rt.as_str(),
                "interaction": TYPE_INTERACTIONS.iter().map(|code| json!({ "code": code })).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": caps.update_create,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": [
                    { "name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id" },
                    { "name": "identifier", "type": "token", "documentation": "identifier=[system]|value on the resource's top-level identifier" }
                ]
            })
        })
        .collect();
    let mut statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now,
        "kind": "instance",
        "software": { "name": caps.software_name, "version": caps.software_version },
        "implementation": { "description": "fhirmesh FHIR R4 server" },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{ "code": "history-system" }],
        }]
    });
    if let Some(url) = &caps.base_url {
        statement["implementation"]["url"] = json!(url);
    }
    statement
}
