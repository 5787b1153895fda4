//! Compiles a [`SearchQuery`] into SQL: one statement for the page (plus one `COUNT(*)` for the
//! total), every value a bound parameter. See `search-design.md` for the shapes.
//!
//! Each criterion becomes a predicate on an alias of `resources` (`a.type`, `a.id`), written as
//! `(a.type, a.id) [NOT] IN (SELECT v.type, v.id FROM <kind>_values v WHERE v.tenant = ? AND
//! v.type IN (…) AND v.param = ? AND (<value 1> OR <value 2> …))`: uncorrelated, so SQLite can
//! drive the query from the value index and seek `resources` by primary key, or scan `resources`
//! in order and probe the materialised set — whichever its planner costs lower.

use fhirmesh_core::model::TenantId;
use fhirmesh_core::ports::IndexError;
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::search::evaluate::approximate_window;
use fhirmesh_fhir::search::parse::ucum_canonical;
use fhirmesh_fhir::search::query::{
    ChainLink, Criterion, Has, Match, Modifier, Prefix, SearchValue, SortKey, TokenSystem, TotalMode,
};
use fhirmesh_fhir::search::values::normalize_string;
use fhirmesh_fhir::search::{ParamType, SearchQuery};
use rusqlite::types::Value;
use time::OffsetDateTime;

use crate::rows::to_micros;
use crate::search::cursor::{Cursor, Direction};
use crate::search::schema::component_param;

/// SQL text with its positional (`?`) parameters, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sql {
    pub text: String,
    pub params: Vec<Value>,
}

impl Sql {
    fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.text.push('?');
        self.params.push(value.into());
        self
    }

    /// `(?, ?, …)` of resource type names.
    fn bind_types(&mut self, types: &[ResourceType]) -> &mut Self {
        self.text.push('(');
        for (index, resource_type) in types.iter().enumerate() {
            if index > 0 {
                self.text.push_str(", ");
            }
            self.bind(resource_type.as_str().to_owned());
        }
        self.text.push(')');
        self
    }

    fn append(&mut self, other: Sql) -> &mut Self {
        self.text.push_str(&other.text);
        self.params.extend(other.params);
        self
    }
}

/// The statements of one page.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CompiledPage {
    /// Columns: `type`, `id`, `version_id`, then one column per sort key. At most `count + 1` rows,
    /// in page order reversed when `reversed`.
    pub page: Sql,
    /// `SELECT COUNT(*)` of every match (no cursor), when a total is wanted.
    pub count: Option<Sql>,
    /// The count stops after `cap + 1` matches: more than `cap` means "no total".
    pub count_cap: Option<u64>,
    /// Walking backwards (a `previous` cursor): the rows come in reverse page order.
    pub reversed: bool,
}

/// `LIMIT count + 1`: the extra row says whether a next page exists.
fn limit(query: &SearchQuery) -> i64 {
    i64::try_from(query.count).unwrap_or(i64::MAX - 1).saturating_add(1)
}

/// How one sort key is computed and compared.
struct SortExpr {
    /// Expression on `resources r`.
    sql: Sql,
    /// `false` only for expressions that cannot be NULL (`_lastUpdated` from `resources`).
    nullable: bool,
    descending: bool,
}

/// Where a kind's values live.
fn table(kind: ParamType) -> Result<&'static str, IndexError> {
    Ok(match kind {
        ParamType::String => "string_values",
        ParamType::Token => "token_values",
        ParamType::Reference => "reference_values",
        ParamType::Date => "date_values",
        ParamType::Number => "number_values",
        ParamType::Quantity => "quantity_values",
        ParamType::Uri => "uri_values",
        ParamType::Composite => "composite_values",
        ParamType::Special => return Err(unsupported("special parameters")),
    })
}

/// The kind a composite component value is stored and matched as.
fn component_kind(value: &SearchValue) -> Result<ParamType, IndexError> {
    value.component_kind().ok_or_else(|| unsupported("a composite inside a composite"))
}

/// Prefix of the text of the extra Token entries extraction stores for `:of-type`.
const OF_TYPE_TEXT: &str = "of-type:";

fn unsupported(what: &str) -> IndexError {
    IndexError::Unsupported(what.to_owned())
}

fn mismatch(kind: ParamType, modifier: &Option<Modifier>, value: &SearchValue) -> IndexError {
    IndexError::Unsupported(format!("a {} value {value:?} with modifier {modifier:?}", kind.as_str()))
}

/// Microseconds since the epoch, rounded down, or up when `ceil`.
fn micros(at: OffsetDateTime, ceil: bool) -> Result<i64, IndexError> {
    let floor = to_micros(at).map_err(|err| IndexError::Unsupported(err.to_string()))?;
    Ok(if ceil && !at.nanosecond().is_multiple_of(1000) { floor + 1 } else { floor })
}

