//! The parsed search: a backend-neutral AST. [`super::parse`] builds it from request parameters;
//! every backend compiles it to its own query language and MUST implement the matching semantics
//! documented on each type here — the brute-force evaluator in [`super::evaluate`] is the reference the
//! backends are tested against.

use time::OffsetDateTime;

use crate::ResourceType;
use crate::elements::SummaryMode;
use crate::search::params::ParamType;

/// A parsed, validated search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    /// Resource types searched: one for type-level and compartment search; the `_type` list, or
    /// every type, for system-level search.
    pub types: Vec<ResourceType>,
    /// All must hold (AND across parameters and repeats of a parameter).
    pub criteria: Vec<Criterion>,
    /// Sort keys in priority order; ties (and an empty list) are broken by type, then id, ascending.
    pub sort: Vec<SortKey>,
    /// Page size (`_count`, defaulted and capped by the parser).
    pub count: usize,
    pub total: TotalMode,
    /// `_include` (forward: resources the matches reference).
    pub includes: Vec<Include>,
    /// `_revinclude` (reverse: resources referencing the matches).
    pub revincludes: Vec<Include>,
    /// `_summary` / `_elements` — presentation only; `Count` means "no entries, only the total".
    pub summary: Option<SummaryMode>,
    pub elements: Option<Vec<String>>,
    /// Parameters given but not applied (unknown, unsupported) in lenient mode, with why.
    pub ignored: Vec<Ignored>,
    /// The parameters applied, in canonical `name=value` form, for the Bundle's `self` link.
    pub applied: Vec<(String, String)>,
}

impl SearchQuery {
    /// A query over `types` matching every criterion, one page of `count`, with an accurate total,
    /// the default order and no includes or presentation options — the base the parser and
    /// programmatic queries (reverse includes, tests) start from.
    pub fn new(types: Vec<ResourceType>, criteria: Vec<Criterion>, count: usize) -> SearchQuery {
        SearchQuery {
            types,
            criteria,
            sort: Vec::new(),
            count,
            total: TotalMode::default(),
            includes: Vec::new(),
            revincludes: Vec::new(),
            summary: None,
            elements: None,
            ignored: Vec::new(),
            applied: Vec::new(),
        }
    }
}

impl SearchQuery {
    /// A hash of what decides a result's membership and order — the tenant, types, criteria and
    /// sort, not the page size or total mode — so a paging cursor can carry it and be refused on
    /// another search (FNV-1a; stable across processes of one build).
    pub fn fingerprint(&self, tenant: &str) -> u64 {
        let text = format!("{tenant}\u{1f}{:?}\u{1f}{:?}\u{1f}{:?}", self.types, self.criteria, self.sort);
        text.bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
    }
}

/// One criterion; a resource matches the query when it matches every criterion.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    /// `name[:modifier]=v1,v2`: matches when ANY value matches (OR), following the chain first.
    Match(Match),
    /// `name:missing=true|false`: `true` matches resources with no value for the parameter,
    /// `false` resources with at least one. May be chained.
    Missing { chain: Vec<ChainLink>, param: String, kind: ParamType, missing: bool },
    /// `_has:Type:refParam:…` — resources referenced (through `reference_param` of `resource_type`)
    /// by at least one `resource_type` resource matching `criterion` (which may itself be a `Has`).
    Has(Has),
    /// Matches when any of the inner criteria matches (used for compartment membership: an
    /// Observation is in Patient/1's compartment when `subject` OR `performer` is Patient/1).
    AnyOf(Vec<Criterion>),
}

/// A chained step: `subject:Patient.name=x` has one link (param `subject`, targets `[Patient]`);
/// the final parameter is evaluated on the resources the chain reaches. Without a `:Type` the
/// targets are every target type of the reference parameter that defines the next parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub param: String,
    pub targets: Vec<ResourceType>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    pub chain: Vec<ChainLink>,
    /// The parameter code on the (last chained) resource type.
    pub param: String,
    pub kind: ParamType,
    pub modifier: Option<Modifier>,
    /// OR-ed values (at least one). All values have the variant matching `kind` (and the modifier).
    pub values: Vec<SearchValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Has {
    /// The referring resource type (`_has:Observation:…`).
    pub resource_type: ResourceType,
    /// Its reference parameter pointing at the searched resource (`…:patient:…`).
    pub reference_param: String,
    pub criterion: Box<Criterion>,
}

/// Search modifiers (R4 search.html#modifiers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modifier {
    /// string: equal to the stored value exactly (case, accents and all).
    Exact,
    /// string: normalized value contains the normalized search value; uri: not used.
    Contains,
    /// token: normalized `text` (display / CodeableConcept.text / Identifier.type.text) starts with the
    /// normalized search value. Values are `SearchValue::String`.
    Text,
    /// token: the resource has NO value matching (includes resources without the parameter).
    Not,
    /// uri: the stored uri is the search uri or a path-prefix "above" it (stored is a prefix of search).
    Above,
    /// uri: the stored uri starts with the search uri.
    Below,
    /// reference: matches `Reference.identifier`; values are `SearchValue::Token`.
    Identifier,
    /// reference: `subject:Patient=123`, restricting the target type.
    Type(ResourceType),
    /// token on Identifier: `identifier:of-type=system|code|value`; values are `SearchValue::OfType`.
    OfType,
}

