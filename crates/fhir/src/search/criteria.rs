//! Criteria: a type-level search, `[type]?[parameters]`, that one resource alone can be matched
//! against — `Subscription.criteria` and Bulk Data `_typeFilter` both are one.
//!
//! Parsed by the search parser (strictly: an unknown parameter is an error, not ignored), so a
//! criteria means exactly what the same search means. Refused, by name: result parameters
//! (`_sort`, `_include`, …: they shape results, select nothing), chained parameters and `_has`
//! (they need other resources). Matched by extracting the resource's search values with the
//! indexer's extractor and evaluating the criteria with the reference evaluator the search
//! backends are tested against, over a corpus of that one resource.

use serde_json::Value;
use time::OffsetDateTime;

use crate::ResourceType;
use crate::outcome::{Issue, IssueType, clip};
use crate::search::IndexEntry;
use crate::search::SearchQuery;
use crate::search::evaluate::{Doc, matches};
use crate::search::extract::extract;
use crate::search::parse::{ParseOptions, parse_search};
use crate::search::query::{Criterion, SearchScope};

/// Parameters that shape a search's results rather than select resources (refused in criteria).
const RESULT_PARAMETERS: [&str; 9] =
    ["_sort", "_count", "_total", "_summary", "_elements", "_include", "_revinclude", "_contained", "_containedType"];

/// A parsed criteria (module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceCriteria {
    text: String,
    resource_type: ResourceType,
    query: SearchQuery,
}

impl ResourceCriteria {
    /// Parses `[type]?[parameters]`. `what` names the element in messages (e.g.
    /// `Subscription.criteria`); the issues carry no location, the caller adds it.
    pub fn parse(text: &str, what: &str) -> Result<ResourceCriteria, Vec<Issue>> {
        let text = text.trim();
        let (type_part, query) = text.split_once('?').unwrap_or((text, ""));
        let Some(resource_type) = ResourceType::parse(type_part) else {
            let message = if type_part.is_empty() || type_part.contains('/') {
                format!(
                    "{what} must be a type-level search '[type]?[parameters]' (like 'Observation?code=1234-5'), \
                     not '{}'",
                    clip(text)
                )
            } else {
                format!("{what} names an unknown resource type '{}'", clip(type_part))
            };
            return Err(vec![Issue::error(IssueType::Value, message)]);
        };
        let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let scope = SearchScope::Type(resource_type);
        let options = ParseOptions { strict: true, default_count: 1, max_count: 1 };

        let mut issues = Vec::new();
        let mut kept = Vec::new();
        for pair in params {
            let base = pair.0.split(':').next().unwrap_or_default();
            if RESULT_PARAMETERS.contains(&base) {
                let message =
                    format!("'{}' shapes search results and has no meaning in {what}; remove it", clip(&pair.0));
                issues.push(Issue::error(IssueType::NotSupported, message));
                continue;
            }
            if let Ok(single) = parse_search(&scope, std::slice::from_ref(&pair), &options)
                && single.criteria.iter().any(crosses_resources)
            {
                let kind = if base == "_has" { "reverse chaining (_has)" } else { "a chained parameter" };
                let message = format!(
                    "'{}' is {kind}, which {what} does not support: it is matched against one resource alone",
                    clip(&pair.0)
                );
                issues.push(Issue::error(IssueType::NotSupported, message));
                continue;
            }
            kept.push(pair);
        }
        match parse_search(&scope, &kept, &options) {
            Ok(query) if issues.is_empty() => Ok(ResourceCriteria { text: text.to_owned(), resource_type, query }),
            Ok(_) => Err(issues),
            Err(error) => {
                issues.extend(error.issues);
                Err(issues)
            }
        }
    }

    /// The criteria as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The resource type it selects.
    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    /// The parsed search (only `criteria` matters for matching).
    pub fn query(&self) -> &SearchQuery {
        &self.query
    }

