//! SMART App Launch scopes, v1 and v2, into grants.
//!
//! - v1: `patient|user|system/(Type|*).(read|write|*)`. `read` is v2's `rs`, `write` is `cud`,
//!   `*` is `cruds`.
//! - v2: `patient|user|system/(Type|*).[c][r][u][d][s]` — letters in that order, at least one —
//!   with an optional `?param=value&…` query that limits the grant to matching resources.
//!
//! The letters grant: `c` create; `r` read, vread and history-instance; `u` update and patch
//! (an update that creates is still an update); `d` delete; `s` search-type and history-type, and on
//! `*` also search-system and history-system. Every resource scope also grants `operation` on its
//! types: the operation handler checks further.
//!
//! `patient/` scopes are limited to the launch patient's compartment; `user/` and `system/` scopes
//! are not limited (the user's own permissions are not modelled here).
//!
//! Scopes that are not resource scopes (`openid`, `fhirUser`, `profile`, `launch`,
//! `launch/patient`, `offline_access`, `online_access`, and anything else) grant nothing and are
//! ignored. So are malformed resource scopes: an unknown context, an unknown resource type, unknown
//! or out-of-order letters (`.xyz`, `.sr`, `.rr`), a query on a v1 scope, or a query that is not
//! `name=value` pairs. A token is refused only when nothing usable is left, or when it holds a
//! well-formed `patient/` or `user/` scope without the claim that scope needs.

use fhirmesh_fhir::ResourceType;
use serde::{Deserialize, Serialize};

use super::{Grant, Interaction, Principal};
use crate::error::FhirError;

/// How SMART scopes are honoured (from config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmartOptions {
    /// A token with a `user/` scope must carry `fhirUser`, else it is refused (default true).
    /// When false, `user/` scopes are honoured without it.
    pub user_scopes_need_fhir_user: bool,
    /// A token with a `patient/` scope must carry a patient launch context, else it is refused
    /// (default true). When false, `patient/` scopes without one are ignored: there is no
    /// compartment to limit them to.
    pub patient_scopes_need_patient: bool,
}

impl Default for SmartOptions {
    fn default() -> Self {
        SmartOptions { user_scopes_need_fhir_user: true, patient_scopes_need_patient: true }
    }
}

impl SmartOptions {
    /// The grants of `principal`'s scopes; forbidden when the token cannot be used at all.
    pub(super) fn grants_for(&self, principal: &Principal) -> Result<Vec<Grant>, FhirError> {
        let launch_patient = principal.patient.as_deref().filter(|patient| !patient.is_empty());
        let has_fhir_user = principal.fhir_user.as_deref().is_some_and(|user| !user.is_empty());
        let mut grants: Vec<Grant> = Vec::new();
        let scopes = principal.scopes.iter().flat_map(|entry| entry.split_whitespace());
        for scope in scopes.filter_map(ResourceScope::parse) {
            let patient = match scope.context {
                Context::Patient => match launch_patient {
                    Some(patient) => Some(patient.to_owned()),
                    None if self.patient_scopes_need_patient => {
                        return Err(FhirError::forbidden("patient/ scopes need a patient launch context"));
                    }
                    None => continue,
                },
                Context::User if !has_fhir_user && self.user_scopes_need_fhir_user => {
                    return Err(FhirError::forbidden("user/ scopes need a fhirUser claim"));
                }
                Context::User | Context::System => None,
            };
            let grant = Grant {
                resource_type: scope.resource_type,
                interactions: scope.interactions,
                patient,
                filter: scope.filter,
            };
            if !grants.contains(&grant) {
                grants.push(grant);
            }
        }
        if grants.is_empty() {
            return Err(FhirError::forbidden("the access token holds no usable resource scope"));
        }
        Ok(grants)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Patient,
    User,
    System,
}

/// One well-formed resource scope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResourceScope {
    context: Context,
    /// `None`: `*`.
    resource_type: Option<ResourceType>,
    interactions: Vec<Interaction>,
    /// Percent-decoded `(param, value)` pairs of the v2 query; empty without one.
    filter: Vec<(String, String)>,
}

impl ResourceScope {
    /// `None` for anything that is not a well-formed resource scope.
    fn parse(scope: &str) -> Option<ResourceScope> {
        let (context, rest) = scope.split_once('/')?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return None,
        };
        let (body, query) = match rest.split_once('?') {
            Some((body, query)) => (body, Some(query)),
            None => (rest, None),
        };
        let (resource_type, permissions) = body.split_once('.')?;
        let resource_type = match resource_type {
            "*" => None,
            name => Some(ResourceType::parse(name)?),
        };
        let (letters, v1) = Letters::parse(permissions)?;
        let filter = match query {
            None => Vec::new(),
            Some(_) if v1 => return None,
            Some(query) => parse_query(query)?,
        };
        Some(ResourceScope {
            context,
            resource_type,
            interactions: letters.interactions(resource_type.is_none()),
            filter,
        })
    }
}

/// The v2 permission letters of a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Letters {
    create: bool,
    read: bool,
    update: bool,
    delete: bool,
    search: bool,
}

impl Letters {
    const ALL: Letters = Letters { create: true, read: true, update: true, delete: true, search: true };

