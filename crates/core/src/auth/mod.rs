//! Authorization decisions: which interactions on which resource types a caller may perform.
//!
//! Pure policy, no I/O. The gateway authenticates a token into a [`Principal`] and turns it, with
//! the configured [`AccessPolicy`], into an [`Access`] once per request ([`Access::for_principal`]);
//! the `Access` travels with the request (as JSON over gRPC) to the resource service, which asks
//! [`Access::check`] before every interaction — and before every entry of a transaction or batch.
//!
//! Two policies grant access: SMART App Launch scopes (v1 and v2, see `scopes.rs`) and FHIR Works
//! on AWS style group rules (see `rbac.rs`). Both compile to the same list of grants, so there is one
//! decision procedure:
//!
//! - a type-level interaction (`read` … `delete`, `search-type`, `history-type`) on type `T` is
//!   permitted by the grants naming that interaction on `T` or on every type (`*`);
//! - `search-system`, `history-system` and a system-level `operation` (no type) need a grant of that
//!   interaction on every type (`*`); an `operation` on a type needs `operation` granted on it
//!   (every SMART resource scope grants it, group rules must list it);
//! - `transaction` and `batch` are permitted when the caller holds any grant at all: the Bundle
//!   itself reveals nothing, and the caller must check every entry as its own interaction;
//! - when several grants permit the same check, the broadest wins (see [`Permit`]).
//!
//! What it is not: authentication (token verification is the gateway's), and the enforcement of a
//! [`Permit`] on data (compartment membership, search filters) — that is the caller's, which knows
//! the resources.

mod rbac;
mod scopes;

#[cfg(test)]
mod tests;

use std::fmt;

use fhirmesh_fhir::ResourceType;
use serde::{Deserialize, Serialize};

use crate::error::FhirError;

pub use rbac::{GroupRule, InteractionPattern, RbacRules};
pub use scopes::SmartOptions;

/// Who is calling, as the gateway authenticated them (from JWT claims).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Principal {
    /// `sub`.
    pub subject: String,
    /// `fhirUser`, e.g. `Practitioner/123` or a full URL ending in `Type/id`.
    pub fhir_user: Option<String>,
    /// `client_id` / `azp`.
    pub client_id: Option<String>,
    /// Group names, e.g. from `cognito:groups`.
    pub groups: Vec<String>,
    /// Raw SMART scope strings (from `scope` / `scp`). An entry holding several space-separated
    /// scopes is split.
    pub scopes: Vec<String>,
    /// The launch context patient id (claim `patient` or `launch_response_patient`).
    pub patient: Option<String>,
    /// The tenant claim, if any.
    pub tenant: Option<String>,
}

/// One FHIR interaction as authorization sees it. The names are those of FHIR's
/// `TypeRestfulInteraction` / `SystemRestfulInteraction` codes, plus `operation` for `$name` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interaction {
    Read,
    Vread,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    SearchType,
    SearchSystem,
    Create,
    Update,
    Patch,
    Delete,
    Transaction,
    Batch,
    Operation,
}

impl Interaction {
    pub const ALL: [Interaction; 14] = [
        Interaction::Read,
        Interaction::Vread,
        Interaction::HistoryInstance,
        Interaction::HistoryType,
        Interaction::HistorySystem,
        Interaction::SearchType,
        Interaction::SearchSystem,
        Interaction::Create,
        Interaction::Update,
        Interaction::Patch,
        Interaction::Delete,
        Interaction::Transaction,
        Interaction::Batch,
        Interaction::Operation,
    ];

    /// The kebab-case name, as in serde and in RBAC rules (`history-instance`).
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::Transaction => "transaction",
            Interaction::Batch => "batch",
            Interaction::Operation => "operation",
        }
    }

    pub fn parse(name: &str) -> Option<Interaction> {
        Interaction::ALL.into_iter().find(|interaction| interaction.as_str() == name)
    }
}

impl fmt::Display for Interaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How requests are authorized (from config).
#[derive(Debug, Clone)]
pub enum AccessPolicy {
    /// `auth = none`: every authenticated (or anonymous) caller may do everything.
    Open,
    /// Group rules, FHIR Works on AWS style.
    Rbac(RbacRules),
    /// SMART App Launch scopes.
    Smart(SmartOptions),
}

/// What a granted check allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permit {
    /// Everything of that type.
    All,
    /// Only resources in this Patient's compartment (SMART `patient/` scopes): the caller must
    /// filter searches and check instances.
    PatientCompartment { patient: String },
    /// Only resources matching these search parameters (SMART v2 `?param=value` scopes): a list of
    /// alternatives (ORed), each a list of percent-decoded `(param, value)` pairs that must all
    /// match, plus an optional patient compartment that applies to every alternative. A caller that
    /// cannot evaluate a parameter must deny.
    Filtered { alternatives: Vec<Vec<(String, String)>>, patient: Option<String> },
}

/// The grants of one request, computed once per request from policy and principal
/// ([`Access::for_principal`]) and serialized to travel with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    principal: Option<Principal>,
    /// Required when deserializing: a missing field must not mean "unrestricted".
    grants: Grants,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Grants {
    Unrestricted,
    Listed(Vec<Grant>),
}

/// Some interactions on one resource type (or every type), possibly limited to a patient's
/// compartment and/or to resources matching search parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Grant {
    /// `None`: every type, serialized as `"*"`.
    #[serde(rename = "type", with = "any_type")]
    resource_type: Option<ResourceType>,
    interactions: Vec<Interaction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patient: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    filter: Vec<(String, String)>,
}

impl Grant {
    fn unlimited(resource_type: Option<ResourceType>, interactions: Vec<Interaction>) -> Grant {
        Grant { resource_type, interactions, patient: None, filter: Vec::new() }
    }