/// The least string greater than every string starting with `prefix` (code-point order, which
/// is SQLite's BINARY order on UTF-8), or `None` when no such bound exists.
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) + 1 {
            0xD800 => Some('\u{E000}'),
            code => char::from_u32(code),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Compiles the page (and count) statements of `query` for `tenant`, continuing from `cursor`.
pub(crate) fn compile(
    tenant: &TenantId,
    query: &SearchQuery,
    cursor: Option<&Cursor>,
    now: OffsetDateTime,
) -> Result<CompiledPage, IndexError> {
    let mut compiler = Compiler { tenant: tenant.as_str().to_owned(), now, aliases: 0 };
    let reversed = matches!(cursor, Some(c) if c.direction == Direction::Previous);
    let driver = driving_criterion(query);
    let page = match driver.filter(|&driver| query.sort.is_empty() && in_id_order(query, &query.criteria[driver])) {
        Some(driver) => compiler.driven_page(query, driver, cursor, reversed)?,
        None => compiler.walking_page(query, cursor, reversed)?,
    };
    let (count, count_cap) = match query.total {
        TotalMode::None => (None, None),
        TotalMode::Estimate => {
            (Some(compiler.count(query, driver, Some(ESTIMATE_EXACT_UP_TO))?), Some(ESTIMATE_EXACT_UP_TO))
        }
        TotalMode::Accurate => (Some(compiler.count(query, driver, None)?), None),
    };
    Ok(CompiledPage { page, count, count_cap, reversed })
}

/// The criterion that can drive the query from a value index: a positive membership test on
/// the resource's *own* rows (a match, through a chain or not, or `:missing=false`).
///
/// Value and reference rows exist only for live resources: `apply` replaces a resource's rows
/// with each newer version and a delete leaves none. So such a set (deduplicated) is exactly the
/// live resources matching that criterion, without consulting `resources`. `_has` sets hold
/// reference *targets*, which may be deleted or never have existed, so they never drive.
fn driving_criterion(query: &SearchQuery) -> Option<usize> {
    if query.types.is_empty() {
        return None;
    }
    query.criteria.iter().position(|criterion| match criterion {
        Criterion::Match(m) => !m.chain.is_empty() || m.modifier != Some(Modifier::Not),
        Criterion::Missing { chain, missing, .. } => !chain.is_empty() || !missing,
        Criterion::Has(_) | Criterion::AnyOf(_) => false,
    })
}

/// Whether the driving criterion's value index yields its rows in `id` order: one type and one
/// value compared for equality on every index column before `id` (see the schema's indexes).
/// Then a page in the default (type, id) order streams from the index and stops after `count`
/// rows, however many resources match.
fn in_id_order(query: &SearchQuery, criterion: &Criterion) -> bool {
    let Criterion::Match(m) = criterion else { return false };
    if query.types.len() != 1 || !m.chain.is_empty() || m.values.len() != 1 {
        return false;
    }
    matches!(
        (m.kind, &m.modifier, &m.values[0]),
        (ParamType::Token, None, SearchValue::Token { code: Some(_), .. })
            | (ParamType::String, Some(Modifier::Exact), SearchValue::String(_))
            | (ParamType::Uri, None, SearchValue::Uri(_))
            | (
                ParamType::Reference,
                None | Some(Modifier::Type(_)),
                SearchValue::Reference { target_type: Some(_), id: Some(_), url: None },
            )
    )
}

/// `Estimate` totals are exact up to this many matches; beyond it the count stops and no total
/// is given (`_total=accurate` asks for the full count).
pub(crate) const ESTIMATE_EXACT_UP_TO: u64 = 1000;

/// The default `ORDER BY` tail: type then id, reversed for a backwards walk.
fn row_order(reversed: bool, order: &mut Vec<String>) {
    let ascending = if reversed { "DESC" } else { "ASC" };
    order.push(format!("type {ascending}"));
    order.push(format!("id {ascending}"));
}

/// The keyset condition "strictly after the cursor's row" in the walk's order: a lexicographic
/// comparison over (per sort key: is-null flag, value), type, id, written as an OR chain, plus a
/// leading non-strict bound on the first component so SQLite can range-seek an ordered index.
fn keyset(sort: &[SortExpr], cursor: &Cursor, (type_col, id_col): (&str, &str)) -> Result<Sql, IndexError> {
    let backwards = cursor.direction == Direction::Previous;
    let (values, row) = cursor.keys.split_at(sort.len());
    // (column, descending, value)
    let mut components: Vec<(String, bool, Value)> = Vec::new();
    for (index, (key, value)) in sort.iter().zip(values).enumerate() {
        let is_null = matches!(value, Value::Null);
        if key.nullable {
            components.push((format!("(k{index} IS NULL)"), false, Value::Integer(i64::from(is_null))));
        } else if is_null {
            return Err(IndexError::InvalidCursor("missing sort key".to_owned()));
        }
        if !is_null {
            components.push((format!("k{index}"), key.descending, value.clone()));
        }
    }
    components.push((type_col.to_owned(), false, row[0].clone()));
    components.push((id_col.to_owned(), false, row[1].clone()));

    let after = |descending: bool| descending == backwards;
    let mut sql = Sql::default();
    let (first, first_descending, first_value) = &components[0];
    sql.push(first).push(if after(*first_descending) { " >= " } else { " <= " }).bind(first_value.clone());
    sql.push(" AND (");
    for (index, (column, descending, value)) in components.iter().enumerate() {
        if index > 0 {
            sql.push(" OR ");
        }
        sql.push("(");
        for (equal, _, equal_value) in &components[..index] {
            sql.push(equal).push(" = ").bind(equal_value.clone()).push(" AND ");
        }
        sql.push(column).push(if after(*descending) { " > " } else { " < " }).bind(value.clone());
        sql.push(")");
    }
    sql.push(")");
    Ok(sql)
}

/// The leaf of a (possibly chained) criterion.
enum Leaf<'a> {
    Match(&'a Match),
    Missing { param: &'a str, kind: ParamType, missing: bool },
}

/// A criterion as a membership test: `(a.type, a.id) [NOT] IN (<set>)`, the set's columns
/// named `type` and `id`.
struct Membership {
    negated: bool,
    set: Sql,
}

impl Membership {
    /// The empty set (a criterion on no resource types).
    fn nothing() -> Membership {
        let mut set = Sql::default();
        set.push("SELECT NULL AS type, NULL AS id WHERE 0");
        Membership { negated: false, set }
    }
}

struct Compiler {
    tenant: String,
    now: OffsetDateTime,
    aliases: usize,
}

impl Compiler {
    fn alias(&mut self, prefix: &str) -> String {
        self.aliases += 1;
        format!("{prefix}{}", self.aliases)
    }

    /// `r.tenant = ? AND r.type IN (…) AND r.deleted = 0 AND <criteria>`.
    fn filter(&mut self, query: &SearchQuery) -> Result<Sql, IndexError> {
        let mut sql = Sql::default();
        sql.push("r.tenant = ").bind(self.tenant.clone());
        if query.types.is_empty() {
            sql.push(" AND 0");
        } else {
            sql.push(" AND r.type IN ").bind_types(&query.types);
        }
        sql.push(" AND r.deleted = 0");
        for criterion in &query.criteria {
            sql.push(" AND ");
            self.criterion(&mut sql, "r", &query.types, criterion)?;
        }
        Ok(sql)
    }

    /// The general page: walk `resources` filtered by every criterion, each a membership test
    /// SQLite may drive from its value index or probe.
    ///
    /// `SELECT type, id, version_id, k0… FROM (SELECT r.type AS type, …, <sort expr> AS k0 … FROM
    /// resources r WHERE <filter>) WHERE <keyset> ORDER BY … LIMIT ?`
    fn walking_page(
        &mut self,
        query: &SearchQuery,
        cursor: Option<&Cursor>,
        reversed: bool,
    ) -> Result<Sql, IndexError> {
        let filter = self.filter(query)?;
        let sort = query.sort.iter().map(|key| self.sort_expr(key)).collect::<Result<Vec<_>, _>>()?;
        let mut page = Sql::default();
        page.push("SELECT type, id, version_id");
        for index in 0..sort.len() {
            page.push(&format!(", k{index}"));
        }
        page.push(" FROM (SELECT r.type AS type, r.id AS id, r.version_id AS version_id");
        for (index, key) in sort.iter().enumerate() {
            page.push(", ").append(key.sql.clone()).push(&format!(" AS k{index}"));
        }
        page.push(" FROM resources r WHERE ").append(filter).push(")");
        if let Some(cursor) = cursor {
            page.push(" WHERE ").append(keyset(&sort, cursor, ("type", "id"))?);
        }
        page.push(" ORDER BY ");
        let mut order = Vec::new();
        for (index, key) in sort.iter().enumerate() {
            // Missing values last in either direction; reversed for a backwards walk.
            if key.nullable {
                order.push(format!("(k{index} IS NULL) {}", if reversed { "DESC" } else { "ASC" }));
            }
            order.push(format!("k{index} {}", if key.descending != reversed { "DESC" } else { "ASC" }));
        }
        row_order(reversed, &mut order);
        page.push(&order.join(", "));
        page.push(" LIMIT ").bind(limit(query));
        Ok(page)
    }

    /// A page in the default order driven by a criterion whose index yields rows in id order
    /// ([`in_id_order`]): the join streams, so the page costs `count` rows, not every match.
    ///
    /// `SELECT DISTINCT m.type AS type, m.id AS id, r.version_id AS version_id FROM (<driver set>) m
    /// JOIN resources r ON … WHERE r.deleted = 0 AND <other criteria on r> AND <keyset on m>
    /// ORDER BY type, id LIMIT ?`
    fn driven_page(
        &mut self,
        query: &SearchQuery,
        driver: usize,
        cursor: Option<&Cursor>,
        reversed: bool,
    ) -> Result<Sql, IndexError> {
        let set = self.driver_set(query, driver)?;
        let mut page = Sql::default();
        page.push("SELECT DISTINCT m.type AS type, m.id AS id, r.version_id AS version_id FROM (");
        page.append(set).push(") m JOIN resources r ON r.tenant = ").bind(self.tenant.clone());
        page.push(" AND r.type = m.type AND r.id = m.id WHERE r.deleted = 0");
        for (_, criterion) in query.criteria.iter().enumerate().filter(|(index, _)| *index != driver) {
            page.push(" AND ");
            self.criterion(&mut page, "r", &query.types, criterion)?;
        }
        if let Some(cursor) = cursor {
            page.push(" AND ").append(keyset(&[], cursor, ("m.type", "m.id"))?);
        }
        let mut order = Vec::new();
        row_order(reversed, &mut order);
        page.push(" ORDER BY ").push(&order.join(", "));
        page.push(" LIMIT ").bind(limit(query));
        Ok(page)
    }

    /// The set of the driving criterion ([`driving_criterion`]), a positive membership test.
    fn driver_set(&mut self, query: &SearchQuery, driver: usize) -> Result<Sql, IndexError> {
        match self.membership(&query.types, &query.criteria[driver])? {
            Membership { negated: false, set } => Ok(set),
            Membership { negated: true, .. } => {
                Err(IndexError::Internal("the driving criterion is not a positive membership test".to_owned()))
            }
        }
    }

    /// `SELECT COUNT(*)` of every match, or of at most `cap + 1` of them. With a driving
    /// criterion ([`driving_criterion`]) the count runs on its value index alone instead of
    /// seeking `resources` once per match.
    fn count(&mut self, query: &SearchQuery, driver: Option<usize>, cap: Option<u64>) -> Result<Sql, IndexError> {
        let mut matches = Sql::default();
        match driver {
            None => {
                let filter = self.filter(query)?;
                matches.push("SELECT 1 FROM resources r WHERE ").append(filter);
            }
            Some(driver) => {
                let set = self.driver_set(query, driver)?;
                matches.push("SELECT 1 FROM (SELECT DISTINCT type, id FROM (").append(set).push(")) r");
                let mut separator = " WHERE ";
                for (_, criterion) in query.criteria.iter().enumerate().filter(|(index, _)| *index != driver) {
                    matches.push(separator);
                    separator = " AND ";
                    self.criterion(&mut matches, "r", &query.types, criterion)?;
                }
            }
        }
        if let Some(cap) = cap {
            matches.push(" LIMIT ").bind(i64::try_from(cap).unwrap_or(i64::MAX - 1).saturating_add(1));
        }
        let mut count = Sql::default();
        count.push("SELECT COUNT(*) FROM (").append(matches).push(")");
        Ok(count)
    }

    /// A predicate on `alias` (a `resources` row of one of `types`, in this tenant).
    fn criterion(
        &mut self,
        sql: &mut Sql,
        alias: &str,
        types: &[ResourceType],
        criterion: &Criterion,
    ) -> Result<(), IndexError> {
        if let Criterion::AnyOf(inner) = criterion {
            if inner.is_empty() {
                sql.push("0");
                return Ok(());
            }
            sql.push("(");
            for (index, criterion) in inner.iter().enumerate() {
                if index > 0 {
                    sql.push(" OR ");
                }
                self.criterion(sql, alias, types, criterion)?;
            }
            sql.push(")");
            return Ok(());
        }
        let Membership { negated, set } = self.membership(types, criterion)?;
        sql.push(&format!("({alias}.type, {alias}.id) {}IN (", if negated { "NOT " } else { "" }));
        sql.append(set).push(")");
        Ok(())
    }

    /// A criterion other than AnyOf as a membership test: `(a.type, a.id) [NOT] IN (<set>)`.
    fn membership(&mut self, types: &[ResourceType], criterion: &Criterion) -> Result<Membership, IndexError> {
        match criterion {
            Criterion::Match(m) => self.chained(types, &m.chain, &Leaf::Match(m)),
            Criterion::Missing { chain, param, kind, missing } => {
                self.chained(types, chain, &Leaf::Missing { param, kind: *kind, missing: *missing })
            }
            Criterion::Has(has) => self.has(types, has),
            Criterion::AnyOf(_) => Err(IndexError::Internal("an AnyOf is not a membership test".to_owned())),
        }
    }

    /// Follows `chain` through the reference table, then applies `leaf` to the resources reached.
    fn chained(
        &mut self,
        types: &[ResourceType],
        chain: &[ChainLink],
        leaf: &Leaf<'_>,
    ) -> Result<Membership, IndexError> {
        let Some((link, rest)) = chain.split_first() else {
            return self.leaf(types, leaf);
        };
        if types.is_empty() || link.targets.is_empty() {
            return Ok(Membership::nothing());
        }
        let (x, t) = (self.alias("x"), self.alias("t"));
        let mut set = Sql::default();
        set.push(&format!("SELECT {x}.type AS type, {x}.id AS id FROM reference_values {x} WHERE "));
        set.push(&format!("{x}.tenant = ")).bind(self.tenant.clone());
        set.push(&format!(" AND {x}.type IN ")).bind_types(types);
        set.push(&format!(" AND {x}.param = ")).bind(link.param.clone());
        set.push(&format!(" AND {x}.target_type IN ")).bind_types(&link.targets);
        set.push(&format!(
            " AND ({x}.target_type, {x}.target_id) IN (SELECT {t}.type, {t}.id FROM resources {t} WHERE "
        ));
        set.push(&format!("{t}.tenant = ")).bind(self.tenant.clone());
        set.push(&format!(" AND {t}.type IN ")).bind_types(&link.targets);
        set.push(&format!(" AND {t}.deleted = 0 AND "));
        let inner = self.chained(&link.targets, rest, leaf)?;
        set.push(&format!("({t}.type, {t}.id) {}IN (", if inner.negated { "NOT " } else { "" }));
        set.append(inner.set).push("))");
        Ok(Membership { negated: false, set })
    }

    /// `_has:Type:param:…`: the targets of a `param` reference from a live `Type` resource
    /// matching the inner criterion (targets that may themselves be deleted or never existed).
    fn has(&mut self, types: &[ResourceType], has: &Has) -> Result<Membership, IndexError> {
        if types.is_empty() {
            return Ok(Membership::nothing());
        }
        let (x, o) = (self.alias("x"), self.alias("o"));
        let referrer = [has.resource_type];
        let mut set = Sql::default();
        set.push(&format!("SELECT {x}.target_type AS type, {x}.target_id AS id FROM reference_values {x} WHERE "));
        set.push(&format!("{x}.tenant = ")).bind(self.tenant.clone());
        set.push(&format!(" AND {x}.type = ")).bind(has.resource_type.as_str().to_owned());
        set.push(&format!(" AND {x}.param = ")).bind(has.reference_param.clone());
        set.push(&format!(" AND {x}.target_type IN ")).bind_types(types);
        set.push(&format!(" AND {x}.id IN (SELECT {o}.id FROM resources {o} WHERE "));
        set.push(&format!("{o}.tenant = ")).bind(self.tenant.clone());
        set.push(&format!(" AND {o}.type = ")).bind(has.resource_type.as_str().to_owned());
        set.push(&format!(" AND {o}.deleted = 0 AND "));
        self.criterion(&mut set, &o, &referrer, &has.criterion)?;
        set.push(")");
        Ok(Membership { negated: false, set })
    }

    /// `SELECT v.type, v.id FROM <table> v WHERE <scope> AND …`, negated for `:not` and
    /// `:missing=true`.
    fn leaf(&mut self, types: &[ResourceType], leaf: &Leaf<'_>) -> Result<Membership, IndexError> {
        if types.is_empty() {
            return Ok(Membership::nothing());
        }
        let (param, kind) = match leaf {
            Leaf::Match(m) => (m.param.as_str(), m.kind),
            Leaf::Missing { param, kind, .. } => (*param, *kind),
        };
        let negated = match leaf {
            Leaf::Match(m) => m.modifier == Some(Modifier::Not),
            Leaf::Missing { missing, .. } => *missing,
        };
        let v = self.alias("v");
        let table = table(kind)?;
        let mut set = Sql::default();
        set.push(&format!("SELECT {v}.type AS type, {v}.id AS id FROM {table} {v} WHERE "));
        set.push(&format!("{v}.tenant = ")).bind(self.tenant.clone());
        set.push(&format!(" AND {v}.type IN ")).bind_types(types);
        set.push(&format!(" AND {v}.param = ")).bind(param.to_owned());
        if let Leaf::Match(m) = leaf {
            if m.values.is_empty() {
                // No value can match: the (positive or negated) set is empty.
                set.push(" AND 0");
            } else {
                set.push(" AND (");
                for (index, value) in m.values.iter().enumerate() {
                    if index > 0 {
                        set.push(" OR ");
                    }
                    set.push("(");
                    // `:not` negates the set of resources with a plainly matching value.
                    let modifier = if negated { &None } else { &m.modifier };
                    if kind == ParamType::Composite {
                        self.composite(&mut set, &v, param, modifier, value)?;
                    } else {
                        self.value(&mut set, &v, kind, modifier, value)?;
                    }
                    set.push(")");
                }
                set.push(")");
            }
        }
        Ok(Membership { negated, set })
    }

    /// Every component of `value` matches the component row with the same `ord` as the
    /// composite row `c`.
    fn composite(
        &mut self,
        sql: &mut Sql,
        c: &str,
        param: &str,
        modifier: &Option<Modifier>,
        value: &SearchValue,
    ) -> Result<(), IndexError> {
        let SearchValue::Composite(components) = value else {
            return Err(mismatch(ParamType::Composite, modifier, value));
        };
        if modifier.is_some() {
            return Err(unsupported("modifiers on composite parameters"));
        }
        sql.push(&format!("{c}.components = ")).bind(components.len() as i64);
        for (index, component) in components.iter().enumerate() {
            sql.push(" AND ");
            let kind = component_kind(component)?;
            let v = self.alias("v");
            sql.push(&format!("EXISTS (SELECT 1 FROM {} {v} WHERE {v}.tenant = {c}.tenant AND {v}.type = {c}.type AND {v}.id = {c}.id AND {v}.param = ", table(kind)?));
            sql.bind(component_param(param, index));
            sql.push(&format!(" AND {v}.ord = {c}.ord AND "));
            self.value(sql, &v, kind, &None, component)?;
            sql.push(")");
        }
        Ok(())
    }

    /// The condition one stored value row `v` of `kind` must meet to match `value`.
    fn value(
        &mut self,
        sql: &mut Sql,
        v: &str,
        kind: ParamType,
        modifier: &Option<Modifier>,
        value: &SearchValue,
    ) -> Result<(), IndexError> {
        match (kind, modifier, value) {
            (ParamType::String, None, SearchValue::String(s)) => {
                starts_with(sql, &format!("{v}.normalized"), &normalize_string(s));
            }
            (ParamType::String, Some(Modifier::Contains), SearchValue::String(s)) => {
                sql.push(&format!("instr({v}.normalized, ")).bind(normalize_string(s)).push(") > 0");
            }
            (ParamType::String, Some(Modifier::Exact), SearchValue::String(s)) => {
                // Equal strings have equal normalised forms: seek the normalised index.
                sql.push(&format!("{v}.normalized = ")).bind(normalize_string(s));
                sql.push(&format!(" AND {v}.exact = ")).bind(s.clone());
            }
            (ParamType::Token, None, SearchValue::Token { system, code }) => {
                token(sql, &format!("{v}.system"), &format!("{v}.code"), system, code.as_deref());
            }
            (ParamType::Token, Some(Modifier::Text), SearchValue::String(s)) => {
                // The extra `of-type:` entries of identifiers are not display text.
                starts_with(sql, &format!("{v}.text_norm"), &normalize_string(s));
                sql.push(&format!(" AND substr({v}.text, 1, {}) <> ", OF_TYPE_TEXT.len()))
                    .bind(OF_TYPE_TEXT.to_owned());
            }
            (ParamType::Token, Some(Modifier::OfType), SearchValue::OfType { type_system, type_code, value }) => {
                sql.push(&format!("{v}.text = ")).bind(format!("{OF_TYPE_TEXT}{type_system}|{type_code}|{value}"));
            }
            // `:Type` is folded into `target_type` by the parser (an absolute url keeps its own).
            (ParamType::Reference, None | Some(Modifier::Type(_)), SearchValue::Reference { target_type, id, url }) => {
                let by_id = |sql: &mut Sql| {
                    if let Some(id) = id {
                        sql.push(&format!("{v}.target_id = ")).bind(id.clone());
                        if let Some(target_type) = target_type {
                            sql.push(&format!(" AND {v}.target_type = ")).bind(target_type.as_str().to_owned());
                        }
                    }
                };
                match (url, id) {
                    (Some(url), Some(_)) => {
                        sql.push(&format!("({v}.url = ")).bind(url.clone()).push(" OR (");
                        by_id(sql);
                        sql.push("))");
                    }
                    (Some(url), None) => {
                        sql.push(&format!("{v}.url = ")).bind(url.clone());
                    }
                    (None, Some(_)) => by_id(sql),
                    (None, None) => {
                        sql.push("0");
                    }
                }
            }
            (ParamType::Reference, Some(Modifier::Identifier), SearchValue::Token { system, code }) => {
                sql.push(&format!("{v}.ident_value IS NOT NULL AND "));
                token(sql, &format!("{v}.ident_system"), &format!("{v}.ident_value"), system, code.as_deref());
            }
            (ParamType::Date, None, SearchValue::Date { prefix, start, end }) => {
                // Stored bounds are whole microseconds: `x >= b` ⟺ `x >= ceil(b)`, `x > b` ⟺
                // `x > floor(b)`, `x <= b` ⟺ `x <= floor(b)`, `x < b` ⟺ `x < ceil(b)`.
                let (start_col, end_col) = (format!("{v}.start_us"), format!("{v}.end_us"));
                let (s_floor, s_ceil) = (micros(*start, false)?, micros(*start, true)?);
                let (e_floor, e_ceil) = (micros(*end, false)?, micros(*end, true)?);
                // `start_us <= e` is implied by `end_us <= e` for well-formed ranges (start <=
                // end, as extraction produces them) and bounds the index range on start.
                let eq = |sql: &mut Sql| {
                    sql.push(&format!("({start_col} >= ")).bind(s_ceil);
                    sql.push(&format!(" AND {start_col} <= ")).bind(e_floor);
                    sql.push(&format!(" AND {end_col} <= ")).bind(e_floor).push(")");
                };
                match prefix {
                    Prefix::Eq => eq(sql),
                    Prefix::Ne => {
                        sql.push("NOT ");
                        eq(sql);
                    }
                    Prefix::Gt => {
                        sql.push(&format!("{end_col} > ")).bind(e_floor);
                    }
                    Prefix::Lt => {
                        sql.push(&format!("{start_col} < ")).bind(s_ceil);
                    }
                    Prefix::Ge => {
                        sql.push(&format!("({end_col} > ")).bind(e_floor).push(" OR ");
                        eq(sql);
                        sql.push(")");
                    }
                    Prefix::Le => {
                        sql.push(&format!("({start_col} < ")).bind(s_ceil).push(" OR ");
                        eq(sql);
                        sql.push(")");
                    }
                    Prefix::Sa => {
                        sql.push(&format!("{start_col} >= ")).bind(e_ceil);
                    }
                    Prefix::Eb => {
                        sql.push(&format!("{end_col} <= ")).bind(s_floor);
                    }
                    Prefix::Ap => {
                        let (low, high) = approximate_window(*start, *end, self.now);
                        sql.push(&format!("{start_col} < ")).bind(micros(high, true)?);
                        sql.push(&format!(" AND {end_col} > ")).bind(micros(low, false)?);
                    }
                }
            }
            (ParamType::Number, None, SearchValue::Number { prefix, value, low, high }) => {
                number(sql, (&format!("{v}.low"), &format!("{v}.high")), *prefix, *value, *low, *high);
            }
            (
                ParamType::Quantity,
                None,
                SearchValue::Quantity { prefix, value, low, high, system, code, canonical },
            ) => {
                let plain = |sql: &mut Sql| {
                    let stored = format!("{v}.value");
                    number(sql, (&stored, &stored), *prefix, *value, *low, *high);
                    match (system, code) {
                        (Some(system), Some(code)) => {
                            sql.push(&format!(" AND {v}.system = ")).bind(system.clone());
                            sql.push(&format!(" AND {v}.code = ")).bind(code.clone());
                        }
                        (None, Some(code)) => {
                            sql.push(&format!(" AND ({v}.code = ")).bind(code.clone());
                            sql.push(&format!(" OR {v}.unit = ")).bind(code.clone()).push(")");
                        }
                        (Some(system), None) => {
                            sql.push(&format!(" AND {v}.system = ")).bind(system.clone());
                        }
                        (None, None) => {}
                    }
                };
                match canonical {
                    Some((canonical_value, canonical_code)) => {
                        // The precision range scales with the value (by the unit's factor for 0).
                        let factor = if *value != 0.0 {
                            canonical_value / value
                        } else {
                            code.as_deref().and_then(|c| ucum_canonical(1.0, c)).map_or(1.0, |(factor, _)| factor)
                        };
                        let (c_low, c_high) = (low * factor, high * factor);
                        sql.push(&format!("CASE WHEN {v}.canonical_code IS NOT NULL THEN ("));
                        let stored = format!("{v}.canonical_value");
                        number(sql, (&stored, &stored), *prefix, *canonical_value, c_low, c_high);
                        sql.push(&format!(" AND {v}.canonical_code = ")).bind(canonical_code.clone());
                        sql.push(") ELSE (");
                        plain(sql);
                        sql.push(") END");
                    }
                    None => plain(sql),
                }
            }
            (ParamType::Uri, None, SearchValue::Uri(uri)) => {
                sql.push(&format!("{v}.value = ")).bind(uri.clone());
            }
            (ParamType::Uri, Some(Modifier::Below), SearchValue::Uri(uri)) => {
                starts_with(sql, &format!("{v}.value"), uri);
            }
            (ParamType::Uri, Some(Modifier::Above), SearchValue::Uri(uri)) => {
                sql.push("substr(").bind(uri.clone()).push(&format!(", 1, length({v}.value)) = {v}.value"));
            }
            (kind, modifier, value) => return Err(mismatch(kind, modifier, value)),
        }
        Ok(())
    }

    /// The expression of one sort key on `resources r`: the lowest value of the resource for an
    /// ascending key, the highest for a descending one; NULL when it has none.
    fn sort_expr(&mut self, key: &SortKey) -> Result<SortExpr, IndexError> {
        let (aggregate, column) = match (key.kind, key.descending) {
            (ParamType::Date, descending) if key.param == "_lastUpdated" => {
                // Denormalised on `resources`, with sentinels sorting last: an index walk.
                let mut sql = Sql::default();
                sql.push(if descending { "r.lu_desc" } else { "r.lu_asc" });
                return Ok(SortExpr { sql, nullable: false, descending });
            }
            (ParamType::String, false) => ("MIN", "normalized"),
            (ParamType::String, true) => ("MAX", "normalized"),
            (ParamType::Token, false) => ("MIN", "code"),
            (ParamType::Token, true) => ("MAX", "code"),
            (ParamType::Reference, false) => ("MIN", "url"),
            (ParamType::Reference, true) => ("MAX", "url"),
            (ParamType::Date, false) => ("MIN", "start_us"),
            (ParamType::Date, true) => ("MAX", "end_us"),
            (ParamType::Number | ParamType::Quantity | ParamType::Uri, false) => ("MIN", "value"),
            (ParamType::Number | ParamType::Quantity | ParamType::Uri, true) => ("MAX", "value"),
            (ParamType::Composite | ParamType::Special, _) => {
                return Err(IndexError::Unsupported(format!(
                    "sorting by the {} parameter {}",
                    key.kind.as_str(),
                    key.param
                )));
            }
        };
        let s = self.alias("s");
        let mut sql = Sql::default();
        sql.push(&format!(
            "(SELECT {aggregate}({s}.{column}) FROM {} {s} WHERE {s}.tenant = r.tenant AND {s}.type = r.type \
             AND {s}.id = r.id AND {s}.param = ",
            table(key.kind)?
        ));
        sql.bind(key.param.clone()).push(")");
        Ok(SortExpr { sql, nullable: true, descending: key.descending })
    }
}

/// `column` starts with `prefix`, as an index range: `column >= prefix AND column < successor`.
fn starts_with(sql: &mut Sql, column: &str, prefix: &str) {
    sql.push(&format!("{column} >= ")).bind(prefix.to_owned());
    if let Some(upper) = prefix_successor(prefix) {
        sql.push(&format!(" AND {column} < ")).bind(upper);
    }
}

/// Token system/code matching (codes case-sensitive).
fn token(sql: &mut Sql, system_col: &str, code_col: &str, system: &TokenSystem, code: Option<&str>) {
    let mut parts = 0;
    if let Some(code) = code {
        sql.push(&format!("{code_col} = ")).bind(code.to_owned());
        parts += 1;
    }
    match system {
        TokenSystem::Any => {}
        TokenSystem::None => {
            sql.push(if parts > 0 { " AND " } else { "" }).push(&format!("{system_col} IS NULL"));
            parts += 1;
        }
        TokenSystem::Is(system) => {
            sql.push(if parts > 0 { " AND " } else { "" }).push(&format!("{system_col} = ")).bind(system.clone());
            parts += 1;
        }
    }
    if parts == 0 {
        sql.push("1");
    }
}

/// A stored interval `[t_low, t_high]` (columns; the same column for a point) against a search
/// `prefix` + `value` with implicit-precision range `[low, high)` — the rules of
/// `fhirmesh_fhir::search::evaluate::number_matches`.
fn number(sql: &mut Sql, (t_low, t_high): (&str, &str), prefix: Prefix, value: f64, low: f64, high: f64) {
    let eq = |sql: &mut Sql| {
        sql.push(&format!("({t_low} >= ")).bind(low).push(&format!(" AND {t_high} < ")).bind(high).push(")");
    };
    match prefix {
        Prefix::Eq => eq(sql),
        Prefix::Ne => {
            sql.push("NOT ");
            eq(sql);
        }
        Prefix::Gt => {
            sql.push(&format!("{t_high} > ")).bind(value);
        }
        Prefix::Lt => {
            sql.push(&format!("{t_low} < ")).bind(value);
        }
        Prefix::Ge => {
            sql.push(&format!("({t_high} > ")).bind(value).push(" OR ");
            eq(sql);
            sql.push(")");
        }
        Prefix::Le => {
            sql.push(&format!("({t_low} < ")).bind(value).push(" OR ");
            eq(sql);
            sql.push(")");
        }
        Prefix::Sa => {
            sql.push(&format!("{t_low} >= ")).bind(high);
        }
        Prefix::Eb => {
            sql.push(&format!("{t_high} < ")).bind(low);
        }
        Prefix::Ap => {
            let tolerance = 0.1 * value.abs();
            sql.push(&format!("({t_low} <= ")).bind(value + tolerance);
            sql.push(&format!(" AND {t_high} >= ")).bind(value - tolerance).push(")");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_successors() {
        assert_eq!(prefix_successor("abc").as_deref(), Some("abd"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_successor("\u{10FFFF}"), None);
        assert_eq!(prefix_successor(""), None);
    }
}