    /// The letters of v1 `read|write|*` (then `true`: v1) or of v2 `[c][r][u][d][s]`.
    fn parse(permissions: &str) -> Option<(Letters, bool)> {
        let v1 = match permissions {
            "read" => Letters { read: true, search: true, ..Letters::default() },
            "write" => Letters { create: true, update: true, delete: true, ..Letters::default() },
            "*" => Letters::ALL,
            _ => return Letters::parse_v2(permissions).map(|letters| (letters, false)),
        };
        Some((v1, true))
    }

    fn parse_v2(permissions: &str) -> Option<Letters> {
        const ORDER: &[u8] = b"cruds";
        let mut letters = Letters::default();
        let mut next = 0;
        for letter in permissions.bytes() {
            next += ORDER.get(next..)?.iter().position(|&candidate| candidate == letter)? + 1;
            match letter {
                b'c' => letters.create = true,
                b'r' => letters.read = true,
                b'u' => letters.update = true,
                b'd' => letters.delete = true,
                b's' => letters.search = true,
                _ => return None,
            }
        }
        (letters != Letters::default()).then_some(letters)
    }

    /// The interactions these letters grant, in [`Interaction::ALL`] order.
    fn interactions(self, every_type: bool) -> Vec<Interaction> {
        let granted = |interaction: &Interaction| match interaction {
            Interaction::Create => self.create,
            Interaction::Read | Interaction::Vread | Interaction::HistoryInstance => self.read,
            Interaction::Update | Interaction::Patch => self.update,
            Interaction::Delete => self.delete,
            Interaction::SearchType | Interaction::HistoryType => self.search,
            Interaction::SearchSystem | Interaction::HistorySystem => self.search && every_type,
            Interaction::Operation => true,
            Interaction::Transaction | Interaction::Batch => false,
        };
        Interaction::ALL.into_iter().filter(granted).collect()
    }
}

/// `name=value&…`, each name and value non-empty, percent-decoded.
fn parse_query(query: &str) -> Option<Vec<(String, String)>> {
    let well_formed = !query.is_empty()
        && query
            .split('&')
            .all(|pair| pair.split_once('=').is_some_and(|(name, value)| !name.is_empty() && !value.is_empty()));
    well_formed.then(|| form_urlencoded::parse(query.as_bytes()).into_owned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interactions(scope: &str) -> Option<Vec<&'static str>> {
        ResourceScope::parse(scope).map(|s| s.interactions.iter().map(|i| i.as_str()).collect())
    }

    #[test]
    fn v1_and_v2_letters_map_to_interactions() {
        assert_eq!(
            interactions("patient/Observation.read"),
            Some(vec!["read", "vread", "history-instance", "history-type", "search-type", "operation"])
        );
        assert_eq!(interactions("patient/Observation.read"), interactions("patient/Observation.rs"));
        assert_eq!(interactions("user/Patient.write"), interactions("user/Patient.cud"));
        assert_eq!(interactions("user/Patient.*"), interactions("user/Patient.cruds"));
        assert_eq!(interactions("user/Patient.write"), Some(vec!["create", "update", "patch", "delete", "operation"]));
        assert_eq!(interactions("system/Patient.c"), Some(vec!["create", "operation"]));
        assert_eq!(
            interactions("system/*.s"),
            Some(vec!["history-type", "history-system", "search-type", "search-system", "operation"])
        );
    }

    #[test]
    fn contexts_types_and_wildcards() {
        let scope = ResourceScope::parse("user/*.cruds").expect("well-formed");
        assert_eq!(scope.context, Context::User);
        assert_eq!(scope.resource_type, None);
        let scope = ResourceScope::parse("system/Claim.r").expect("well-formed");
        assert_eq!(scope.context, Context::System);
        assert_eq!(scope.resource_type, ResourceType::parse("Claim"));
    }

    #[test]
    fn malformed_and_non_resource_scopes_parse_to_nothing() {
        for scope in [
            "openid",
            "fhirUser",
            "profile",
            "launch",
            "launch/patient",
            "offline_access",
            "online_access",
            "",
            "patient/",
            "patient/Observation",
            "patient/Observation.",
            "patient/Observation.xyz",
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.rsx",
            "patient/Observation.READ",
            "patient/Nope.read",
            "patient/observation.read",
            "patient/Resource.read",
            "Patient/Observation.read",
            "practitioner/Observation.read",
            "patient/Observation.rs.x",
            "patient/Observation.read?category=laboratory",
            "patient/Observation.rs?",
            "patient/Observation.rs?category",
            "patient/Observation.rs?category=",
            "patient/Observation.rs?=laboratory",
            "patient/Observation.rs?category=laboratory&",
        ] {
            assert_eq!(ResourceScope::parse(scope), None, "{scope:?}");
        }
    }

    #[test]
    fn v2_query_is_split_and_percent_decoded() {
        let scope = ResourceScope::parse(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory&status=final%2Camended",
        )
        .expect("well-formed");
        assert_eq!(
            scope.filter,
            vec![
                (
                    "category".to_owned(),
                    "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_owned()
                ),
                ("status".to_owned(), "final,amended".to_owned()),
            ]
        );
    }
}
