//! Matching resources by `_id` and `identifier`: what conditional create and the interim search
//! need until the search index (issue 3) serves every search parameter.

use std::collections::BTreeMap;

use fhirmesh_fhir::{LogicalId, ResourceType};

use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::model::{ResourceVersion, TenantId};
use crate::ports::DynResourceStore;

/// A parsed `identifier` token: `[system]|value` or `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdentifierToken {
    pub system: Option<String>,
    pub value: String,
}

/// Criteria the interim matcher understands (all must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Criteria {
    pub ids: Vec<LogicalId>,
    pub identifiers: Vec<IdentifierToken>,
}

impl Criteria {
    /// Parses decoded `name=value` pairs; `ignored` names (such as `_count`) are skipped.
    pub fn parse(params: &[(String, String)], ignored: &[&str]) -> FhirResult<Criteria> {
        let mut criteria = Criteria::default();
        for (name, value) in params {
            match name.as_str() {
                "_id" => {
                    let id = LogicalId::parse(value)
                        .map_err(|_| FhirError::invalid(format!("_id '{value}' is not a valid FHIR id")))?;
                    criteria.ids.push(id);
                }
                "identifier" => criteria.identifiers.push(parse_identifier(value)?),
                other if ignored.contains(&other) => {}
                other => {
                    return Err(FhirError::new(
                        ErrorCategory::Unsupported,
                        format!(
                            "search parameter '{other}' is not supported yet: only _id and identifier are (full search is coming)"
                        ),
                    ));
                }
            }
        }
        Ok(criteria)
    }

    /// Parses an `If-None-Exist` header value (a query string without the leading `?`).
    pub fn parse_query(query: &str) -> FhirResult<Criteria> {
        let params: Vec<(String, String)> = form_pairs(query.strip_prefix('?').unwrap_or(query));
        if params.is_empty() {
            return Err(FhirError::invalid("If-None-Exist must carry search parameters, e.g. identifier=system|value"));
        }
        Criteria::parse(&params, &[])
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.identifiers.is_empty()
    }

    /// Live resources matching every criterion, at most `limit` (ordered by id).
    pub async fn matches(
        &self,
        store: &DynResourceStore,
        tenant: &TenantId,
        resource_type: ResourceType,
        limit: usize,
    ) -> FhirResult<Vec<ResourceVersion>> {
        // Candidates from the most selective criterion, then filter by the others.
        let mut candidates: BTreeMap<String, ResourceVersion> = BTreeMap::new();
        if let Some(first) = self.ids.first() {
            if let Some(found) = store.read(tenant, resource_type, first).await?
                && !found.is_deleted()
            {
                candidates.insert(found.id.as_str().to_owned(), found);
            }
        } else if let Some(first) = self.identifiers.first() {
            // Ask for more than the limit: later criteria may filter some out.
            let found = store
                .find_by_identifier(
                    tenant,
                    resource_type,
                    first.system.as_deref(),
                    &first.value,
                    limit.saturating_mul(4).max(64),
                )
                .await?;
            for version in found {
                candidates.insert(version.id.as_str().to_owned(), version);
            }
        }
        let survivors = candidates
            .into_values()
            .filter(|v| self.ids.iter().all(|id| id == &v.id))
            .filter(|v| self.identifiers.iter().all(|token| has_identifier(v, token)))
            .take(limit)
            .collect();
        Ok(survivors)
    }
}

fn parse_identifier(value: &str) -> FhirResult<IdentifierToken> {
    let token = match value.split_once('|') {
        Some((system, value)) => {
            IdentifierToken { system: Some(system.to_owned()).filter(|s| !s.is_empty()), value: value.to_owned() }
        }
        None => IdentifierToken { system: None, value: value.to_owned() },
    };
    if token.value.is_empty() {
        return Err(FhirError::invalid(format!("identifier '{value}' has no value (expected [system]|value)")));
    }
    Ok(token)
}

fn has_identifier(version: &ResourceVersion, token: &IdentifierToken) -> bool {
    let Some(body) = &version.body else { return false };
    let Ok(resource) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    let Some(identifiers) = resource.get("identifier") else { return false };
    let list: Vec<&serde_json::Value> = match identifiers {
        serde_json::Value::Array(items) => items.iter().collect(),
        single => vec![single],
    };
    list.iter().any(|identifier| {
        identifier.get("value").and_then(|v| v.as_str()) == Some(token.value.as_str())
            && token
                .system
                .as_deref()
                .is_none_or(|system| identifier.get("system").and_then(|s| s.as_str()) == Some(system))
    })
}

/// Decodes `a=b&c=d` (application/x-www-form-urlencoded).
pub(crate) fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).into_owned().collect()
}