/// Comparison prefixes for number, date and quantity (R4 search.html#prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefix {
    #[default]
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// How a token's system was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSystem {
    /// `code`: any system (or none).
    Any,
    /// `|code`: the stored value must have no system.
    None,
    /// `system|code` or `system|`: exactly this system.
    Is(String),
}

/// A search value, by parameter type. Matching rules, with `t` the stored [`super::IndexValue`]:
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// string (and `:text` token) values, as sent (unescaped). Default: `t.normalized` starts with
    /// `normalize_string(v)`; `:contains`: contains it; `:exact`: `t.exact == v`.
    String(String),
    /// token: `code` None means any code of the system (`system|`). Codes compare exactly
    /// (case-sensitive). Also matched against Reference/uri-ish tokens like `id`.
    Token { system: TokenSystem, code: Option<String> },
    /// `identifier:of-type=typeSystem|typeCode|value`: an Identifier whose `type` has that coding and
    /// whose value is `value`. Extraction stores the identifier type as an extra Token entry under
    /// the same parameter with `text` `of-type:<system>|<code>|<value>` — see extract.rs.
    OfType { type_system: String, type_code: String, value: String },
    /// reference: `Type/id` (target_type + id), `id` (any type), an absolute URL (`url`), with an
    /// optional `/_history/v` version (ignored for matching unless the stored reference has one).
    /// Matches a stored reference with the same target type (when given) and id; an absolute URL
    /// matches the stored `url` exactly, or type+id when it ends in `Type/id` of this server.
    Reference { target_type: Option<ResourceType>, id: Option<String>, url: Option<String> },
    /// date: the search range `[start, end)` from the value's precision, with a prefix:
    /// eq: `t ⊆ s`; ne: not eq; gt: `t.end > s.end`; lt: `t.start < s.start`;
    /// ge: gt or eq; le: lt or eq; sa: `t.start >= s.end`; eb: `t.end <= s.start`;
    /// ap: `t` overlaps `s` widened on each side by 10 % of the gap between `s` and now (at least one day).
    Date { prefix: Prefix, start: OffsetDateTime, end: OffsetDateTime },
    /// number: eq: `low <= t.value < high` (the search value's implicit precision); ne: not eq;
    /// gt/sa: `t.value > value`; lt/eb: `t.value < value`; ge: `t.value >= low`; le: `t.value < high`;
    /// ap: `|t.value - value| <= 10 % of |value|`.
    Number { prefix: Prefix, value: f64, low: f64, high: f64 },
    /// quantity: the number rules on the value, plus: with `code` given, the stored `system`/`code`
    /// (or `unit` when no system was given) must equal it; when both sides have a `canonical` form,
    /// compare canonical values and codes instead.
    Quantity {
        prefix: Prefix,
        value: f64,
        low: f64,
        high: f64,
        system: Option<String>,
        code: Option<String>,
        canonical: Option<(f64, String)>,
    },
    /// uri: equal (default), or per `:above` / `:below`.
    Uri(String),
    /// composite: one value per component, all matching the SAME stored composite entry.
    Composite(Vec<SearchValue>),
}

impl SearchValue {
    /// The parameter type a value of a composite's component is stored and matched as; `None`
    /// for a composite (composites do not nest).
    pub fn component_kind(&self) -> Option<ParamType> {
        Some(match self {
            SearchValue::String(_) => ParamType::String,
            SearchValue::Token { .. } | SearchValue::OfType { .. } => ParamType::Token,
            SearchValue::Reference { .. } => ParamType::Reference,
            SearchValue::Date { .. } => ParamType::Date,
            SearchValue::Number { .. } => ParamType::Number,
            SearchValue::Quantity { .. } => ParamType::Quantity,
            SearchValue::Uri(_) => ParamType::Uri,
            SearchValue::Composite(_) => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub param: String,
    pub kind: ParamType,
    pub descending: bool,
}

/// `_total`. Without the parameter the server decides: `Estimate`, which backends answer exactly
/// while that is cheap (a bounded count) and otherwise leave out, so a broad search does not pay
/// for counting every match unless the client asks for `accurate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalMode {
    None,
    #[default]
    Estimate,
    Accurate,
}

/// `_include` / `_revinclude` directive: `source_type:param[:target_type]`, or `source_type:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source_type: ResourceType,
    /// A reference parameter code of `source_type`, or `None` for `*` (every reference parameter).
    pub param: Option<String>,
    pub target_type: Option<ResourceType>,
    /// `:iterate` (also accepted: `:recurse`).
    pub iterate: bool,
}

/// A parameter that was not applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub name: String,
    pub reason: String,
}

/// Where a search runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchScope {
    /// `GET /Type?…`
    Type(ResourceType),
    /// `GET /?…` (`_type` narrows it).
    System,
    /// `GET /Patient/123/Observation?…` (`member` = `None` for `/Patient/123/*`).
    Compartment { compartment: ResourceType, id: String, member: Option<ResourceType> },
}