    fn grants(&self, interaction: Interaction) -> bool {
        self.interactions.contains(&interaction)
    }

    fn covers(&self, resource_type: ResourceType) -> bool {
        self.resource_type.is_none_or(|own| own == resource_type)
    }
}

impl Access {
    /// Everything is permitted: `auth = none`, and internal callers (indexer, relay, tools).
    pub fn unrestricted() -> Access {
        Access { principal: None, grants: Grants::Unrestricted }
    }

    /// The grants `policy` gives `principal`. Forbidden when the token cannot be used at all: a
    /// SMART `patient/` scope without a patient launch context or a `user/` scope without
    /// `fhirUser` (unless [`SmartOptions`] relaxes it), no usable scope, or no group with rules.
    pub fn for_principal(policy: &AccessPolicy, principal: &Principal) -> Result<Access, FhirError> {
        let grants = match policy {
            AccessPolicy::Open => Grants::Unrestricted,
            AccessPolicy::Rbac(rules) => Grants::Listed(rules.grants_for(principal)?),
            AccessPolicy::Smart(options) => Grants::Listed(options.grants_for(principal)?),
        };
        Ok(Access { principal: Some(principal.clone()), grants })
    }

    /// Nothing is permitted: an unauthenticated request on a server with authentication (public
    /// endpoints such as `/metadata`, which never reach the data).
    pub fn anonymous() -> Access {
        Access { principal: None, grants: Grants::Listed(Vec::new()) }
    }

    pub fn is_unrestricted(&self) -> bool {
        matches!(self.grants, Grants::Unrestricted)
    }

    /// The caller, when the request was authenticated (also under [`AccessPolicy::Open`]).
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// May this request perform `interaction` on `resource_type` (`None` for system-level:
    /// `history-system`, `search-system`, `transaction`, `batch`, and an `operation` on the base)?
    ///
    /// `transaction` and `batch` only say the caller may submit a Bundle: each entry must be checked
    /// separately. An `operation` needs a grant of `operation` — every SMART resource scope carries
    /// one for its types, group rules list it — and the operation handler checks what it does
    /// further. The type of a system-level interaction is ignored; a type-level interaction without
    /// a type is denied. [`Access::unrestricted`] permits every check.
    pub fn check(&self, interaction: Interaction, resource_type: Option<ResourceType>) -> Result<Permit, FhirError> {
        let grants = match &self.grants {
            Grants::Unrestricted => return Ok(Permit::All),
            Grants::Listed(grants) => grants,
        };
        let permit = match (interaction, resource_type) {
            (Interaction::Transaction | Interaction::Batch, _) => (!grants.is_empty()).then_some(Permit::All),
            (Interaction::SearchSystem | Interaction::HistorySystem, _) | (Interaction::Operation, None) => {
                broadest(grants.iter().filter(|g| g.resource_type.is_none() && g.grants(interaction)))
            }
            (_, Some(resource_type)) => {
                broadest(grants.iter().filter(|g| g.covers(resource_type) && g.grants(interaction)))
            }
            (_, None) => None,
        };
        permit.ok_or_else(|| denied(interaction, resource_type))
    }
}

fn denied(interaction: Interaction, resource_type: Option<ResourceType>) -> FhirError {
    match resource_type {
        Some(resource_type) => {
            FhirError::forbidden(format!("the access token does not permit {interaction} on {resource_type}"))
        }
        None => FhirError::forbidden(format!("the access token does not permit {interaction}")),
    }
}

/// The broadest permit of `grants`: all beats a compartment beats filters. Filters of the grants
/// without a patient are unioned; only when there are none, those of the patient's grants are.
/// Where two grants cannot be expressed as one permit (a compartment and a filter without patient,
/// or filters with and without patient), the narrower side is dropped: never more than granted.
/// An `Access` from [`Access::for_principal`] has one patient at most; were there several, the first
/// seen wins.
fn broadest<'a>(grants: impl Iterator<Item = &'a Grant>) -> Option<Permit> {
    let mut compartment: Option<&str> = None;
    let mut open_filters = Vec::new();
    let mut filters_patient: Option<&str> = None;
    let mut patient_filters = Vec::new();
    for grant in grants {
        match (grant.patient.as_deref(), grant.filter.is_empty()) {
            (None, true) => return Some(Permit::All),
            (Some(patient), true) => {
                compartment.get_or_insert(patient);
            }
            (None, false) => push_unique(&mut open_filters, &grant.filter),
            (Some(patient), false) => {
                if *filters_patient.get_or_insert(patient) == patient {
                    push_unique(&mut patient_filters, &grant.filter);
                }
            }
        }
    }
    if let Some(patient) = compartment {
        return Some(Permit::PatientCompartment { patient: patient.to_owned() });
    }
    if !open_filters.is_empty() {
        return Some(Permit::Filtered { alternatives: open_filters, patient: None });
    }
    filters_patient.map(|patient| Permit::Filtered { alternatives: patient_filters, patient: Some(patient.to_owned()) })
}

fn push_unique(alternatives: &mut Vec<Vec<(String, String)>>, filter: &[(String, String)]) {
    if !alternatives.iter().any(|existing| existing.as_slice() == filter) {
        alternatives.push(filter.to_vec());
    }
}

/// Serde of a grant's type: `"*"` for every type, else the type name.
mod any_type {
    use fhirmesh_fhir::ResourceType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Option<ResourceType>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(value.as_ref().map_or("*", ResourceType::as_str))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<ResourceType>, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        if name == "*" {
            return Ok(None);
        }
        ResourceType::parse(&name)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown resource type '{name}'")))
    }
}
