//! The CapabilityStatement, generated from what this deployment really enables.

use std::collections::HashSet;

use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::search::extract::unsupported_expressions;
use fhirmesh_fhir::search::{ParamType, registry};
use serde_json::{Value, json};

/// What the running server offers; the composition root fills it from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub software_name: String,
    pub software_version: String,
    /// Absolute base URL of the FHIR endpoint, when known.
    pub base_url: Option<String>,
    pub update_create: bool,
    pub conditional_delete_multiple: bool,
    /// How callers authenticate (`rest.security`).
    pub security: Security,
    /// Bulk Data `$export` is served (system, Patient and Group level).
    pub bulk_export: bool,
    /// The profiles of the loaded IG packages, by the resource type they constrain
    /// (`supportedProfile`): resources claiming them are validated against them.
    pub profiles: std::collections::BTreeMap<String, Vec<String>>,
}

/// `CapabilityStatement.rest.security`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Security {
    /// `auth.mode = "none"`: anyone who reaches the server may do anything.
    #[default]
    None,
    /// Bearer JWTs, authorized by RBAC groups.
    Rbac,
    /// SMART on FHIR scopes; the authorization server's endpoints when configured.
    Smart { authorize: Option<String>, token: Option<String> },
}

impl Security {
    fn to_json(&self) -> Value {
        let service = |code: &str, display: &str| {
            json!([{ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": code, "display": display }] }])
        };
        match self {
            Security::None => json!({
                "cors": false,
                "description": "NO AUTHENTICATION (auth.mode = none): every caller may read and write \
                                everything. For a laptop or a test only."
            }),
            Security::Rbac => json!({
                "cors": false,
                "service": service("OAuth", "OAuth"),
                "description": "Bearer JWTs verified against a JWKS; access by group (role-based)."
            }),
            Security::Smart { authorize, token } => {
                let mut uris = Vec::new();
                if let Some(url) = authorize {
                    uris.push(json!({ "url": "authorize", "valueUri": url }));
                }
                if let Some(url) = token {
                    uris.push(json!({ "url": "token", "valueUri": url }));
                }
                let mut security = json!({
                    "cors": true,
                    "service": service("SMART-on-FHIR", "SMART-on-FHIR"),
                    "description": "SMART on FHIR: scopes v1 and v2, patient launch context."
                });
                if !uris.is_empty() {
                    security["extension"] = json!([{
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": uris
                    }]);
                }
                security
            }
        }
    }
}

/// Interactions every resource type supports.
const TYPE_INTERACTIONS: &[&str] =
    &["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"];

/// Search parameters this server cannot evaluate: no FHIRPath expression (`_text`, `_content`,
/// `_query`), `special` ones, and expressions the extractor does not compile.
fn unsupported_search_params() -> HashSet<String> {
    let mut urls: HashSet<String> = unsupported_expressions().into_iter().map(|(url, _)| url.to_owned()).collect();
    urls.extend(
        registry()
            .all()
            .iter()
            .filter(|def| def.kind == ParamType::Special || def.expression.is_none())
            .map(|def| def.url.clone()),
    );
    urls
}

fn search_params(rt: ResourceType, unsupported: &HashSet<String>) -> (Vec<Value>, Vec<String>) {
    let mut supported = Vec::new();
    let mut missing = Vec::new();
    for def in registry().for_type(rt) {
        if unsupported.contains(&def.url) {
            missing.push(def.code.clone());
        } else {
            supported.push(json!({ "name": def.code, "definition": def.url, "type": def.kind.as_str() }));
        }
    }
    (supported, missing)
}

pub fn capability_statement(caps: &Capabilities, now: &str) -> Value {
    let unsupported = unsupported_search_params();
    let resources: Vec<Value> = ResourceType::all()
        .iter()
        .map(|rt| {
            let (search_params, missing) = search_params(*rt, &unsupported);
            let mut resource = json!({
                "type": rt.as_str(),
                "interaction": TYPE_INTERACTIONS.iter().map(|code| json!({ "code": code })).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": caps.update_create,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": if caps.conditional_delete_multiple { "multiple" } else { "single" },
                "searchInclude": ["*"],
                "searchRevInclude": ["*"],
                "searchParam": search_params,
            });
            if !missing.is_empty() {
                resource["documentation"] = json!(format!("Search parameters not supported: {}.", missing.join(", ")));
            }
            let mut operations =
                vec![json!({ "name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate" })];
            if caps.bulk_export {
                let definition = match rt.as_str() {
                    "Patient" => Some("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"),
                    "Group" => Some("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"),
                    _ => None,
                };
                if let Some(definition) = definition {
                    operations.push(json!({ "name": "export", "definition": definition }));
                }
            }
            resource["operation"] = Value::Array(operations);
            if let Some(profiles) = caps.profiles.get(rt.as_str()).filter(|p| !p.is_empty()) {
                resource["supportedProfile"] = json!(profiles);
            }
            resource
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
            "security": caps.security.to_json(),
            "resource": resources,
            "interaction": [{ "code": "history-system" }, { "code": "search-system" }],
        }]
    });
    if let Some(url) = &caps.base_url {
        statement["implementation"]["url"] = json!(url);
    }
    if caps.bulk_export {
        statement["instantiates"] = json!(["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]);
        statement["rest"][0]["operation"] =
            json!([{ "name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export" }]);
    }
    statement
}

/// `/.well-known/smart-configuration` (SMART App Launch 2.0): what this resource server supports,
/// with the authorization server's endpoints when configured.
pub fn smart_configuration(
    issuer: Option<&str>,
    authorize: Option<&str>,
    token: Option<&str>,
    jwks_uri: Option<&str>,
) -> Value {
    let mut document = json!({
        "issuer": issuer,
        "authorization_endpoint": authorize,
        "token_endpoint": token,
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "scopes_supported": ["openid", "fhirUser", "launch/patient", "offline_access",
                             "patient/*.rs", "user/*.cruds", "system/*.cruds",
                             "patient/*.read", "user/*.read", "user/*.write", "system/*.read", "system/*.write"],
        "response_types_supported": ["code"],
        "capabilities": ["launch-standalone", "client-public", "client-confidential-symmetric",
                         "client-confidential-asymmetric", "context-standalone-patient", "permission-patient",
                         "permission-user", "permission-v1", "permission-v2"],
        "code_challenge_methods_supported": ["S256"]
    });
    if let Some(url) = jwks_uri {
        document["jwks_uri"] = json!(url);
    }
    document
}