    /// True when it can be decided from the resource's type and id alone (no criterion, or only
    /// `_id` criteria).
    pub fn decidable_without_body(&self) -> bool {
        self.query.criteria.iter().all(|criterion| match criterion {
            Criterion::Match(m) => m.chain.is_empty() && m.param == "_id",
            Criterion::Missing { chain, param, .. } => chain.is_empty() && param == "_id",
            Criterion::Has(_) | Criterion::AnyOf(_) => false,
        })
    }

    /// Whether `resource` (of this type) matches, with date criteria evaluated at `now`.
    pub fn matches(&self, resource: &Value, now: OffsetDateTime) -> bool {
        let id = resource.get("id").and_then(Value::as_str).unwrap_or_default();
        self.matches_extracted(id, extract(resource), now)
    }

    /// As [`ResourceCriteria::matches`], with the resource's values already extracted.
    pub fn matches_extracted(&self, id: &str, entries: Vec<IndexEntry>, now: OffsetDateTime) -> bool {
        let doc = Doc { resource_type: self.resource_type, id: id.to_owned(), entries };
        self.matches_doc(&doc, now)
    }

    /// As [`ResourceCriteria::matches`], on a document built once for several criteria.
    pub fn matches_doc(&self, doc: &Doc, now: OffsetDateTime) -> bool {
        let corpus = std::slice::from_ref(doc);
        self.query.criteria.iter().all(|criterion| matches(criterion, doc, corpus, now))
    }
}

/// Whether a criterion needs resources other than the one it is evaluated on.
fn crosses_resources(criterion: &Criterion) -> bool {
    match criterion {
        Criterion::Match(m) => !m.chain.is_empty(),
        Criterion::Missing { chain, .. } => !chain.is_empty(),
        Criterion::Has(_) => true,
        Criterion::AnyOf(alternatives) => alternatives.iter().any(crosses_resources),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: OffsetDateTime = time::macros::datetime!(2026-03-01 12:00 UTC);

    fn messages(issues: &[Issue]) -> Vec<String> {
        issues.iter().map(|i| i.diagnostics.clone()).collect()
    }

    #[test]
    fn a_criteria_matches_what_its_search_would_find() {
        let criteria = ResourceCriteria::parse("Observation?code=http://loinc.org|1234-5&status=final", "x")
            .expect("valid criteria");
        assert_eq!(criteria.resource_type().as_str(), "Observation");
        let observation = |code: &str, status: &str| {
            json!({"resourceType": "Observation", "id": "o1", "status": status,
                   "code": {"coding": [{"system": "http://loinc.org", "code": code}]}})
        };
        assert!(criteria.matches(&observation("1234-5", "final"), NOW));
        assert!(!criteria.matches(&observation("1234-5", "preliminary"), NOW));
        assert!(!criteria.matches(&observation("9999-9", "final"), NOW));
        assert!(!criteria.decidable_without_body());
        let by_id = ResourceCriteria::parse("Observation?_id=o1", "x").expect("valid");
        assert!(by_id.decidable_without_body());
        assert!(
            ResourceCriteria::parse("Patient", "x").expect("valid").matches(&json!({"resourceType": "Patient"}), NOW)
        );
    }

    #[test]
    fn what_one_resource_cannot_answer_is_refused_by_name() {
        let refused = |text: &str| messages(&ResourceCriteria::parse(text, "_typeFilter").expect_err(text));
        assert!(refused("Observation?subject:Patient.name=x")[0].contains("chained parameter"));
        assert!(refused("Patient?_has:Observation:subject:code=x")[0].contains("_has"));
        assert!(refused("Patient?_sort=name")[0].contains("shapes search results"));
        assert!(refused("Patient?nonsense=1")[0].contains("nonsense"));
        assert!(refused("Nothing?x=1")[0].contains("unknown resource type 'Nothing'"));
        assert!(refused("Patient/1")[0].contains("_typeFilter must be a type-level search"));
    }
}
